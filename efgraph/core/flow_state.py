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
        valid: ``[F]`` bool, ``None`` when every row is a flow. A compiled step pads the flows to
            a bucket size (:func:`~efgraph.core.compaction.bucket_rows`) so that its graphs see
            static shapes, and no decision, budget, book or deposit counts the padding rows.
        num_valid: how many rows are flows (a host int; the rows ``valid`` marks).

    Padding rows are canonical wherever a state is made (:meth:`padded`, and every step,
    :meth:`~efgraph.core.flow_processor.FlowProcessor.decide` and ``compact``): ``batch == B`` (a
    sample of their own, one past the batch), zero ``energy``, zero ``h`` and ``c``, ``pos``
    (0, 0, 0) and ``flow_id`` -1. Their decisions (fates, spawns, counts) are still masked by
    ``valid``: a zero energy is below every threshold, and a padding row must not count as a death.
    """

    h: Tensor
    c: Tensor | None
    pos: Tensor
    energy: Tensor
    batch: Tensor
    flow_id: Tensor
    valid: Tensor | None = None
    num_valid: int | None = None

    @property
    def num_flows(self) -> int:
        """Rows, padding included (the size of every tensor)."""
        return self.energy.size(0)

    @property
    def num_active(self) -> int:
        """Flows, padding excluded."""
        return self.num_flows if self.valid is None else self.num_valid

    def without_rows(self) -> "FlowState":
        """No flow: every tensor with 0 rows (what follows a step in which every flow ended)."""
        return FlowState(h=self.h[:, :0], c=None if self.c is None else self.c[:, :0], pos=self.pos[:0],
                         energy=self.energy[:0], batch=self.batch[:0], flow_id=self.flow_id[:0])

    def padded(self, rows: int, batch_size: int) -> "FlowState":
        """These flows followed by canonical padding rows up to ``rows`` (see the class docstring)."""
        assert self.valid is None and rows >= self.num_flows
        n, extra = self.num_flows, rows - self.num_flows
        h_pad = self.h.new_zeros(self.h.size(0), extra, self.h.size(2))
        return FlowState(
            h=torch.cat([self.h, h_pad], dim=1),
            c=None if self.c is None else torch.cat([self.c, h_pad], dim=1),
            pos=torch.cat([self.pos, self.pos.new_zeros(extra, 3)]),
            energy=torch.cat([self.energy, self.energy.new_zeros(extra)]),
            batch=torch.cat([self.batch, self.batch.new_full((extra,), batch_size)]),
            flow_id=torch.cat([self.flow_id, self.flow_id.new_full((extra,), -1)]),
            valid=torch.arange(rows, device=self.energy.device) < n,
            num_valid=n,
        )
