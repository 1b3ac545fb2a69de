"""Load and save precomputed (source, target) embedding pairs from disk.

Supported formats (chosen by the file extension):

``.pt``
    ``torch.save({"src": Tensor[N, D_src], "tgt": Tensor[N, D_tgt]}, path)``. Loaded with
    ``torch.load(weights_only=True)``, so a file carrying arbitrary pickled Python objects is
    refused instead of executed. ``"source"``/``"target"`` are accepted as aliases. Optional
    ``"keys"``/``"groups"``: lists of ``N`` strings.
``.npz``
    ``numpy.savez(path, src=..., tgt=...)`` (aliases as above), loaded with
    ``allow_pickle=False``. Optional ``keys``/``groups``: 1-D string arrays.
``.safetensors``
    Tensors ``src`` and ``tgt`` (aliases as above). Optional ``keys``/``groups`` are stored as
    JSON lists in the file's string metadata, since safetensors holds only numeric tensors.
``.npy``
    A ``.npy`` file holds exactly one array and a pair needs two, so ``.npy`` pairs are two
    sibling files ``<stem>.src.npy`` and ``<stem>.tgt.npy``. Pass either one; the other is found
    by swapping ``src``/``tgt`` in the name. (Stacking both into one ``[N, 2, D]`` array would
    force ``D_src == D_tgt``, which this project does not assume.)

**Optional per-row split** (``split``, stored like ``keys``/``groups``): ``N`` labels from
``train``, ``validation``, ``test``. With it a run uses the file's split instead of a random one
(:func:`efgraph.data.split.split_from_labels`; the log says so).

**Optional sequence source** (``.pt``, ``.npz``, ``.safetensors``): ``src`` may be ``[N, T, d]``
(tokens) with a bool ``mask [N, T]`` (True = real token, at least one per row; alias
``src_mask``). Padded positions are ignored (set to zero on load). The pairs then hold
``src_seq``/``src_mask`` for a sequence model and ``src = src_seq.flatten(1)`` (``[N, T d]``) for
every vector model; a ``[N, D]`` ``src`` (no mask) is read exactly as before.

Every error is a :class:`ValueError` whose message starts with the file path.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from efgraph.data._atomic import atomic_write
from efgraph.data.pairs import EmbeddingPairs, check_sequence_source

#: Extensions :func:`load_embedding_pairs` understands, in the order they are listed in errors.
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".pt", ".npz", ".safetensors", ".npy")

# Accepted spellings of the two required entries; the first is the canonical one written by
# save_embedding_pairs.
_SRC_NAMES = ("src", "source")
_TGT_NAMES = ("tgt", "target")
_MASK_NAMES = ("mask", "src_mask")
# Optional per-row string columns.
_LABEL_NAMES = ("keys", "groups", "split")


def load_embedding_pairs(path: str | os.PathLike[str]) -> EmbeddingPairs:
    """Load precomputed embedding pairs from ``path`` (format chosen by its extension).

    Args:
        path: a ``.pt``, ``.npz``, ``.safetensors`` file, or one of a ``<stem>.src.npy`` /
            ``<stem>.tgt.npy`` pair (see the module docstring).
    Returns:
        :class:`EmbeddingPairs` with ``src [N, D_src]`` and ``tgt [N, D_tgt]`` as float32 (and,
        for a sequence source, ``src_seq [N, T, d]``, ``src_mask [N, T]``, ``src [N, T d]``).
    Raises:
        FileNotFoundError: the file (or the sibling ``.npy`` file) does not exist.
        ValueError: unknown extension, a pickle-bearing ``.pt``, missing ``src``/``tgt``
            entries, mismatched row counts, an empty set, non-finite values, malformed
            keys/groups. The message names the file.
    """
    path = Path(path)
    ext = _extension(path)
    if ext == ".npy":
        src_path, tgt_path = npy_pair_paths(path)
        for p in (src_path, tgt_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no such file (.npy pairs need both "
                                        f"{src_path.name} and {tgt_path.name})")
        entries: Mapping[str, Any] = {"src": _load_npy(src_path), "tgt": _load_npy(tgt_path)}
    else:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        loader = {".pt": _load_pt, ".npz": _load_npz, ".safetensors": _load_safetensors}[ext]
        entries = loader(path)
    try:
        return _entries_to_pairs(entries)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def save_embedding_pairs(pairs: EmbeddingPairs, path: str | os.PathLike[str]) -> Path:
    """Write ``pairs`` to ``path`` in the format named by its extension (atomically).

    The output loads back with :func:`load_embedding_pairs` to equal tensors, keys and groups.
    For ``.npy`` two files ``<stem>.src.npy`` and ``<stem>.tgt.npy`` are written (``path`` may
    name either) and keys/groups are not stored, because a bare array has nowhere to put them.

    Returns:
        The path written (for ``.npy``: the ``.src.npy`` file).
    """
    path = Path(path)
    ext = _extension(path)
    sequence = pairs.src_seq is not None
    src = (pairs.src_seq if sequence else pairs.src).contiguous()  # a sequence source: its tokens
    tgt = pairs.tgt.contiguous()
    tensors = {"src": src, "tgt": tgt, **({"mask": pairs.src_mask.contiguous()} if sequence else {})}
    labels = {name: list(getattr(pairs, name)) for name in _LABEL_NAMES if getattr(pairs, name) is not None}
    if ext == ".pt":
        obj: dict[str, Any] = {**tensors, **labels}
        return atomic_write(path, lambda tmp: torch.save(obj, tmp))
    if ext == ".npz":
        arrays: dict[str, np.ndarray] = {name: t.numpy() for name, t in tensors.items()}
        arrays.update({name: np.asarray(values, dtype=np.str_) for name, values in labels.items()})
        return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
    if ext == ".safetensors":
        from safetensors.torch import save_file

        metadata = {name: json.dumps(values) for name, values in labels.items()}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    if sequence:
        raise ValueError(f"{path}: a .npy pair cannot hold a sequence source's mask; save it as .pt, .npz or "
                         ".safetensors")
    src_path, tgt_path = npy_pair_paths(path)
    atomic_write(tgt_path, lambda tmp: np.save(tmp, tgt.numpy()))
    return atomic_write(src_path, lambda tmp: np.save(tmp, src.numpy()))


def npy_pair_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Return ``(<stem>.src.npy, <stem>.tgt.npy)`` for either member of a ``.npy`` pair."""
    path = Path(path)
    name = path.name
    for role in ("src", "tgt"):
        suffix = f".{role}.npy"
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return path.with_name(f"{stem}.src.npy"), path.with_name(f"{stem}.tgt.npy")
    raise ValueError(
        f"{path}: a .npy pair must be two files named <stem>.src.npy and <stem>.tgt.npy "
        f"(one array each); got {name!r}. Alternatively save both arrays in one .npz file."
    )


