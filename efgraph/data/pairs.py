"""`EmbeddingPairs`: the one container every data source in :mod:`efgraph.data` returns.

A model in this project learns a map from a *source* embedding to a *target* embedding, so a
dataset is just two row-aligned matrices. Validation happens once, here, so that every loader
(files, text, Bible, synthetic) fails with the same clear messages and downstream code can trust
the invariants: 2-D, same number of rows, at least one row, float32, finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: The labels of a per-row ``split`` column (:attr:`EmbeddingPairs.split`).
SPLIT_LABELS: tuple[str, str, str] = ("train", "validation", "test")


@dataclass
class EmbeddingPairs:
    """Row-aligned (source, target) embedding pairs.

    Attributes:
        src: FloatTensor ``[N, D_src]``; row ``i`` is the input embedding of pair ``i``.
        tgt: FloatTensor ``[N, D_tgt]``; row ``i`` is the embedding the model should produce.
            ``D_src`` and ``D_tgt`` may differ.
        keys: optional ``N`` unique strings naming each pair (e.g. ``"Genesis 1:1"``), kept so a
            prediction can be traced back to its example.
        groups: optional ``N`` strings (e.g. the Bible book); :func:`efgraph.data.split.make_split`
            keeps every group inside one split so near-duplicate neighbours cannot leak from
            train into test.
        split: optional ``N`` labels from :data:`SPLIT_LABELS` (``"train"``, ``"validation"``,
            ``"test"``): the part of each row, given by the data (a pair file's ``split`` column);
            a run then uses it instead of a random split (:func:`efgraph.data.split.split_from_labels`).
        src_seq, src_mask: optional sequence source, given together: ``src_seq`` float
            ``[N, T, d]`` and ``src_mask`` bool ``[N, T]`` (True = real token, at least one per
            row). Padded positions are *ignored*: construction sets them to zero, whatever they
            held. ``src`` stays the ``[N, D_src]`` vector every model reads (a pair file with a
            sequence source gives ``src = src_seq.flatten(1)``); a sequence model reads
            ``(src_seq, src_mask)``.

    Construction casts floating tensors to contiguous CPU float32 (what the models use) and raises
    :class:`ValueError` on any broken invariant, naming the offending tensor.
    """

    src: Tensor
    tgt: Tensor
    keys: list[str] | None = None
    groups: list[str] | None = None
    split: list[str] | None = None
    src_seq: Tensor | None = None
    src_mask: Tensor | None = None

    def __post_init__(self) -> None:
        # contiguous CPU float32, what the models use
        self.src, self.tgt = (check_embeddings(name, value, allow_empty=True, dtype=torch.float32,
                                               device="cpu").contiguous()
                              for name, value in (("src", self.src), ("tgt", self.tgt)))
        _check_aligned(self.src, self.tgt, ("src", "tgt"), same_width=False)
        n_src = self.src.shape[0]
        if n_src == 0:
            raise ValueError("empty pair set: src and tgt have 0 rows; need at least one pair")
        self.keys = _check_labels("keys", self.keys, n_src, unique=True)
        self.groups = _check_labels("groups", self.groups, n_src, unique=False)
        self.split = _check_labels("split", self.split, n_src, unique=False)
        if self.split is not None:
            bad = next((i for i, label in enumerate(self.split) if label not in SPLIT_LABELS), None)
            if bad is not None:
                raise ValueError(f"split[{bad}]: {self.split[bad]!r} is not a split label; the split column allows "
                                 f"{', '.join(SPLIT_LABELS)}")
        if (self.src_seq is None) != (self.src_mask is None):
            raise ValueError("src_seq, src_mask: a sequence source needs both (tokens [N, T, d] and mask [N, T])")
        if self.src_seq is not None:
            self.src_seq, self.src_mask = check_sequence_source(self.src_seq, self.src_mask, n_src)

    def __len__(self) -> int:
        return self.src.shape[0]

    @property
    def src_dim(self) -> int:
        """Width ``D_src`` of a source embedding."""
        return self.src.shape[1]

    @property
    def tgt_dim(self) -> int:
        """Width ``D_tgt`` of a target embedding."""
        return self.tgt.shape[1]

    def subset(self, indices: Sequence[int] | Tensor) -> EmbeddingPairs:
        """Return the pairs at ``indices`` (in that order), keys and groups included.

        Args:
            indices: ``M`` row indices in ``[0, N)``; ``M >= 1`` (an empty subset is not a valid
                pair set). Negative indices are rejected rather than wrapped, because a negative
                index in a saved split is a bug, not a request for the last row.
        Returns:
            A new :class:`EmbeddingPairs` with ``src [M, D_src]`` and ``tgt [M, D_tgt]``.
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            raise ValueError("subset: no indices given; a pair set needs at least one pair")
        n = len(self)
        bad = ((idx < 0) | (idx >= n)).nonzero()
        if bad.numel():
            raise ValueError(
                f"subset: index {int(idx[bad[0, 0]])} is out of range for {n} pairs"
            )
        rows = idx.tolist()
        return EmbeddingPairs(
            src=self.src[idx],
            tgt=self.tgt[idx],
            keys=None if self.keys is None else [self.keys[i] for i in rows],
            groups=None if self.groups is None else [self.groups[i] for i in rows],
            split=None if self.split is None else [self.split[i] for i in rows],
            src_seq=None if self.src_seq is None else self.src_seq[idx],
            src_mask=None if self.src_mask is None else self.src_mask[idx],
        )


def check_sequence_source(seq: object, mask: object, n: int | None = None) -> tuple[Tensor, Tensor]:
    """Check a sequence source and return it as ``(float32 [N, T, d] with zeros at the padded
    positions, bool [N, T])``: ``seq`` a finite float ``[N, T, d]`` (``T, d >= 1``), ``mask`` a
    bool ``[N, T]`` with at least one True per row and no real token of all zeros, ``N`` rows (when
    given). Raises ValueError
    naming ``src_seq`` or ``src_mask``."""
    if not isinstance(seq, Tensor) or seq.dim() != 3 or not seq.is_floating_point():
        what = f"{seq.dtype} shape {tuple(seq.shape)}" if isinstance(seq, Tensor) else type(seq).__name__
        raise ValueError(f"src_seq: a sequence source must be a float tensor [N, T, d], got {what}")
    if 0 in seq.shape[1:]:
        raise ValueError(f"src_seq: needs T >= 1 tokens of width d >= 1, got shape {tuple(seq.shape)}")
    if n is not None and seq.shape[0] != n:
        raise ValueError(f"src_seq: has {seq.shape[0]} rows but there are {n} pairs")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(seq.shape[:2]):
        what = f"{mask.dtype} shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"src_mask: must be a bool tensor [N, T] = {list(seq.shape[:2])} (True = real token), "
                         f"got {what}")
    empty = (~mask.any(dim=1)).nonzero()
    if empty.numel():
        raise ValueError(f"src_mask: row {int(empty[0, 0])} has no real token; every row needs at least one True")
    seq = seq.detach().to(device="cpu", dtype=torch.float32)
    mask = mask.detach().cpu()
    seq = torch.where(mask.unsqueeze(-1), seq, 0.0).contiguous()  # padding ignored: zero, whatever it held (NaN too)
    if not bool(torch.isfinite(seq).all()):
        row = int((~torch.isfinite(seq)).flatten(1).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"src_seq: contains a non-finite value (NaN or inf) at a real token: first bad row {row}")
    zero = mask & ~seq.ne(0).any(dim=-1)  # a trainer reads a batch's tokens off its zero padding
    if bool(zero.any()):
        row, token = (int(i) for i in zero.nonzero()[0])
        raise ValueError(f"src_seq: row {row} token {token} is a real token (src_mask True) of all zeros; a token of "
                         f"zeros reads as padding (efgraph.core.input_face.token_mask)")
    return seq, mask.contiguous()


