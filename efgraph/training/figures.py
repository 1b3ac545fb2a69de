"""Figures of what the flows did: paths through the lattice, landing positions and energies.

Rendered with matplotlib's Agg backend to PNG files, so a run folder shows them without W&B.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from torch import Tensor  # noqa: E402

from efgraph.config import EnergyConfig  # noqa: E402
from efgraph.core.trace import FlowTrace  # noqa: E402


def arrivals_of(trace: FlowTrace) -> dict[str, Tensor]:
    """The trace's arrivals record (``pos``, ``energy``, ``batch``, ``flow_id``); it needs paths."""
    if trace.paths is None or trace.parent_of is None:
        raise ValueError("trace: recorded without paths; set processor.record_paths = True before the forward")
    return trace.paths[-1]


def save_figure(fig: plt.Figure, path: str | Path, **savefig: object) -> Path:
    """Write ``fig`` to ``path`` (PNG, 110 dpi unless told) and close it."""
    path = Path(path)
    fig.savefig(path, **{"dpi": 110, **savefig})
    plt.close(fig)
    return path


def flow_polylines(trace: FlowTrace, config: EnergyConfig,
                   samples: Sequence[int] | None = None) -> list[tuple[int, int, Tensor]]:
    """Every flow of ``samples`` (all when ``None``) as ``(sample, start_cell, points [n, 3])``:
    its (x, y, z) from the input face (z = 0) to where it ended (the output face or where it died).
    A child's polyline starts with its parent's up to the spawn, and both take the input-face cell
    ``y * W + x`` that their root ancestor started on; z increases strictly along each polyline."""
    arrivals_of(trace)
    own: dict[int, list[list[float]]] = {}
    sample_of: dict[int, int] = {}
    for record in trace.paths:  # one record per step (flows at its start), then the arrivals
        for fid, b, pos in zip(record["flow_id"].tolist(), record["batch"].tolist(), record["pos"].tolist()):
            own.setdefault(fid, []).append(pos)
            sample_of[fid] = b
    roots = {int(f) for f in trace.paths[0]["flow_id"]}
    full: dict[int, list[list[float]]] = {}

    def polyline(fid: int) -> list[list[float]]:
        if fid not in full:
            first_z = own[fid][0][2]
            parent = trace.parent_of.get(fid)
            prefix = [] if fid in roots or parent is None else [p for p in polyline(parent) if p[2] < first_z]
            full[fid] = prefix + own[fid]
        return full[fid]

    def start_cell(fid: int) -> int:
        while fid not in roots:
            fid = trace.parent_of[fid]
        x, y = own[fid][0][:2]
        w, h = config.lattice_width, config.lattice_height
        return min(max(round(y), 0), h - 1) * w + min(max(round(x), 0), w - 1)

    wanted = None if samples is None else set(samples)
    return [(sample_of[fid], start_cell(fid), torch.tensor(polyline(fid)))
            for fid in sorted(own) if wanted is None or sample_of[fid] in wanted]


def flow_paths_figure(traces: Mapping[str, FlowTrace], config: EnergyConfig, path: str | Path,
                      samples: Sequence[int] = (0, 1, 2, 3)) -> Path:
    """One row per trace (e.g. untrained, trained): x-z and y-z projections of every flow of
    ``samples``, each flow a polyline from the input face to where it ended, coloured by the
    input-face cell its root ancestor started on (children inherit it)."""
    w, h, d = config.lattice_width, config.lattice_height, config.lattice_depth
    fig, axes = plt.subplots(len(traces), 2, figsize=(12, 4.0 * len(traces)), squeeze=False, layout="constrained")
    cmap, norm = plt.get_cmap("turbo"), Normalize(vmin=0, vmax=max(w * h - 1, 1))
    shown: list[int] = []
    for row, (label, trace) in zip(axes, traces.items()):
        lines = flow_polylines(trace, config, samples)
        shown = sorted({s for s, _, _ in lines} | set(shown))
        for _, cell, pts in lines:
            for ax, axis in zip(row, (0, 1)):
                ax.plot(pts[:, 2], pts[:, axis], "-o", color=cmap(norm(cell)), lw=0.9, ms=2, alpha=0.75)
        for ax, name, size in zip(row, ("x", "y"), (w, h)):
            ax.set(xlim=(-0.3, d - 0.7), ylim=(-0.5, size - 0.5), xlabel=f"z (input face 0 -> output face {d - 1})",
                   ylabel=f"{name} (cells)", title=f"{label}: {name}-z projection ({len(lines)} flows)")
            ax.axvline(d - 1, color="k", lw=0.8, ls="--")
    fig.suptitle(f"flow paths of test samples {shown}, input face to where each ended (children draw their parent's "
                 "path before the spawn)", fontsize=10)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="start cell (y*W+x)")
    return save_figure(fig, path)


