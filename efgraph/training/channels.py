"""Channels through the lattice: where the energy from each region of the input face lands.

The input and output faces are cut into the same ``grid x grid`` regions. Every arrival is traced
back through its ancestors (``FlowTrace.parent_of``) to the input-face cell its lineage started
from, and its energy is booked in ``M[input region, output region]``. Two numbers summarise M:

* ``channel_concentration`` -- ``1 - H(out | in) / log(G)`` over the pooled batch, with ``G`` the
  number of regions: 1 when each input region sends all of its energy to one output region in
  every sample (fixed channels), 0 when it spreads evenly over the output face.
* ``sample_channel_concentration`` -- the same within each sample, averaged (weighted by energy):
  1 when, in each input, each region's energy goes to one place, even if that place depends on the
  input (routing by content gives high values here and lower ones above).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from efgraph.config import EnergyConfig  # noqa: E402
from efgraph.core.trace import FlowTrace  # noqa: E402
from efgraph.training.figures import arrivals_of, save_figure  # noqa: E402


def _region(x: Tensor, y: Tensor, config: EnergyConfig, grid: int) -> Tensor:
    gx = (x.round().clamp(0, config.lattice_width - 1) * grid / config.lattice_width).long().clamp(max=grid - 1)
    gy = (y.round().clamp(0, config.lattice_height - 1) * grid / config.lattice_height).long().clamp(max=grid - 1)
    return gy * grid + gx


def arrival_origins(trace: FlowTrace) -> dict[str, Tensor]:
    """Each arrival's batch, input-face origin (x, y), landing (x, y) and energy (CPU tensors)."""
    arrivals = arrivals_of(trace)
    start = trace.paths[0]  # the injected flows, on the input face
    origin = {int(f): (float(p[0]), float(p[1])) for f, p in zip(start["flow_id"], start["pos"])}
    xy = []
    for fid in arrivals["flow_id"].tolist():
        while fid not in origin:  # a child: climb to the injected ancestor
            fid = trace.parent_of[fid]
        xy.append(origin[fid])
    return {"batch": arrivals["batch"], "origin": torch.tensor(xy, dtype=torch.float32).reshape(-1, 2),
            "landing": arrivals["pos"][:, :2], "energy": arrivals["energy"]}


def _sample_maps(a: dict[str, Tensor], config: EnergyConfig, grid: int, batch_size: int) -> Tensor:
    """``[B, G, G]`` per sample: energy landed in output region j from input region i."""
    g = grid * grid
    src = _region(a["origin"][:, 0], a["origin"][:, 1], config, grid)
    dst = _region(a["landing"][:, 0], a["landing"][:, 1], config, grid)
    maps = torch.zeros(batch_size, g * g).index_put_((a["batch"], src * g + dst), a["energy"].float(), accumulate=True)
    return maps.view(batch_size, g, g)


def _metrics(maps: Tensor) -> dict[str, float]:
    weights = maps.sum(dim=(1, 2))
    live = weights > 0
    scores = torch.tensor([concentration(m) for m in maps[live]])
    sample = float((scores * weights[live]).sum() / weights[live].sum()) if live.any() else float("nan")
    return {"channels/concentration": concentration(maps.sum(dim=0)), "channels/sample_concentration": sample}


def channel_map(trace: FlowTrace, config: EnergyConfig, grid: int = 3) -> Tensor:
    """``[G, G]`` energy landed in output region j from input region i (``G = grid * grid``)."""
    return _sample_maps(arrival_origins(trace), config, grid, trace.batch_size).sum(dim=0)


def concentration(m: Tensor) -> float:
    """``1 - H(out | in) / log(G)`` of an energy map ``m [G_in, G_out]`` (rows weighted by their energy)."""
    total = float(m.sum())
    if total <= 0 or m.size(1) < 2:
        return float("nan")
    rows = m.sum(dim=1)
    p = m / rows.clamp(min=1e-12).unsqueeze(1)
    entropy = -(p * p.clamp(min=1e-12).log()).sum(dim=1)
    return 1.0 - float((rows / total * entropy).sum()) / math.log(m.size(1))


def channel_metrics(trace: FlowTrace, config: EnergyConfig, grid: int = 3) -> dict[str, float]:
    """``channels/concentration`` (pooled) and ``channels/sample_concentration`` (within samples)."""
    return _metrics(_sample_maps(arrival_origins(trace), config, grid, trace.batch_size))


def channels_figure(trace: FlowTrace, config: EnergyConfig, path: str | Path, grid: int = 3,
                    sample: int = 0) -> Path:
    """Left: the row-normalised channel map (input region -> output region, energy share).
    Right: one sample's arrivals as arrows from their input-face origin to their landing point."""
    a = arrival_origins(trace)
    maps = _sample_maps(a, config, grid, trace.batch_size)
    m, metrics = maps.sum(dim=0), _metrics(maps)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6), layout="constrained")
    share = m / m.sum(dim=1, keepdim=True).clamp(min=1e-12)
    im = axes[0].imshow(share.numpy(), cmap="magma", vmin=0, vmax=1)
    axes[0].set(xlabel=f"output-face region ({grid}x{grid}, row-major)", ylabel=f"input-face region ({grid}x{grid})",
                title=f"where each input region's energy lands\nconcentration {metrics['channels/concentration']:.2f}"
                      f" (within samples {metrics['channels/sample_concentration']:.2f})")
    fig.colorbar(im, ax=axes[0], label="share of the region's energy")
    mine = a["batch"] == sample
    cmap = plt.get_cmap("tab10")
    regions = _region(a["origin"][:, 0], a["origin"][:, 1], config, grid)
    for (ox, oy), (lx, ly), e, r in zip(a["origin"][mine].tolist(), a["landing"][mine].tolist(),
                                        a["energy"][mine].tolist(), regions[mine].tolist()):
        axes[1].annotate("", xy=(lx, ly), xytext=(ox, oy),
                         arrowprops=dict(arrowstyle="->", color=cmap(r % 10), lw=0.5 + 2 * min(e, 1.0), alpha=0.8))
        axes[1].plot(ox, oy, "o", color=cmap(r % 10), ms=4)
    axes[1].set(xlim=(-0.5, config.lattice_width - 0.5), ylim=(-0.5, config.lattice_height - 0.5), aspect="equal",
                xlabel="x (cells)", ylabel="y (cells)",
                title=f"sample {sample}: input-face origin (dot) -> landing (arrow head)\n"
                      "colour: input region, width: energy on arrival")
    fig.suptitle(f"Channels: both faces cut into {grid}x{grid} regions (row-major from x=0, y=0); every arrival is "
                 "traced back to the input-face cell its lineage started on.\nConcentration 1: each input region sends "
                 "all its energy to one output region; 0: it spreads evenly over the face.", fontsize=9)
    return save_figure(fig, path, bbox_inches="tight")