# --- format readers: each returns a mapping of entry name -> tensor/array/list -------------------


def _extension(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"{path}: unknown extension {ext or '(none)'!r}; supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}"
        )
    return ext


def _load_pt(path: Path) -> Mapping[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True raises UnpicklingError for any global outside torch's allowlist.
        # Never retry with weights_only=False: that would execute code from the file.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: refusing to load: the file contains pickled Python objects that "
            f"torch.load(weights_only=True) does not allow ({first_line}). Re-save it as a "
            "plain dict of tensors, e.g. torch.save({'src': src, 'tgt': tgt}, path)."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable torch file: {e}") from e
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path}: expected a dict with entries 'src' and 'tgt', got {type(obj).__name__}"
        )
    return obj


def _load_npz(path: Path) -> Mapping[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as e:
        # numpy raises ValueError for object arrays that would need pickle.
        raise ValueError(f"{path}: cannot read .npz without pickle: {e}") from e
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz file: {e}") from e


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: cannot read .npy without pickle: {e}") from e
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file: {e}") from e


def _load_safetensors(path: Path) -> Mapping[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            entries: dict[str, Any] = {name: f.get_tensor(name) for name in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from e
    for name in _LABEL_NAMES:
        if name in metadata:
            try:
                entries[name] = json.loads(metadata[name])
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: metadata {name!r} is not a JSON list: {e}") from e
    return entries


# --- shared conversion ---------------------------------------------------------------------------


def _entries_to_pairs(entries: Mapping[str, Any]) -> EmbeddingPairs:
    src = _as_tensor("src", _pick(entries, _SRC_NAMES))
    tgt = _as_tensor("tgt", _pick(entries, _TGT_NAMES))
    has_mask = any(name in entries for name in _MASK_NAMES)
    seq = mask = None
    if src.dim() == 3 or has_mask:
        if not has_mask:
            raise ValueError(f"src: shape {tuple(src.shape)} is a sequence source [N, T, d], which needs a bool "
                             "entry 'mask' [N, T] (True = real token)")
        if src.dim() != 3:
            raise ValueError(f"mask: given, but src has shape {tuple(src.shape)}; a mask goes with a sequence "
                             "source src [N, T, d]")
        seq, mask = check_sequence_source(src, _as_tensor("mask", _pick(entries, _MASK_NAMES)))
        src = seq.flatten(1)  # what a vector model reads: every token, padding zero
    return EmbeddingPairs(
        src=src,
        tgt=tgt,
        **{name: _as_labels(name, entries.get(name)) for name in _LABEL_NAMES},
        src_seq=seq,
        src_mask=mask,
    )


def _pick(entries: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    present = [n for n in names if n in entries]
    if not present:
        found = ", ".join(repr(k) for k in entries) or "(none)"
        raise ValueError(
            f"missing entry {names[0]!r} (or {names[1]!r}); found entries: {found}"
        )
    if len(present) > 1:
        raise ValueError(f"ambiguous: both {present[0]!r} and {present[1]!r} are present")
    return entries[present[0]]


def _as_tensor(name: str, value: Any) -> Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"{name} is an object array; expected numbers")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a tensor/array, got {type(value).__name__}")
    return value


def _as_labels(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind != "U":
            raise ValueError(f"{name} must be a 1-D string array, got {value.dtype} "
                             f"shape {value.shape}")
        return [str(v) for v in value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of strings, got {type(value).__name__}")
    return list(value)
