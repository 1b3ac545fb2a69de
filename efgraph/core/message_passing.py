"""Message passing from flows to the occupied cells of their interaction neighbourhood.

Two pieces: :func:`neighbourhood_edges` builds the bipartite graph *flows -> occupied cells* in
which a flow is linked to every occupied cell of its own sample within ``interaction_radius``
cells (Chebyshev distance, in 3-D) of its own cell; :class:`FlowToCellConv` is the PyG
``MessagePassing`` layer that aggregates the flows' messages over that graph. With radius 0 a
cell only hears the flows inside it (each flow has one edge); with radius r >= 1 flows of one
sample that come near each other exchange information through the neuron of each other's cells.

Neighbours are found without a spatial index: cell ids are integers ordered by (sample, z, y, x),
the occupied ids are sorted (they come from :func:`~efgraph.core.compaction.unique_padded`), so
"is cell n occupied, and which row is it?" is one ``searchsorted`` per (flow, offset). Offsets that leave the lattice are masked
out before the look-up, so a neighbourhood never wraps around a face or reaches another sample.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing


def neighbourhood_offsets(radius: int) -> Tensor:
    """All ``(2r+1)^3`` integer offsets ``[K, 3]`` (dx, dy, dz) with ``max(|d|) <= radius``."""
    if radius < 0:
        raise ValueError(f"interaction_radius: must be >= 0, got {radius}")
    steps = range(-radius, radius + 1)
    return torch.tensor(list(itertools.product(steps, steps, steps)), dtype=torch.long)


def neighbourhood_edges(
    flow_cell: Tensor,
    flow_batch: Tensor,
    occupied_id: Tensor,
    cell_index: Tensor,
    offsets: Tensor,
    lattice_size: Tensor,
    id_of: Callable[[Tensor, Tensor], Tensor],
    miss_row: int,
) -> Tensor:
    """Edges ``[2, F*K]`` (flow row, occupied-cell row) of the interaction graph, at a static size.

    Args:
        flow_cell: ``[F, 3]`` int64 cell (x, y, z) of each flow.
        flow_batch: ``[F]`` sample of each flow.
        occupied_id: ``[N]`` ids of the occupied cells, ascending (padding rows after them must
            hold ids that match no cell, see :func:`efgraph.core.compaction.unique_padded`).
        cell_index: ``[F]`` row of each flow's own cell in ``occupied_id``.
        offsets: ``[K, 3]`` from :func:`neighbourhood_offsets`.
        lattice_size: ``[3]`` int64 (W, H, D).
        id_of: ``(batch [N], cell [N, 3]) -> id [N]``, the lattice's cell id.
        miss_row: target row of the edges whose offset cell is empty or off the lattice.

    Returns:
        ``[2, F*K]`` int64: row 0 the flow, row 1 the occupied cell it sends to, or ``miss_row``
        (an extra aggregation row the caller drops). Every flow has an edge to its own cell. The
        misses are kept instead of being filtered out because filtering (a boolean mask) returns a
        data-dependent size, i.e. a host sync on a GPU; an edge into a dropped row costs one
        gathered message of ``message_dim`` floats.
    """
    num_flows = flow_cell.size(0)
    if offsets.size(0) == 1:  # radius 0: only the own cell, no look-up needed
        return torch.stack([torch.arange(num_flows, device=flow_cell.device), cell_index])
    neighbour = flow_cell.unsqueeze(1) + offsets.unsqueeze(0)  # [F, K, 3]
    inside = (neighbour >= 0).all(dim=2) & (neighbour < lattice_size).all(dim=2)  # [F, K]
    k = offsets.size(0)
    neighbour_id = id_of(flow_batch.unsqueeze(1).expand(-1, k).reshape(-1), neighbour.reshape(-1, 3)).view(num_flows, k)
    row = torch.searchsorted(occupied_id, neighbour_id).clamp(max=occupied_id.numel() - 1)
    hit = inside & (occupied_id.index_select(0, row.flatten()).view_as(row) == neighbour_id)
    flow = torch.arange(num_flows, device=flow_cell.device).unsqueeze(1).expand_as(row)
    return torch.stack([flow.reshape(-1), torch.where(hit, row, miss_row).reshape(-1)])


class FlowToCellConv(MessagePassing):
    r"""Aggregate flow messages into occupied cells over the interaction graph.

    .. math::
        \bar m_c = \operatorname*{AGG}_{f \,:\, \|\mathrm{cell}(f) - c\|_\infty \le r} W h_f + e_f w_e + b

    with AGG = mean or sum (``config.aggregation``), taken over the flows of the same sample whose
    cell lies within ``r = interaction_radius`` cells of ``c`` (``c`` itself included). The graph
    is bipartite flows -> cell rows (``size=(F, num_cells)``): the engine passes its padded rows
    plus one row for the edges to empty cells, and drops the rows no flow reads.

    Args:
        hidden_dim: carrier hidden size H (messages read the top layer's state).
        message_dim: width of a message.
        aggregation: ``"mean"`` or ``"sum"``.

    Shapes:
        input: flow state ``[F, H]``, energy ``[F]``, ``edge_index [2, E]`` (flow, cell), ``C``.
        output: ``[C, message_dim]``.
    """

    def __init__(self, hidden_dim: int, message_dim: int, aggregation: str = "mean") -> None:
        super().__init__(aggr=aggregation, flow="source_to_target")
        self.lin = nn.Linear(hidden_dim, message_dim)
        self.energy_weight = nn.Parameter(torch.empty(message_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.lin.reset_parameters()
        nn.init.uniform_(self.energy_weight, -1.0, 1.0)

    def flow_messages(self, flow_h: Tensor, energy: Tensor) -> Tensor:
        """``[F, H]``, ``[F]`` -> ``[F, message_dim]``: each flow's message, before aggregation.

        The energy enters as its own column (``W [h, e] = W_h h + e w_e``) so that h is never copied."""
        return torch.addcmul(self.lin(flow_h), energy.unsqueeze(1), self.energy_weight)

    def forward(self, flow_h: Tensor, energy: Tensor, edge_index: Tensor, num_cells: int) -> Tensor:
        # Project on the F flows before propagating: a flow has up to (2r+1)^3 edges, and the
        # gathered rows are then message_dim wide instead of H.
        msg = self.flow_messages(flow_h, energy)
        return self.propagate(edge_index, x=(msg, None), size=(msg.size(0), num_cells))

    def message(self, x_j: Tensor) -> Tensor:
        return x_j
