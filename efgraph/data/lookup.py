"""The Neural Data Router's compositional table lookup: a task where depth must extrapolate.

Csordas, Irie and Schmidhuber, "The Neural Data Router", ICLR 2022. ``V = 8`` values and ``K = 9``
lookup tables, each a random permutation ``f_k`` of the values (fixed by ``seed``). An input is a
start value ``v`` and a chain of tables ``t_1 .. t_L``; the target is ``f_{t_L}(... f_{t_1}(v))``.
A model trained on chains of at most 5 lookups is tested on chains of 6 to 10: only a model that
applies one lookup per step, as many steps as the chain asks, gets them right.

**The protocol** (:func:`lookup_benchmark`), per split; every row carries its chain length:

* ``train``: every single lookup (``L = 1``, all ``V K = 72`` inputs), plus, at each length
  ``L = 2 .. max_train_length`` (5), a ``train_fraction`` (10 %) sample of all ``V K^L`` inputs
  (start value and chain) drawn by seed from the chains that are not held back. (Sampled by input,
  so a training chain may appear with only some of its start values.)
* ``validation``: at each length ``2 .. max_train_length``, ``val_chains`` whole chains (table
  sequences, with all ``V`` start values each) that never appear in training with any start value.
  Validation lengths are training lengths: it measures composing new chains, not extrapolation.
* ``test``: at each of ``test_lengths`` (6 .. 10), ``test_chains`` distinct random chains with all
  ``V`` start values each (64 chains: 512 inputs per length, 2560 in all by default).

**Two encodings of an input** (both on every :class:`LookupSplit`):

* the token sequence ``[v, t_1, .., t_L]`` (``seq [N, T, d]``, ``mask [N, T]`` bool, True = real
  token, ``T = 1 + `` the split's longest chain): the ``V + K`` tokens (values first, then tables)
  are the rows of a random ``d x d`` orthogonal matrix (rotated one-hots, ``d >= V + K``), so they
  are unit vectors, mutually orthogonal, and favour no axis; padding positions are zero vectors.
* a fixed-width vector for vector models (``vec [N, V + 10 (K + 1)]``): the value one-hot, then
  ``MAX_VECTOR_CHAIN = 10`` chain slots, each a one-hot over the ``K`` tables or "empty", rotated
  by a fixed random orthogonal matrix and scaled to unit norm (every row has ``11`` ones before
  the scale, so the scale is the same for every row). A chain longer than 10 is refused.

**The target** is the answer value's rotated one-hot of width ``V`` (``tgt [N, V]``; the rows of
:attr:`LookupBenchmark.answers`, a random ``V x V`` orthogonal matrix), as in
:mod:`efgraph.data.composition`: the same target for both encodings (so sequence and vector models
are scored on identical targets), independent of the token width ``d``, and not the value token's
own vector (which a sequence model could copy from its input without looking anything up).
Answers are scored as the nearest value (:func:`~efgraph.training.metrics.answer_accuracy`);
:func:`lookup_oracle` (the generator's own function, from the tokens) scores 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from efgraph.data.pairs import EmbeddingPairs
from efgraph.data.synthetic import _salted

#: Chain slots of the fixed-width vector encoding; a longer chain has no vector encoding.
MAX_VECTOR_CHAIN = 10
#: Longest training length whose ``V K^L`` inputs are enumerated to sample from (``8 * 9^6 = 4.3M``).
MAX_TRAIN_LENGTH = 6
SPLIT_NAMES: tuple[str, str, str] = ("train", "validation", "test")


@dataclass
class LookupSplit:
    """One split's rows. ``N`` rows, ``T = 1 + max(lengths)`` tokens, ``L_max = max(lengths)``.

    Attributes:
        name: ``"train"``, ``"validation"`` or ``"test"`` (:attr:`split` is it per row).
        start: ``[N]`` long, the start value; chains: ``[N, L_max]`` long, table ids, ``-1`` past
            the row's length; lengths: ``[N]`` long, ``L`` of each row; answer: ``[N]`` long, the
            value the chain ends on.
        seq: ``[N, T, d]`` float32, the token sequence (zeros past the row's ``1 + L`` tokens);
            mask: ``[N, T]`` bool, True at the row's real tokens.
        vec: ``[N, V + 10 (K + 1)]`` float32, the fixed-width vector, unit rows.
        tgt: ``[N, V]`` float32, the answer value's embedding (a row of the answers matrix).
    """

    name: str
    start: Tensor
    chains: Tensor
    lengths: Tensor
    answer: Tensor
    seq: Tensor
    mask: Tensor
    vec: Tensor
    tgt: Tensor

    def __len__(self) -> int:
        return self.start.shape[0]

    @property
    def split(self) -> list[str]:
        """The split label of every row (``N`` copies of :attr:`name`)."""
        return [self.name] * len(self)

    def rows(self, indices: Tensor) -> LookupSplit:
        """The rows at ``indices`` (e.g. one chain length's: ``split.rows(split.lengths == 7)``)."""
        return LookupSplit(self.name, *(getattr(self, f)[indices] for f in
                                        ("start", "chains", "lengths", "answer", "seq", "mask", "vec", "tgt")))


@dataclass
class LookupBenchmark:
    """What :func:`lookup_benchmark` returns.

    Attributes:
        train, validation, test: :class:`LookupSplit`.
        tables: ``[K, V]`` long; ``f_k(v) = tables[k, v]``.
        tokens: ``[V + K, d]``, the token vectors (values ``0 .. V-1``, then tables).
        vector_rotation: ``[V + 10 (K + 1), same]``, the vector encoding's orthogonal matrix.
        answers: ``[V, V]``, row ``v`` is value ``v``'s target embedding.
        settings: the arguments it was made with.
    """

    train: LookupSplit
    validation: LookupSplit
    test: LookupSplit
    tables: Tensor
    tokens: Tensor
    vector_rotation: Tensor
    answers: Tensor
    settings: dict = field(default_factory=dict)

    @property
    def values(self) -> int:
        return self.tables.shape[1]

    @property
    def num_tables(self) -> int:
        return self.tables.shape[0]

    def splits(self) -> dict[str, LookupSplit]:
        return {name: getattr(self, name) for name in SPLIT_NAMES}


def _check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low} .. {high}"
        raise ValueError(f"{name}: must be an integer {allowed}, got {value!r}")


def lookup_tables(values: int = 8, tables: int = 9, seed: int = 0) -> Tensor:
    """``[K, V]`` long: row ``k`` is the random permutation ``f_k`` (fixed by ``seed``)."""
    _check_int("values", values, 2)
    _check_int("tables", tables, 1)
    gen = torch.Generator().manual_seed(_salted(seed, "lookup-tables"))
    return torch.argsort(torch.rand(tables, values, generator=gen), dim=1)


def run_lookups(start: Tensor, chains: Tensor, tables: Tensor) -> Tensor:
    """The value each chain ends on: ``start [N]``, ``chains [N, L]`` (``-1`` = past the chain's
    end: no lookup), ``tables [K, V]`` -> ``[N]``."""
    value = start.clone()
    for j in range(chains.shape[1]):
        live = chains[:, j] >= 0
        value = torch.where(live, tables[chains[:, j].clamp_min(0), value], value)
    return value


def _orthogonal(n: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # sign-fixed: a uniformly random rotation


def _digits(index: Tensor, base: int, length: int) -> Tensor:
    """``index [N]`` -> its ``length`` base-``base`` digits ``[N, length]``, most significant first."""
    out = torch.empty(index.shape[0], length, dtype=torch.long)
    rest = index.clone()
    for j in range(length - 1, -1, -1):
        out[:, j] = rest % base
        rest = rest // base
    return out


def _pad(chains: list[Tensor], width: int) -> Tensor:
    return torch.cat([F.pad(c, (0, width - c.shape[1]), value=-1) for c in chains], dim=0)


def encode_tokens(start: Tensor, chains: Tensor, tokens: Tensor, values: int) -> tuple[Tensor, Tensor]:
    """``start [N]``, ``chains [N, L_max]`` (``-1`` padded), ``tokens [V + K, d]`` ->
    ``(seq [N, 1 + L_max, d], mask [N, 1 + L_max])``, zeros at the padded positions."""
    ids = torch.cat([start.unsqueeze(1), torch.where(chains >= 0, chains + values, -1)], dim=1)  # [N, T]
    mask = ids >= 0
    seq = tokens[ids.clamp_min(0)] * mask.unsqueeze(-1)
    return seq, mask


def encode_vector(start: Tensor, chains: Tensor, values: int, tables: int, rotation: Tensor) -> Tensor:
    """``start [N]``, ``chains [N, L_max]`` (``-1`` padded, ``L_max <= 10``) -> ``[N, V + 10 (K + 1)]``,
    unit rows: the value one-hot and 10 slots of a one-hot over the tables or "empty" (the last
    entry of a slot), rotated by ``rotation``."""
    if chains.shape[1] > MAX_VECTOR_CHAIN:
        raise ValueError(f"chain length: the vector encoding has {MAX_VECTOR_CHAIN} chain slots, got chains of "
                         f"up to {chains.shape[1]} lookups; use the token encoding for longer chains")
    slots = F.pad(chains, (0, MAX_VECTOR_CHAIN - chains.shape[1]), value=-1)
    slots = torch.where(slots >= 0, slots, tables)  # "empty" is slot entry K
    plain = torch.cat([F.one_hot(start, values), F.one_hot(slots, tables + 1).flatten(1)], dim=1).float()
    return F.normalize(plain @ rotation, dim=1)


def decode_tokens(seq: Tensor, mask: Tensor, tokens: Tensor, values: int) -> tuple[Tensor, Tensor, Tensor]:
    """Invert :func:`encode_tokens`: ``-> (start [N], chains [N, T - 1] (-1 padded), lengths [N])``."""
    ids = (seq @ tokens.t()).argmax(dim=2)  # orthogonal tokens: the nearest one
    lengths = mask.sum(dim=1) - 1
    chains = torch.where(mask[:, 1:], ids[:, 1:] - values, -1)
    return ids[:, 0], chains, lengths


def decode_vector(vec: Tensor, values: int, tables: int, rotation: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Invert :func:`encode_vector`: ``-> (start [N], chains [N, 10] (-1 padded), lengths [N])``."""
    plain = vec @ rotation.t()
    start = plain[:, :values].argmax(dim=1)
    slots = plain[:, values:].view(vec.shape[0], MAX_VECTOR_CHAIN, tables + 1).argmax(dim=2)
    chains = torch.where(slots < tables, slots, -1)
    return start, chains, (chains >= 0).sum(dim=1)


def lookup_benchmark(seed: int = 0, d: int = 32, *, values: int = 8, tables: int = 9, max_train_length: int = 5,
                     train_fraction: float = 0.1, val_chains: int = 16, test_lengths: Sequence[int] = (6, 7, 8, 9, 10),
                     test_chains: int = 64) -> LookupBenchmark:
    """The compositional table lookup benchmark (see the module docstring).

    Args:
        seed: fixes the tables, the token vectors, the rotations and every sample.
        d: token width, ``>= values + tables`` (the tokens are rotated one-hots).
        values: ``V >= 2``; tables: ``K >= 2``.
        max_train_length: longest training (and validation) chain, in ``2 .. 6``, below every test length.
        train_fraction: share of all ``V K^L`` inputs of each length ``2 .. max_train_length`` in
            training, in ``(0, 1]``; the held-back chains' inputs are never drawn.
        val_chains: whole chains held back per length ``2 .. max_train_length``, ``>= 1``, at most
            half of the ``K^2`` chains of length 2.
        test_lengths: chain lengths of the test split, each in ``max_train_length + 1 .. 10``.
        test_chains: distinct chains per test length (all ``V`` start values each), ``>= 1``.
    """
    _check_int("values", values, 2)
    _check_int("tables", tables, 2)
    _check_int("d", d, values + tables)
    _check_int("max_train_length", max_train_length, 2, MAX_TRAIN_LENGTH)
    _check_int("val_chains", val_chains, 1, tables ** 2 // 2)
    _check_int("test_chains", test_chains, 1)
    if not (isinstance(train_fraction, (int, float)) and 0 < train_fraction <= 1):
        raise ValueError(f"train_fraction: must be in (0, 1], got {train_fraction!r}")
    test_lengths = list(test_lengths)
    if not test_lengths:
        raise ValueError("test_lengths: give at least one test length")
    for length in test_lengths:
        _check_int("test_lengths", length, max_train_length + 1, MAX_VECTOR_CHAIN)
    for length in test_lengths:
        if tables ** length < test_chains:
            raise ValueError(f"test_chains: {test_chains} distinct chains of length {length} do not exist "
                             f"(there are {tables ** length}); must be <= {tables ** length}")

    table = lookup_tables(values, tables, seed)
    gen = torch.Generator().manual_seed(_salted(seed, "lookup-data"))
    token_vectors = _orthogonal(d, gen)[: values + tables].contiguous()
    rotation = _orthogonal(values + MAX_VECTOR_CHAIN * (tables + 1), gen)
    answers = _orthogonal(values, gen)

    every_value = torch.arange(values)
    starts: dict[str, list[Tensor]] = {name: [] for name in SPLIT_NAMES}
    chains: dict[str, list[Tensor]] = {name: [] for name in SPLIT_NAMES}
    # every single lookup
    starts["train"].append(every_value.repeat(tables))
    chains["train"].append(torch.arange(tables).repeat_interleave(values).unsqueeze(1))
    for length in range(2, max_train_length + 1):
        n_chains = tables ** length
        held = torch.randperm(n_chains, generator=gen)[:val_chains]  # whole chains: validation
        starts["validation"].append(every_value.repeat(val_chains))
        chains["validation"].append(_digits(held, tables, length).repeat_interleave(values, dim=0))
        # input i is chain i // V with start value i % V; draw among the chains not held back
        free = torch.ones(n_chains, dtype=torch.bool)
        free[held] = False
        eligible = free.repeat_interleave(values).nonzero().squeeze(1)
        n_train = max(1, round(train_fraction * values * n_chains))
        if n_train > eligible.numel():
            raise ValueError(f"train_fraction: {train_fraction} of the {values * n_chains} inputs of length {length} "
                             f"is more than the {eligible.numel()} left after holding back {val_chains} chains")
        picked = eligible[torch.randperm(eligible.numel(), generator=gen)[:n_train]].sort().values
        starts["train"].append(picked % values)
        chains["train"].append(_digits(picked // values, tables, length))
    for length in test_lengths:
        drawn = torch.empty(0, length, dtype=torch.long)
        while drawn.shape[0] < test_chains:  # distinct chains, in the order first drawn
            more = torch.cat([drawn, torch.randint(tables, (test_chains, length), generator=gen)])
            uniq, inverse = torch.unique(more, dim=0, return_inverse=True)
            first = torch.full((uniq.shape[0],), more.shape[0], dtype=torch.long).scatter_reduce(
                0, inverse, torch.arange(more.shape[0]), reduce="amin")
            drawn = more[first.sort().values]
        starts["test"].append(every_value.repeat(test_chains))
        chains["test"].append(drawn[:test_chains].repeat_interleave(values, dim=0))

    def build(name: str) -> LookupSplit:
        width = max(c.shape[1] for c in chains[name])
        start, chain = torch.cat(starts[name]), _pad(chains[name], width)
        seq, mask = encode_tokens(start, chain, token_vectors, values)
        answer = run_lookups(start, chain, table)
        return LookupSplit(name, start, chain, (chain >= 0).sum(dim=1), answer, seq, mask,
                           encode_vector(start, chain, values, tables, rotation), answers[answer].contiguous())

    settings = dict(seed=seed, d=d, values=values, tables=tables, max_train_length=max_train_length,
                    train_fraction=train_fraction, val_chains=val_chains, test_lengths=test_lengths,
                    test_chains=test_chains)
    return LookupBenchmark(*(build(name) for name in SPLIT_NAMES), tables=table, tokens=token_vectors,
                           vector_rotation=rotation, answers=answers, settings=settings)


def lookup_oracle(bench: LookupBenchmark, seq: Tensor, mask: Tensor) -> Tensor:
    """The generator's own function, from the token encoding: ``seq [N, T, d]``, ``mask [N, T]`` ->
    the exact targets ``[N, V]`` (answer accuracy 1, cosine 1)."""
    start, chains, _ = decode_tokens(seq, mask, bench.tokens, bench.values)
    return bench.answers[run_lookups(start, chains, bench.tables)]


def lookup_pairs(bench: LookupBenchmark) -> EmbeddingPairs:
    """The whole benchmark as one pair set for ``dataset: pairs`` (save it with
    :func:`~efgraph.data.files.save_embedding_pairs`): rows train, then validation, then test, with
    their per-row ``split`` column, the token sequence as the sequence source (``src_seq [N, 11, d]``
    padded to the longest chain of all splits, ``src_mask``) and ``src`` its flattening, as a loaded
    sequence file has (the fixed-width vector encoding is not carried); ``tgt [N, V]``; keys
    ``"lookup-<split>-<i>"``; groups the chain length (``"L7"``)."""
    parts = list(bench.splits().values())
    width = max(p.seq.shape[1] for p in parts)
    seq = torch.cat([F.pad(p.seq, (0, 0, 0, width - p.seq.shape[1])) for p in parts])
    mask = torch.cat([F.pad(p.mask, (0, width - p.mask.shape[1])) for p in parts])
    return EmbeddingPairs(src=seq.flatten(1), tgt=torch.cat([p.tgt for p in parts]),
                          keys=[f"lookup-{p.name}-{i}" for p in parts for i in range(len(p))],
                          groups=[f"L{n}" for p in parts for n in p.lengths.tolist()],
                          split=[label for p in parts for label in p.split], src_seq=seq, src_mask=mask)