def check_embeddings(
    name: str, value: object, *, allow_empty: bool = False, finite: bool = True,
    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
) -> Tensor:
    """The package's one check of an embedding matrix (pairs, splits, predictions, targets).

    ``value`` must be a floating-point ``[N, D]`` tensor (one embedding per row) with ``D >= 1``,
    ``N >= 1`` unless ``allow_empty``, and, with ``finite``, no NaN or inf. With ``dtype`` /
    ``device`` it is converted (detached) first, so that finiteness is checked in the type it will
    be used in (a float64 value too large for float32 is caught). ``finite`` reads the tensor on
    the host: leave it off inside a training step, which must not sync.

    Returns:
        ``value``, converted when ``dtype`` or ``device`` is given.

    Raises:
        ValueError: starting with ``"{name}: "``, saying what is wrong (for a non-finite value:
            the first bad row, its column and value).
    """
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name}: must be 2-D [N, D] (one embedding per row), got shape {tuple(value.shape)}")
    # Integer or bool "embeddings" are almost certainly a mix-up (e.g. token ids), so refuse
    # them instead of silently casting.
    if not value.is_floating_point():
        raise ValueError(f"{name}: must be a floating-point tensor, got dtype {value.dtype}")
    if value.shape[1] == 0:
        raise ValueError(f"{name}: has width 0; embeddings need at least one dimension")
    if value.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name}: is empty (0 rows)")
    if dtype is not None or device is not None:
        value = value.detach().to(device=device, dtype=dtype)
    if finite and value.numel():
        finite_rows = torch.isfinite(value).all(dim=1)
        if not bool(finite_rows.all()):
            row = int((~finite_rows).nonzero()[0, 0])
            col = int((~torch.isfinite(value[row])).nonzero()[0, 0])
            raise ValueError(
                f"{name}: contains a non-finite value (NaN or inf): first bad row {row} "
                f"(column {col}, value {value[row, col].item()})"
            )
    return value


