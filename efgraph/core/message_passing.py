"""`FlowToCellConv`: one message-passing step from flows to the cells they occupy."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter


class FlowToCellConv(MessagePassing):
    r"""Aggregate flow messages into their occupied cells on the bipartite graph flows -> cells.

    .. math::
        \bar m_c = \operatorname*{AGG}_{f \,:\, \mathrm{cell}(f) = c} W h_f + e_f w_e + b

    with AGG = mean or sum (``config.aggregation``). Each flow has exactly one edge, to its cell,
    so the graph has F edges and C target nodes, and only occupied cells exist in it.

    Args:
        hidden_dim: carrier hidden size H (messages read the top layer's state).
        message_dim: width of a message.
        aggregation: ``"mean"`` or ``"sum"``.

    Shapes:
        input: flow state ``[F, H]``, energy ``[F]``, cell index ``[F]`` in ``[0, C)``, ``C``.
        output: ``[C, message_dim]``.
    """

    def __init__(self, hidden_dim: int, message_dim: int, aggregation: str = "mean") -> None:
        super().__init__(aggr=aggregation)
        self.aggregation = aggregation
        self.lin = nn.Linear(hidden_dim, message_dim)
        self.energy_weight = nn.Parameter(torch.empty(message_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.lin.reset_parameters()
        nn.init.uniform_(self.energy_weight, -1.0, 1.0)

    def forward(self, flow_h: Tensor, energy: Tensor, cell_index: Tensor, num_cells: int) -> Tensor:
        # Project on the F flows before propagating: with one edge per flow the projection would
        # cost the same per edge, but this keeps the gathered rows narrow (message_dim, not H).
        # The energy enters as its own column (W [h, e] = W_h h + e w_e) to avoid copying h.
        msg = torch.addcmul(self.lin(flow_h), energy.unsqueeze(1), self.energy_weight)
        num_flows = msg.size(0)
        edge_index = torch.stack([torch.arange(num_flows, device=msg.device), cell_index])
        return self.propagate(edge_index, x=(msg, None), size=(num_flows, num_cells))

    def message(self, x_j: Tensor) -> Tensor:
        return x_j

    def aggregate(self, inputs: Tensor, index: Tensor, ptr: Tensor | None = None, dim_size: int | None = None) -> Tensor:
        return scatter(inputs, index, dim=0, dim_size=dim_size, reduce=self.aggregation)
