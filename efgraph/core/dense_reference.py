"""`DenseReferenceProcessor`: the same model, but the neuron runs on *every* cell every step.

This is what a dense lattice implementation costs: aggregation into all ``B * W * H * D`` cells
and the neuron on each of them, occupied or not. Its outputs equal :class:`FlowProcessor`'s (no
flow ever reads an empty cell), which the tests check; ``scripts/bench_forward.py`` times the two
side by side to measure what "only occupied cells cost compute" buys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from efgraph.core.flow_processor import FlowProcessor
from efgraph.core.flow_state import FlowState


class DenseReferenceProcessor(FlowProcessor):
    """A :class:`FlowProcessor` whose step evaluates the neuron on the whole lattice."""

    def cell_transformation(self, state: FlowState) -> tuple[Tensor, Tensor]:
        lattice = self.lattice
        cells_per_sample = self.config.num_cells
        batch_size = int(state.batch.max()) + 1 if state.num_flows else 0
        num_cells = batch_size * cells_per_sample
        cell_id = lattice.cell_id(state.batch, lattice.cell_coordinates(state.pos))
        aggregated = self.conv(state.h[-1], state.energy, cell_id, num_cells)  # [B*W*H*D, message]
        all_cells = torch.arange(cells_per_sample, device=cell_id.device)
        _, coords = lattice.cell_from_id(all_cells)
        cell_pe = lattice.position_encoding(coords.to(state.pos.dtype)).repeat(batch_size, 1)
        transformation = self.neuron(torch.cat([aggregated, cell_pe], dim=1))  # every cell
        return transformation.index_select(0, cell_id), torch.unique(cell_id)
