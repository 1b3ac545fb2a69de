"""Count the dispatcher ops and the host-syncing ops of a block of code (CPU or GPU).

A ``TorchDispatchMode`` sees every ATen op after autograd, forward and backward alike, on any
device; so the "how many kernels and how many device -> host round-trips does a step cost" of a
GPU can be pinned by a test that runs on CPU.

A *host sync* is an op whose result's shape or value must be read by the host before the next
op can be launched: ``nonzero`` (and indexing with a boolean mask, which calls it), ``unique``,
``bincount`` (its output length is the input's max), ``masked_select``, ``repeat_interleave``
without ``output_size``, ``.item()`` / ``bool(t)`` (``_local_scalar_dense``) and a copy to the
host (``.to("cpu")``: a ``_to_copy`` with ``device=cpu``, counted on a CPU run too, where it is a
plain copy, so that the engine's one deliberate read of the device is seen by CPU tests).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {
    "aten::nonzero", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::_unique",
    "aten::bincount", "aten::masked_select", "aten::_local_scalar_dense", "aten::equal", "aten::is_nonzero",
    "aten::nonzero_static",  # static size, but still excluded from graphs on some backends: counted to be safe
}


def _is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    name = func._schema.name
    if name in _SYNC_OPS:
        return name != "aten::nonzero_static"
    if name in ("aten::index", "aten::index_put", "aten::_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    if name == "aten::_to_copy":
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu"
    if name == "aten::repeat_interleave":
        return func._overloadname.startswith("Tensor") and kwargs.get("output_size") is None and (
            len(args) < 3 or args[-1] is None)
    return False


@dataclass
class OpCount:
    """Ops seen inside a :class:`count_ops` block."""

    ops: int = 0
    syncs: int = 0
    by_name: Counter = field(default_factory=Counter)
    sync_names: Counter = field(default_factory=Counter)


class count_ops(TorchDispatchMode):
    """``with count_ops() as c: ...`` -> ``c.count`` (an :class:`OpCount`).

    Views and metadata-only ops (``view``, ``detach``, ``t``...) are dispatcher ops too but launch no
    kernel; they are counted, as the issue's budget counts every dispatcher op."""

    def __init__(self) -> None:
        super().__init__()
        self.count = OpCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = func._schema.name
        self.count.ops += 1
        self.count.by_name[name] += 1
        if _is_sync(func, args, kwargs):
            self.count.syncs += 1
            self.count.sync_names[name] += 1
        return func(*args, **kwargs)
