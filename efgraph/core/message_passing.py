"""Message passing from flows to the occupied cells of their interaction neighbourhood.

Two pieces: :func:`neighbourhood_edges` builds the bipartite graph *flows -> occupied cells* in
which a flow is linked to every occupied cell of its own sample within ``interaction_radius``
cells (Chebyshev distance, in 3-D) of its own cell; :class:`FlowToCellConv` is the PyG
``MessagePassing`` layer that aggregates the flows' messages over that graph. With radius 0 a
cell only hears the flows inside it (each flow has one edge); with radius r >= 1 flows of one
sample that come near each other exchange information through the neuron of each other's cells.

The layer aggregates in one of two layouts, the same sums to float rounding; the step takes the one
that touches fewer rows (:func:`grid_is_cheaper`, from sizes the host knows, so no sync):

* *edges* (:meth:`FlowToCellConv.forward`, PyG's ``propagate``): every flow has one edge per offset
  of its neighbourhood, ``F (2r+1)^3`` rows, an empty or off-lattice offset sent to a dropped row.
  Neighbours are found without a spatial index: cell ids are integers ordered by (sample, z, y, x),
  the occupied ids are sorted (they come from :func:`~efgraph.core.compaction.unique_padded`), so
  "is cell n occupied, and which row is it?" is one ``searchsorted`` per (flow, offset). Offsets
  that leave the lattice are masked out before the look-up, so a neighbourhood never wraps around
  a face or reaches another sample. Its cost grows with the flows only: the layout of a large
  lattice that few flows occupy.
* *grid* (:meth:`FlowToCellConv.on_grid`): the messages are summed into a dense
  ``[samples, D, H, W]`` grid, a box sum of width ``2r+1`` along each axis (:func:`box_sum`) gives
  every cell its neighbourhood's sum, and each flow reads its own cell. Empty neighbours then cost
  one add per cell instead of a gathered row per flow: on a lattice of a few hundred cells a sample
  that tens of flows share it is the cheaper (routing: 8,320 grid rows against 41,472 edge rows,
  ``scripts/bench_step.py``; composition's first step ties, 20,800 against 20,736).
"""

from __future__ import annotations

import itertools
import math
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


def grid_is_cheaper(rows: int, grid_cells: int, radius: int) -> bool:
    """Whether the grid layout touches fewer rows than the edges: ``grid_cells`` (samples x cells,
    the padding sample included) against ``rows * (2r+1)^3`` edge rows. Both are host integers
    (static shapes when compiled)."""
    return radius > 0 and grid_cells <= rows * (2 * radius + 1) ** 3


def box_sum(grid: Tensor, radius: int) -> Tensor:
    """``[N, D, H, W, C]`` -> ``[N, D, H, W, C]``: each cell the sum over the cells within
    ``radius`` along every one of the three axes (Chebyshev distance), cells past a face counting
    as zero, so a neighbourhood never wraps around a face or reaches another sample.

    Separable: along each axis of n cells one product with the ``[n, n]`` band matrix
    ``|i - j| <= r`` (a batched matrix product, whose backward is another; shifted slices cost
    more here, each slice's backward a zeroed copy of the grid)."""
    n, d, h, w, c = grid.shape
    for batch_shape, size in (((n,), d), ((n * d,), h), ((n * d * h,), w)):
        if size > 1 and radius > 0:  # along a one-cell axis every neighbour is past a face
            index = torch.arange(size, device=grid.device)
            band = ((index.unsqueeze(0) - index.unsqueeze(1)).abs() <= radius).to(grid.dtype)
            grid = torch.matmul(band, grid.reshape(*batch_shape, size, -1))
    return grid.reshape(n, d, h, w, c)


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
        """The edges layout: ``[F, H]``, ``[F]``, ``edge_index [2, E]`` -> ``[num_cells, message_dim]``."""
        # Project on the F flows before propagating: a flow has up to (2r+1)^3 edges, and the
        # gathered rows are then message_dim wide instead of H.
        msg = self.flow_messages(flow_h, energy)
        return self.propagate(edge_index, x=(msg, None), size=(msg.size(0), num_cells))

    def message(self, x_j: Tensor) -> Tensor:
        return x_j

    def on_grid(self, flow_h: Tensor, energy: Tensor, grid_id: Tensor, grid_shape: tuple[int, int, int, int],
                radius: int) -> tuple[Tensor, Tensor]:
        """The grid layout: every flow's own cell's aggregate and how many flows that cell heard.

        Args:
            flow_h: ``[F, H]``; energy: ``[F]``.
            grid_id: ``[F]`` int64 row of each flow's cell in the row-major grid of ``grid_shape``
                (the lattice's cell id, :meth:`~efgraph.core.energy_lattice.EnergyLattice.cell_id`).
            grid_shape: ``(samples, D, H, W)``; the samples include the padding rows' own sample.
            radius: ``interaction_radius``.

        Returns:
            ``([F, message_dim], [F])``: the aggregate of the flows within ``radius`` of each flow's
            cell (its own sample only) and their count (the cell's in-degree in the edges layout).
        """
        msg = self.flow_messages(flow_h, energy)
        # the count rides along as one more column, so one box sum gives the sum and the degree
        columns = torch.cat([msg, torch.ones_like(msg[:, :1])], dim=1)
        grid = columns.new_zeros(math.prod(grid_shape), columns.size(1)).index_add(0, grid_id, columns)
        grid = box_sum(grid.view(*grid_shape, columns.size(1)), radius)
        summed = grid.view(-1, columns.size(1)).index_select(0, grid_id)
        heard = summed[:, -1]  # >= 1: a flow's own cell holds it
        aggregate = summed[:, :-1] / heard.unsqueeze(1) if self.aggr == "mean" else summed[:, :-1]
        return aggregate, heard
