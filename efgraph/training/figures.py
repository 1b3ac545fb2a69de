"""Figures of what the flows did: paths through the lattice, landing positions and energies.

Rendered with matplotlib's Agg backend to PNG files, so a run folder shows them without W&B.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from efgraph.config import EnergyConfig  # noqa: E402
from efgraph.core.trace import FlowTrace  # noqa: E402


def flow_paths_figure(trace: FlowTrace, config: EnergyConfig, path: str | Path, sample: int = 0) -> Path:
    """Side views (x-z and y-z) of every flow of one sample, line width ~ energy."""
    if trace.paths is None:
        raise ValueError("trace: recorded without paths; set processor.record_paths = True before the forward")
    points: dict[int, list[tuple[float, float, float, float]]] = {}
    for record in trace.paths:
        mine = record["batch"] == sample
        for fid, (x, y, z), e in zip(record["flow_id"][mine].tolist(), record["pos"][mine].tolist(),
                                     record["energy"][mine].tolist()):
            points.setdefault(fid, []).append((x, y, z, e))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    cmap = plt.get_cmap("viridis")
    for fid, pts in points.items():
        xs, ys, zs, es = zip(*pts)
        color = cmap(min(max(es[-1], 0.0), 1.0))
        axes[0].plot(zs, xs, "-o", color=color, lw=0.6 + 2 * es[0], ms=2, alpha=0.8)
        axes[1].plot(zs, ys, "-o", color=color, lw=0.6 + 2 * es[0], ms=2, alpha=0.8)
    for ax, name, size in [(axes[0], "x", config.lattice_width), (axes[1], "y", config.lattice_height)]:
        ax.set_xlim(-0.3, config.lattice_depth - 0.7)
        ax.set_xlabel("z (input face 0 -> output face)")
        ax.set_title(f"flows of sample {sample}: {name} against z")
        ax.axvline(config.lattice_depth - 1, color="k", lw=0.8, ls="--")
    axes[0].set_ylabel("lateral position (cells)")
    axes[0].set_ylim(-0.5, max(config.lattice_width, config.lattice_height) - 0.5)
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=axes, label="final energy")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def landing_figure(trace: FlowTrace, config: EnergyConfig, path: str | Path) -> Path:
    """Where flows landed on the output face (2-D histogram) and with what energy (histogram)."""
    if trace.paths is None:
        raise ValueError("trace: recorded without paths; set processor.record_paths = True before the forward")
    arrivals = trace.paths[-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    pos = arrivals["pos"]
    axes[0].hist2d(pos[:, 0].numpy(), pos[:, 1].numpy(), bins=[config.lattice_width, config.lattice_height],
                   range=[[-0.5, config.lattice_width - 0.5], [-0.5, config.lattice_height - 0.5]], cmap="magma")
    axes[0].set_title(f"landing positions ({pos.size(0)} arrivals)")
    axes[0].set_xlabel("x")
    axes[0].set_ylabel("y")
    axes[1].hist(arrivals["energy"].numpy(), bins=30, range=(0, 1), color="tab:orange")
    axes[1].set_title("energy on arrival")
    axes[1].set_xlabel("energy")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def flow_counts_figure(trace: FlowTrace, path: str | Path) -> Path:
    """Per lattice step: active flows, occupied cells, spawned, died, arrived; the energy books;
    and how many flows a flow's neuron hears (its interaction neighbourhood)."""
    counts = trace.as_dict()
    steps = list(range(1, trace.num_steps + 1))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key, style in [("active", "-o"), ("occupied", "--o"), ("spawned", "-^"), ("died", "-x"), ("arrived", "-s")]:
        axes[0].plot(steps, counts[key], style, label=key, ms=4)
    for ax in axes:
        ax.set_xticks(steps)
    axes[0].set_xlabel("lattice step")
    axes[0].set_title(f"flows per step (batch of {trace.batch_size})")
    axes[0].legend(fontsize=8)
    injected = float(trace.energy_injected) or 1.0
    for key in ("energy_in_flight", "energy_arrived", "energy_lost", "energy_created"):
        axes[1].plot(steps, [v / injected for v in counts[key]], "-o", ms=4, label=key.replace("energy_", ""))
    axes[1].set_ylim(bottom=0)
    axes[1].set_xlabel("lattice step")
    axes[1].set_title("cumulative energy / injected")
    axes[1].legend(fontsize=8)
    axes[2].plot(steps, counts["neighbourhood_flows"], "-o", ms=4)
    axes[2].set_ylim(bottom=0)
    axes[2].set_xlabel("lattice step")
    axes[2].set_title("flows per interaction neighbourhood")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def landing_arrays(trace: FlowTrace) -> dict[str, torch.Tensor]:
    """Landing x, y and energies as 1-D tensors (for W&B histograms)."""
    if trace.paths is None:
        raise ValueError("trace: recorded without paths")
    arrivals = trace.paths[-1]
    return {"landing/x": arrivals["pos"][:, 0], "landing/y": arrivals["pos"][:, 1], "landing/energy": arrivals["energy"]}
