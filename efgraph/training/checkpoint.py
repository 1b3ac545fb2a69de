"""Checkpoints users can trust: atomic, loadable with ``weights_only=True``, checksummed.

A checkpoint is one ``torch.save`` file holding a plain dict::

    {
        "format": "efgraph-checkpoint", "format_version": 1,
        "model": state_dict, "optimizer": state_dict | None, "scheduler": state_dict | None,
        "step": int, "epoch": int, "config": dict, "extra": dict,
        "rng": {"python": {...}, "numpy": {...}, "torch": ByteTensor, "cuda": [ByteTensor] | None},
        "checksum": int,
    }

Why each property:

* **Atomic**: written with :func:`efgraph.data._atomic.atomic_write` (a temporary file in the same
  folder, fsynced, renamed over the target with ``os.replace``, the folder fsynced). A crash or an
  exception mid-write leaves the previous checkpoint untouched.
* **weights_only**: everything is tensors or plain Python values, so :func:`load_checkpoint` can use
  ``torch.load(..., weights_only=True)``, which never executes code from the file. Values that the
  restricted unpickler would refuse are rejected at *save* time, naming where they are.
* **Checksummed**: PyTorch's zip reader does not notice flipped bytes inside tensor data; a CRC32
  over every tensor's bytes and every plain value, verified on load, does.
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
import warnings
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from efgraph.config import ARCHITECTURE_KEYS  # noqa: F401  (re-exported for check_compatible callers)
from efgraph.data._atomic import atomic_write

FORMAT = "efgraph-checkpoint"
FORMAT_VERSION = 1
_REQUIRED_KEYS = ("format", "format_version", "model", "optimizer", "scheduler", "step", "epoch",
                  "config", "extra", "rng", "checksum")
_SCALARS = (type(None), bool, int, float, complex, str, bytes)


# ------------------------------------------------------------------------------------------------
# Plain-value checking + checksum (one walk does both, so what is checked is what is hashed)
# ------------------------------------------------------------------------------------------------
def _tensor_bytes(t: Tensor) -> np.ndarray:
    """The logical contents of ``t`` as a flat uint8 array (a view when ``t`` is contiguous on CPU)."""
    if t.is_quantized:
        t = t.int_repr()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.detach().cpu().contiguous().reshape(-1)  # reshape: a 0-d tensor cannot be re-viewed
    return t.view(torch.uint8).numpy()


def _walk(obj: Any, where: str, crc: int) -> int:
    """Return the CRC32 of ``obj`` chained onto ``crc``; raise ``TypeError`` at the first value
    that ``torch.load(weights_only=True)`` could not load back as the same value.

    Type tags go into the hash so that e.g. ``1`` and ``"1"`` or a list and a tuple differ.
    """
    if isinstance(obj, Tensor):
        header = f"T{obj.dtype}{tuple(obj.shape)};".encode()
        return zlib.crc32(_tensor_bytes(obj), zlib.crc32(header, crc))
    if isinstance(obj, (torch.dtype, torch.Size)):  # Size before tuple: it is a tuple subclass
        return zlib.crc32(f"{type(obj).__name__}{obj!r};".encode(), crc)
    # Exact types: subclasses (np.float64, IntEnum, ...) are pickled as their own class, which
    # the weights_only unpickler refuses.
    if type(obj) is float:
        # struct, not repr: repr is exact too, but the bytes make NaN payload / -0.0 explicit.
        return zlib.crc32(b"f" + struct.pack("<d", obj), crc)
    if type(obj) in _SCALARS:
        return zlib.crc32(f"{type(obj).__name__}:{obj!r};".encode(), crc)
    if type(obj) in (list, tuple):
        crc = zlib.crc32(f"{type(obj).__name__}[{len(obj)}".encode(), crc)
        for i, item in enumerate(obj):
            crc = _walk(item, f"{where}[{i}]", crc)
        return crc
    if isinstance(obj, dict) and type(obj).__module__ in ("builtins", "collections"):
        # dict and OrderedDict (state_dicts) hash alike: the unpickler may return either.
        crc = zlib.crc32(f"dict[{len(obj)}".encode(), crc)
        for key, value in obj.items():
            crc = _walk(key, f"{where} key {key!r}", crc)
            crc = _walk(value, f"{where}[{key!r}]", crc)
        return crc
    raise TypeError(
        f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored in a checkpoint "
        f"loadable with weights_only=True; use tensors, dict, list, tuple, str, int, float, bool or None"
        + (" (sets have no stable order: store a sorted list)" if isinstance(obj, (set, frozenset)) else "")
        + (" (convert with torch.from_numpy)" if isinstance(obj, np.ndarray) else "")
    )


def _to_plain(obj: Any) -> Any:
    """Turn the usual stowaways of a config (numpy scalars, paths, dataclasses) into plain values.

    Anything else is left for :func:`_walk` to reject with a message saying where it is.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _to_plain(dataclasses.asdict(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping) and not isinstance(obj, dict):
        obj = dict(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _to_plain(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_to_plain(v) for v in obj)
    return obj


# ------------------------------------------------------------------------------------------------
# RNG state
# ------------------------------------------------------------------------------------------------
def get_rng_state() -> dict[str, Any]:
    """Python ``random``, legacy global NumPy, torch CPU and (when available) CUDA RNG states,
    as tensors and plain values only.

    Python's state is ``(version, tuple of 625 ints, gauss_next)``: stored as a dict with a list.
    NumPy's is ``("MT19937", uint32[624], pos, has_gauss, cached_gaussian)``: the key array goes
    into an int64 tensor (torch's uint32 support is partial). ``np.random.default_rng`` generators
    are objects owned by the caller, not global state, and are not captured.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": int(version), "state": [int(v) for v in internal], "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(ckpt: Mapping[str, Any]) -> None:
    """Put the RNG states saved in ``ckpt`` (a loaded checkpoint, or its ``"rng"`` entry) back.

    Random numbers drawn afterwards equal those drawn right after the checkpoint was saved.
    CUDA states are restored when CUDA is available; a checkpoint saved with CUDA states restored
    on a machine without CUDA (or with fewer devices) warns instead of failing.
    """
    rng = ckpt["rng"] if "rng" in ckpt else ckpt
    py = rng["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = rng["numpy"]
    keys = npy["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((npy["bit_generator"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(rng["torch"].cpu())
    cuda_states = rng.get("cuda")
    if cuda_states:
        if not torch.cuda.is_available():
            warnings.warn("checkpoint has CUDA RNG states but CUDA is not available; not restored", stacklevel=2)
        else:
            count = torch.cuda.device_count()
            if count != len(cuda_states):
                warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda_states)} devices, this machine has "
                              f"{count}; restoring the first {min(count, len(cuda_states))}", stacklevel=2)
            for device, state in enumerate(cuda_states[:count]):
                torch.cuda.set_rng_state(state.cpu(), device)


# ------------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose state_dict keys match an unwrapped model.

    ``torch.compile`` prefixes keys with ``_orig_mod.`` and (Distributed)DataParallel with
    ``module.``; a checkpoint saved from a wrapper would not load into a bare model.
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any | None = None, step: int, epoch: int, config: Mapping[str, Any],
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Atomically write a checkpoint of the training state to ``path`` (see the module docstring).

    The RNG states are captured at the moment of the call. ``config`` may be a mapping or a
    dataclass (e.g. ``EnergyConfig``); it is stored as a plain dict. ``extra`` holds any other
    plain values (e.g. best validation loss).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: if some value could not be loaded back with ``weights_only=True``, naming it;
            nothing is written in that case.
        ValueError: if ``step`` or ``epoch`` is not a non-negative int.
    """
    path = Path(path)
    for name, value in (("step", step), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    config = _to_plain(config)
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a mapping or a dataclass, got {type(config).__name__}")

    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "epoch": int(epoch),
        "config": config,
        "extra": _to_plain(dict(extra)) if extra is not None else {},
        "rng": get_rng_state(),
    }
    # Checked before any byte is written, so a bad value never costs the previous checkpoint.
    payload["checksum"] = _walk(payload, "checkpoint", 0)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)

    # KeyboardInterrupt included: a failed write leaves the previous checkpoint and no temp file
    return atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    The checksum is verified; the returned dict no longer contains it. Restore the pieces with
    ``model.load_state_dict(ckpt["model"])``, ``optimizer.load_state_dict(ckpt["optimizer"])``,
    ``scheduler.load_state_dict(ckpt["scheduler"])`` and :func:`restore_rng_state`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming ``path`` if it is not a file, is truncated or corrupted, fails the
            checksum, or is not an efgraph checkpoint (e.g. a bare state_dict).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a file, cannot be a checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, OSError, EOFError, ... here
        raise ValueError(f"{path}: cannot read checkpoint (truncated, corrupted, or not written by save_checkpoint): "
                         f"{type(err).__name__}: {err}") from err

    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not an efgraph checkpoint (no format marker {FORMAT!r})")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {ckpt.get('format_version')!r}, "
                         f"this code reads {FORMAT_VERSION}")
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: checkpoint is missing entries {missing}")
    stored = ckpt.pop("checksum")
    actual = _walk(ckpt, "checkpoint", 0)
    if actual != stored:
        raise ValueError(f"{path}: checksum mismatch (stored {stored:#010x}, computed {actual:#010x}): corrupted")
    return ckpt


