"""`FlowState`: all active flows of a batch as struct-of-arrays tensors.

Built fresh inside every forward and never stored on a module, so no autograd graph outlives its
batch. Compaction always produces *new* tensors (``index_select`` / ``cat``); nothing is written
in place into a long-lived buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FlowState:
    """F active flows.

    Attributes:
        h: ``[L, F, H]`` carrier hidden state (one slice per recurrent layer).
        c: ``[L, F, H]`` LSTM cell state, or ``None`` for a GRU carrier.
        pos: ``[F, 3]`` continuous (x, y, z); ``z < D-1`` for every active flow.
        energy: ``[F]`` in (0, 1].
        batch: ``[F]`` int64 sample index.
        flow_id: ``[F]`` int64 id, unique within the forward (for tracing paths).
    """

    h: Tensor
    c: Tensor | None
    pos: Tensor
    energy: Tensor
    batch: Tensor
    flow_id: Tensor

    @property
    def num_flows(self) -> int:
        return self.energy.size(0)

    def select(self, index: Tensor) -> "FlowState":
        """The flows at ``index`` (``[K]`` int64), as fresh tensors."""
        assert index.dtype == torch.long, f"select needs int64 indices, got {index.dtype}"
        return FlowState(
            h=self.h.index_select(1, index),
            c=None if self.c is None else self.c.index_select(1, index),
            pos=self.pos.index_select(0, index),
            energy=self.energy.index_select(0, index),
            batch=self.batch.index_select(0, index),
            flow_id=self.flow_id.index_select(0, index),
        )

    @staticmethod
    def cat(states: list["FlowState"]) -> "FlowState":
        return FlowState(
            h=torch.cat([s.h for s in states], dim=1),
            c=None if states[0].c is None else torch.cat([s.c for s in states], dim=1),
            pos=torch.cat([s.pos for s in states], dim=0),
            energy=torch.cat([s.energy for s in states], dim=0),
            batch=torch.cat([s.batch for s in states], dim=0),
            flow_id=torch.cat([s.flow_id for s in states], dim=0),
        )