def check_embedding_pair(
    a: object, b: object, names: tuple[str, str] = ("src", "tgt"), *, same_width: bool = False,
    allow_empty: bool = False, finite: bool = True,
) -> None:
    """:func:`check_embeddings` of both, then: the same rows (row ``i`` of each is pair ``i``),
    the same device, and with ``same_width`` the same width. Raises ValueError naming the
    second of ``names`` for a mismatch."""
    check_embeddings(names[0], a, allow_empty=allow_empty, finite=finite)
    check_embeddings(names[1], b, allow_empty=allow_empty, finite=finite)
    _check_aligned(a, b, names, same_width)


def _check_aligned(a: Tensor, b: Tensor, names: tuple[str, str], same_width: bool) -> None:
    first, second = names
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{second}: has {b.shape[0]} rows but {first} has {a.shape[0]} (one row per pair)")
    if same_width and a.shape[1] != b.shape[1]:
        raise ValueError(f"{second}: shape {tuple(b.shape)} does not match {first} shape {tuple(a.shape)}")
    if a.device != b.device:
        raise ValueError(f"{second}: on {b.device}, but {first} is on {a.device}")


def _check_labels(
    name: str, labels: Sequence[str] | None, n: int, *, unique: bool
) -> list[str] | None:
    """Validate an optional per-pair label list (keys or groups) of length ``n``."""
    if labels is None:
        return None
    if isinstance(labels, str):
        raise ValueError(f"{name} must be a list of strings, not a single string")
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries but there are {n} pairs")
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(label).__name__}")
    if unique and len(set(labels)) != n:
        seen: set[str] = set()
        for i, label in enumerate(labels):
            if label in seen:
                raise ValueError(f"{name} must be unique: {label!r} repeats at row {i}")
            seen.add(label)
    return labels