def _show(value: Any, missing: object) -> str:
    return "<missing>" if value is missing else repr(value)


def check_compatible(ckpt_config: Mapping[str, Any], config: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Raise ``ValueError`` listing every key in ``keys`` whose value differs between configs.

    Use before ``load_state_dict`` so that a checkpoint built for, say, another lattice width
    fails with the names of the settings rather than a wall of tensor shape mismatches. A key
    missing from one side counts as differing. Either config may be a mapping or a dataclass.
    """
    if isinstance(keys, str):
        # A lone string would be iterated character by character.
        raise TypeError(f"keys: expected an iterable of key names, got the string {keys!r}")
    saved, current = _to_plain(ckpt_config), _to_plain(config)
    missing = object()
    diffs = []
    for key in keys:
        a, b = saved.get(key, missing), current.get(key, missing)
        if a is missing or b is missing or a != b:
            diffs.append(f"{key}: checkpoint={_show(a, missing)}, current={_show(b, missing)}")
    if diffs:
        raise ValueError("checkpoint is incompatible with the current config: " + "; ".join(diffs))


def optimizer_state_for(model: nn.Module, optimizer: torch.optim.Optimizer, saved_optimizer: dict[str, Any],
                        saved_model: Mapping[str, Tensor], rename: Mapping[str, str]) -> dict[str, Any]:
    """``saved_optimizer`` laid out for ``optimizer`` over ``model``'s parameters, when the model
    that saved it ordered or named its parameters otherwise (a checkpoint from before the model's
    parts moved, :func:`efgraph.core.flow_processor.rename_legacy_keys` as ``rename``).

    An optimizer's state is keyed by each parameter's position, groups in order. Both optimizers
    put the same parameters into the same groups (:func:`~efgraph.training.optim.weight_decay_groups`
    decides by shape, not by place), so within each group the saved order is that of the saved
    ``state_dict``'s keys (the order ``parameters()`` had then) and the entries can be matched by name.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    saved_rank = {rename.get(k, k): i for i, k in enumerate(saved_model)}
    current = optimizer.state_dict()
    if len(current["param_groups"]) != len(saved_optimizer["param_groups"]):
        raise ValueError(f"optimizer: the checkpoint has {len(saved_optimizer['param_groups'])} parameter groups, "
                         f"this run {len(current['param_groups'])}")
    state: dict[int, Any] = {}
    for group, saved_group, live in zip(current["param_groups"], saved_optimizer["param_groups"],
                                        optimizer.param_groups):
        group_names = [names[id(p)] for p in live["params"]]
        by_saved_order = sorted(group_names, key=lambda n: saved_rank[n])
        saved_index = dict(zip(by_saved_order, saved_group["params"]))
        for index, name in zip(group["params"], group_names):
            if saved_index[name] in saved_optimizer["state"]:
                state[index] = saved_optimizer["state"][saved_index[name]]
    groups = [{**saved_group, "params": group["params"]}
              for group, saved_group in zip(current["param_groups"], saved_optimizer["param_groups"])]
    return {"state": state, "param_groups": groups}