def landing_figure(trace: FlowTrace, config: EnergyConfig, path: str | Path) -> Path:
    """Where flows landed on the output face (2-D histogram) and with what energy (histogram)."""
    arrivals = arrivals_of(trace)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    pos = arrivals["pos"]
    image = axes[0].hist2d(pos[:, 0].numpy(), pos[:, 1].numpy(), bins=[config.lattice_width, config.lattice_height],
                           range=[[-0.5, config.lattice_width - 0.5], [-0.5, config.lattice_height - 0.5]],
                           cmap="magma")[3]
    fig.colorbar(image, ax=axes[0], label=f"arrivals per output-face cell (batch of {trace.batch_size})")
    axes[0].set(title=f"landing positions on the output face ({pos.size(0)} arrivals)", xlabel="x (cells)",
                ylabel="y (cells)")
    axes[1].hist(arrivals["energy"].numpy(), bins=30, range=(0, 1), color="tab:orange")
    axes[1].set(title="energy of each flow on arrival", xlabel="energy", ylabel="arrivals")
    fig.tight_layout()
    return save_figure(fig, path)


def flow_counts_figure(trace: FlowTrace, path: str | Path) -> Path:
    """Per lattice step: active flows, occupied cells, spawned, died, arrived; the energy books;
    and how many flows a flow's neuron hears (its interaction neighbourhood). A lattice that ran
    one step (depth 2) is drawn as bars, one per quantity, instead of one dot per curve."""
    counts = trace.as_dict()
    steps = list(range(1, trace.num_steps + 1))
    injected = float(trace.energy_injected) or 1.0
    panels = [
        (f"flows per step (batch of {trace.batch_size})", "flows",
         {k: counts[k] for k in ("active", "occupied", "spawned", "died", "arrived")}),
        ("cumulative energy / injected", "share of the injected energy",
         {k.replace("energy_", ""): [v / injected for v in counts[k]]
          for k in ("energy_in_flight", "energy_arrived", "energy_lost", "energy_created")}),
        ("flows per interaction neighbourhood", "mean flows a flow's neuron hears",
         {"neighbourhood": counts["neighbourhood_flows"]}),
    ]
    one_step = len(steps) == 1
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (title, ylabel, series) in zip(axes, panels):
        if one_step:  # one value per quantity: bars, labelled with their values
            bars = ax.bar(list(series), [v[0] for v in series.values()], color=plt.get_cmap("tab10").colors)
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
            ax.set_xlabel("the lattice's one step")
            ax.tick_params(axis="x", labelsize=8)
        else:
            for (key, values), style in zip(series.items(), ["-o", "--o", "-^", "-x", "-s"]):
                ax.plot(steps, values, style, label=key, ms=4)
            ax.set_xticks(steps)
            ax.set_xlabel("lattice step")
            if len(series) > 1:
                ax.legend(fontsize=8)
        ax.set(ylim=(0, None), title=title, ylabel=ylabel)
    fig.tight_layout()
    return save_figure(fig, path)


def landing_arrays(trace: FlowTrace) -> dict[str, torch.Tensor]:
    """Landing x, y and energies as 1-D tensors (for W&B histograms)."""
    arrivals = arrivals_of(trace)
    return {"landing/x": arrivals["pos"][:, 0], "landing/y": arrivals["pos"][:, 1], "landing/energy": arrivals["energy"]}
