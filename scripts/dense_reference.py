"""`DenseReferenceProcessor`: the same model, but the neuron runs on *every* cell every step.

This is what a dense lattice implementation costs: the flows' messages are scattered into a dense
``[B, D, H, W]`` grid, every cell's interaction neighbourhood is summed with a box convolution
(``(2r+1)^3`` ones), and the neuron runs on each cell, occupied or not. Its outputs equal
:class:`FlowProcessor`'s (no flow ever reads an empty cell), which the tests check;
``scripts/bench_forward.py`` times the two side by side to measure what "only occupied cells cost
compute" buys.

A benchmark baseline and a test oracle, not part of the engine: it sits next to the benchmark that
imports it (``tests/test_engine_step.py`` loads it from here).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from efgraph.config import EnergyConfig
from efgraph.core.energy_lattice import EnergyLattice
from efgraph.core.flow_processor import FlowProcessor
from efgraph.core.flow_state import FlowState
from efgraph.core.flow_step import FlowStep
from efgraph.core.records import CellStep
from efgraph.core.simple_neuron import SimpleNeuron


class DenseReferenceProcessor(FlowProcessor):
    """A :class:`FlowProcessor` whose step (:class:`DenseFlowStep`) evaluates the neuron on the
    whole lattice; its parameters are named and shaped as the processor's, so state dicts move freely."""

    def __init__(self, lattice: EnergyLattice, neuron: SimpleNeuron, config: EnergyConfig) -> None:
        super().__init__(lattice, neuron, config)
        self.flow_step = DenseFlowStep(config, lattice, neuron)


class DenseFlowStep(FlowStep):
    """A :class:`FlowStep` whose cells are every cell of the lattice."""

    def cells(self, state: FlowState, batch_size: int | None = None) -> CellStep:
        lattice, cfg = self.lattice, self.config
        assert state.valid is None, "the dense reference runs eagerly, without padding"
        batch_size = int(state.batch.max()) + 1 if state.num_flows else 0
        cell_id = lattice.cell_id(state.batch, lattice.cell_coordinates(state.pos))
        msg = self.conv.flow_messages(state.h[-1], state.energy)
        # [message sum | flow count] per cell of the dense lattice, ids ordered (sample, z, y, x)
        rows = torch.cat([msg, torch.ones_like(msg[:, :1])], dim=1)
        grid = torch.zeros(batch_size * cfg.num_cells, rows.size(1), dtype=rows.dtype, device=rows.device)
        grid = grid.index_add(0, cell_id, rows)
        grid = grid.view(batch_size, cfg.lattice_depth, cfg.lattice_height, cfg.lattice_width, -1).permute(0, 4, 1, 2, 3)
        r = cfg.interaction_radius
        channels = grid.size(1)
        box = torch.ones(channels, 1, 2 * r + 1, 2 * r + 1, 2 * r + 1, dtype=grid.dtype, device=grid.device)
        heard = F.conv3d(grid, box, padding=r, groups=channels)  # zero padding: nothing beyond the faces
        heard = heard.permute(0, 2, 3, 4, 1).reshape(batch_size * cfg.num_cells, channels)
        sums, counts = heard[:, :-1], heard[:, -1:]
        aggregated = sums / counts.clamp(min=1.0) if cfg.aggregation == "mean" else sums
        # every cell's (x, y, z), in the id order (z, y, x) of the grid above
        zs, ys, xs = torch.meshgrid(*(torch.arange(n, device=cell_id.device) for n in (
            cfg.lattice_depth, cfg.lattice_height, cfg.lattice_width)), indexing="ij")
        coords = torch.stack([xs, ys, zs], dim=-1).reshape(-1, 3)
        cell_pe = lattice.position_encoding(coords.to(state.pos.dtype)).repeat(batch_size, 1)
        transformation = self.neuron(torch.cat([aggregated, cell_pe], dim=1))  # every cell
        occupied = torch.unique(cell_id)
        return CellStep(transformation.index_select(0, cell_id), occupied,
                        counts.squeeze(1).index_select(0, cell_id).sum(),
                        torch.tensor(occupied.numel(), device=cell_id.device))
