"""Count the dispatcher ops and the host-syncing ops of a block of code (CPU or GPU).

A ``TorchDispatchMode`` sees every ATen op after autograd, forward and backward alike, on any
device; so the "how many kernels and how many device -> host round-trips does a step cost" of a
GPU can be pinned by a test that runs on CPU.

A *host sync* is anything that makes the host wait for a value of a device tensor. Two layers
catch them, and one read counts once:

* ops, in the dispatcher: those whose result's shape or value the host must read before the next
  op can be launched: ``nonzero`` (and indexing with a boolean mask, which calls it), ``unique``,
  ``bincount`` (its output length is the input's max), ``masked_select``, ``repeat_interleave``
  without ``output_size``, ``equal``, ``_local_scalar_dense`` (what ``.item()``, ``bool(t)``,
  ``int(t)``, ``float(t)`` dispatch to) and a copy to the host (a ``_to_copy`` with
  ``device=cpu``);
* reads, in a ``TorchFunctionMode`` over Python's tensor methods: ``.tolist()``, ``.numpy()``,
  ``np.asarray(t)``, ``.item()``, ``bool()`` / ``int()`` / ``float()`` / ``complex()`` /
  ``operator.index()`` of a tensor, formatting or ``repr`` of a tensor, and ``.cpu()`` /
  ``.to("cpu")``. On a CPU run ``.tolist()``, ``.numpy()`` and ``.cpu()`` dispatch no op at all
  (the data is already on the host, and ``.cpu()`` returns the tensor itself), so only this layer
  sees them; on CUDA each of them is a device -> host copy.

Device or host. On a CUDA run a tensor lives on the device when ``t.device`` says so. On a CPU
run every tensor plays the device's part (``cpu_is_device=True``, the default), so that a CPU
test pins what a GPU would pay, *except* the host copies made inside the block: the result of a
counted copy to the host (``.cpu()``, ``.to("cpu")``, ``read_counts``' copy), its views, and what
ops compute from host copies alone. Reading those is free (it is on CUDA too): the engine's one
deliberate read, ``stack(counts).to("cpu", copy=True).tolist()``, counts once.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

_SYNC_OPS = {
    "aten::nonzero", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::_unique",
    "aten::bincount", "aten::masked_select", "aten::_local_scalar_dense", "aten::equal", "aten::is_nonzero",
    "aten::nonzero_static",  # static size, but still excluded from graphs on some backends: counted to be safe
}

# Python-level tensor methods that read a tensor's data on the host (each a sync for a device tensor)
_READS = {getattr(torch.Tensor, name): f"Tensor.{name}" for name in (
    "tolist", "numpy", "__array__", "item", "__bool__", "__int__", "__float__", "__complex__", "__index__",
    "__format__", "__repr__",
)}
# ... and those that copy it to the host when asked for the CPU
_COPIES = {torch.Tensor.cpu: "Tensor.cpu", torch.Tensor.to: "Tensor.to(cpu)"}


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


def _to_targets_cpu(args: tuple, kwargs: dict) -> bool:
    """Whether ``Tensor.to(*args[1:], **kwargs)`` asks for the CPU."""
    kwargs = {k: v for k, v in kwargs.items() if k != "copy"}
    rest = list(args[1:])
    if len(rest) >= 4 and isinstance(rest[3], bool):  # to(device, dtype, non_blocking, copy)
        del rest[3]
    try:
        device = torch._C._nn._parse_to(*rest, **kwargs)[0]
    except (TypeError, RuntimeError):
        return False  # a form not parsed here: a real copy still shows up as aten::_to_copy
    return device is not None and device.type == "cpu"


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


@dataclass
class OpCount:
    """Ops seen inside a :class:`count_ops` block."""

    ops: int = 0
    syncs: int = 0
    by_name: Counter = field(default_factory=Counter)
    sync_names: Counter = field(default_factory=Counter)


class _HostReads(TorchFunctionMode):
    """The Python-level half of :class:`count_ops`: reads of a tensor's data by the host."""

    def __init__(self, owner: "count_ops") -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        owner = self.owner
        name = _READS.get(func)
        if name is None and func in _COPIES and (func is torch.Tensor.cpu or _to_targets_cpu(args, kwargs)):
            name = _COPIES[func]
        if name is None or not args or not isinstance(args[0], torch.Tensor) or not owner.on_device(args[0]):
            return func(*args, **kwargs)
        # one read, one sync: the sync ops it dispatches (a _to_copy on CUDA) are folded into it
        owner._in_read = []
        try:
            out = func(*args, **kwargs)
        finally:
            inner, owner._in_read = owner._in_read, None
        owner._count_sync(inner[0] if inner else name)
        if func in _COPIES:
            if out is args[0]:
                # a CPU run: the "copy" is the tensor itself; hand back an alias to play the host
                # copy, so that the device tensor is not taken for a host one from now on
                with _disable_current_modes():
                    out = out.view_as(out)
            owner._mark_host(out)
        return out


class count_ops(TorchDispatchMode):
    """``with count_ops() as c: ...`` -> ``c.count`` (an :class:`OpCount`).

    Views and metadata-only ops (``view``, ``detach``, ``t``...) are dispatcher ops too but launch no
    kernel; they are counted, as the issue's budget counts every dispatcher op. Host reads seen
    only in Python (``.tolist()`` ...) count as syncs, not as ops.

    Args:
        cpu_is_device: on a CPU run, take every CPU tensor not copied to the host inside the block
            for a device tensor (see the module docstring). Pass ``False`` on a CUDA run to count
            only reads of tensors that really are on the GPU.
    """

    def __init__(self, cpu_is_device: bool = True) -> None:
        super().__init__()
        self.count = OpCount()
        self.cpu_is_device = cpu_is_device
        self._host: set[int] = set()  # ids of the host copies made in the block (and of their views)
        self._in_read: list[str] | None = None
        self._reads = _HostReads(self)

    def __enter__(self) -> "count_ops":
        super().__enter__()
        self._reads.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._reads.__exit__(*exc)
        finally:
            super().__exit__(*exc)

    def on_device(self, t: torch.Tensor) -> bool:
        """Would the host wait for the device to read ``t``?"""
        if t.device.type == "meta":
            return False
        if t.device.type != "cpu":
            return True
        return self.cpu_is_device and id(t) not in self._host

    def _mark_host(self, out: Any) -> None:
        # by object, not by storage: on a CPU run a host copy may share the device tensor's storage
        for t in _tensors(out):
            if t.device.type == "cpu" and id(t) not in self._host:
                self._host.add(id(t))
                weakref.finalize(t, self._host.discard, id(t))

    def _count_sync(self, name: str) -> None:
        if self._in_read is not None:  # inside a Python-level read: it counts once, there
            self._in_read.append(name)
            return
        self.count.syncs += 1
        self.count.sync_names[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = func._schema.name
        self.count.ops += 1
        self.count.by_name[name] += 1
        sync = _is_sync(func, args, kwargs)
        inputs = _tensors((args, kwargs)) if sync or self._host else []
        from_device = any(self.on_device(t) for t in inputs)
        if sync and (from_device or not inputs):
            self._count_sync(name)
        out = func(*args, **kwargs)
        if sync and name == "aten::_to_copy" and from_device:
            self._mark_host(out)  # a copy to the host
        elif self._host and inputs and not from_device:
            self._mark_host(out)  # computed from host copies alone: on the host
        return out
