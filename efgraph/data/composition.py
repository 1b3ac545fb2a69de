"""A task that needs several *sequential* steps of routing: compositional table lookup.

``K`` lookup tables, each a fixed random permutation ``f_k`` of ``V`` values. An input names a
start value ``v_0`` and a chain of ``L`` tables ``(k_1, ..., k_L)``; the target is the value the
chain ends on (Csordas et al., "The Neural Data Router", 2021)::

    x = [onehot_V(v_0), onehot_K(k_1), ..., onehot_K(k_L)]        (V + L K wide)
    y = onehot_V(f_{k_L}( ... f_{k_2}(f_{k_1}(v_0)) ... ))          (V wide)

Each lookup is a product of a value entry and a table entry (no linear map does one: ridge
predicts about the mean value, cosine ~ ``1 / sqrt(V)``), and lookup ``j`` needs the answer of
lookup ``j - 1``: the chain length ``L`` is the number of steps a model must take one after the
other. As in :mod:`efgraph.data.routing`, both sides are rotated by fixed random orthogonal
matrices (from ``seed``) so that no architecture's axes are favoured, and rows are unit norm
(each of the ``1 + L`` parts of x has the same weight).

**What the split holds out** (``hold_out``). ``"pairs"`` (the default): nothing beyond the pairs.
There are ``V K^L`` distinct inputs, so test inputs repeat training inputs where that is small
(all of them at ``L <= 2`` with 16 values and 8 tables): a model can score by memorising inputs.
:func:`memoriser_accuracy` is the score of a perfect memoriser (right on every test input seen in
training, chance on the rest); a model above it composes lookups. For chains of two or more
lookups, ``"inputs"`` groups pairs by input (start value and chain), so no test input is a
training input and only composing scores; ``"chains"`` groups them by chain (where there are at
least ``MIN_CHAINS_TO_HOLD_OUT`` chains), so no test chain is a training chain. Every table still
appears at every position of the training chains (the tests check it for the shipped config).
Measured at ``configs/composition.yaml``'s budget (12000 steps), two lookups held out by input:
ridge, an MLP and a Transformer of the lattice's size stay at chance, and with the atoms below in
the data so do they and the lattice, one step and deep (README); a one-lookup chain is always split
by pair (a held-out table entry would be unknowable).

**Atoms in the data** (``identity``): table 0 is the identity, so a chain position naming it is a
no-op and a chain through it is a shorter chain. The data then holds single lookups and shorter
chains (about 22 % of the two-lookup pairs are single lookups at 8 tables) beside the full chains,
and under a strict split a test chain asks for a composition of lookups each seen on its own: the
test of composition where the atoms are given (Liska et al., "Memorize or generalize?", 2018).

The answer: :func:`composition_answers` returns the ``V`` value embeddings (the rotated one-hots),
so a prediction can be scored as the nearest value (``answer_accuracy``), what a user of a lookup
cares about. Known ceiling: :func:`composition_oracle` (the generator's own function) scores cosine
1 and accuracy 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from efgraph.config import COMPOSITION_HOLD_OUTS
from efgraph.data.pairs import EmbeddingPairs
from efgraph.data.synthetic import _salted

# The fewest chains (K^L) for which pairs are grouped by chain, so that test chains are not
# training chains: at the default 10 % validation and test shares this leaves each part >= 3 chains.
MIN_CHAINS_TO_HOLD_OUT = 30


def composition_dims(values: int, tables: int, chain: int) -> tuple[int, int]:
    """``(input_dim, output_dim)`` of a composition task: ``V + L * K`` and ``V``."""
    return values + chain * tables, values


def _check(values: int, tables: int, chain: int) -> None:
    for name, value, low in (("composition_values", values, 2), ("composition_tables", tables, 1),
                             ("composition_chain", chain, 1)):
        if value < low:
            raise ValueError(f"{name}: must be >= {low}, got {value}")


def composition_tables(values: int, tables: int, seed: int = 0, identity: bool = False) -> Tensor:
    """``[K, V]`` long: row ``k`` is the permutation ``f_k`` (``f_k(v) = tables[k, v]``); with
    ``identity`` row 0 is ``f_0(v) = v`` (the other rows are the same as without it)."""
    _check(values, tables, 1)
    if identity and tables < 2:
        raise ValueError(f"composition_tables: must be >= 2 with composition_identity (table 0 is the "
                         f"identity), got {tables}")
    gen = torch.Generator().manual_seed(_salted(seed, "composition-tables"))
    table = torch.argsort(torch.rand(tables, values, generator=gen), dim=1)
    if identity:
        table[0] = torch.arange(values)
    return table


def _rotations(values: int, tables: int, chain: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(_salted(seed, f"composition-rotation-{chain}"))
    in_dim, out_dim = composition_dims(values, tables, chain)
    q_in, _ = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=gen))
    q_out, _ = torch.linalg.qr(torch.randn(out_dim, out_dim, generator=gen))
    return q_in, q_out


def _encode(start: Tensor, chains: Tensor, values: int, tables: int) -> Tensor:
    """``start [N]``, ``chains [N, L]`` -> ``[N, V + L K]``: the one-hots, each part unit norm."""
    parts = [torch.nn.functional.one_hot(start, values).float()]
    parts += [torch.nn.functional.one_hot(chains[:, j], tables).float() for j in range(chains.shape[1])]
    return torch.cat(parts, dim=1)


def run_chains(start: Tensor, chains: Tensor, table: Tensor) -> Tensor:
    """The value each chain ends on: ``start [N]``, ``chains [N, L]``, ``table [K, V]`` -> ``[N]``."""
    value = start
    for j in range(chains.shape[1]):
        value = table[chains[:, j], value]
    return value


def holds_out(tables: int, chain: int, hold_out: str) -> bool:
    """Whether pairs are grouped so that test inputs are new (see the module docstring): a strict
    ``hold_out`` on chains of 2 or more lookups, for ``"chains"`` with at least
    ``MIN_CHAINS_TO_HOLD_OUT`` chains."""
    if hold_out not in COMPOSITION_HOLD_OUTS:
        raise ValueError(f"composition_hold_out: must be one of {COMPOSITION_HOLD_OUTS}, got {hold_out!r}")
    if hold_out == "pairs" or chain < 2:
        return False
    return hold_out == "inputs" or tables ** chain >= MIN_CHAINS_TO_HOLD_OUT


def make_composition_pairs(n: int, values: int, tables: int, chain: int, seed: int = 0, *,
                           hold_out: str = "pairs", identity: bool = False) -> EmbeddingPairs:
    """Draw ``n`` composition pairs (see the module docstring).

    Args:
        n: number of pairs, ``>= 1``.
        values: ``V >= 2``, values per table.
        tables: ``K >= 1``, lookup tables.
        chain: ``L >= 1``, lookups per pair.
        seed: fixes the tables, the rotations, the start values and the chains.
        hold_out: ``"pairs"``: no groups (split by pair); ``"inputs"``: each pair's group is its
            input (start value and chain, ``"7:3-0-5"``), so no test input is a training input;
            ``"chains"``: its chain (``"3-0-5"``), so no test chain is a training chain. Groups
            only where :func:`holds_out`.
        identity: table 0 is the identity (see the module docstring), ``tables >= 2``.

    Returns:
        :class:`EmbeddingPairs`, ``src [n, V + L K]``, ``tgt [n, V]``, rows unit norm, keys
        ``"composition-<i>"``; groups as ``hold_out`` says, or ``None`` (split by pair).
    """
    if n < 1:
        raise ValueError(f"synthetic_pairs: must be >= 1, got {n}")
    _check(values, tables, chain)
    table = composition_tables(values, tables, seed, identity)
    gen = torch.Generator().manual_seed(_salted(seed, f"composition-data-{chain}"))
    start = torch.randint(values, (n,), generator=gen)
    chains = torch.randint(tables, (n, chain), generator=gen)
    end = run_chains(start, chains, table)
    q_in, q_out = _rotations(values, tables, chain, seed)
    src = torch.nn.functional.normalize(_encode(start, chains, values, tables) @ q_in, dim=1)
    tgt = torch.nn.functional.one_hot(end, values).float() @ q_out  # orthogonal rows: unit norm already
    groups = None
    if holds_out(tables, chain, hold_out):
        names = ["-".join(map(str, row)) for row in chains.tolist()]
        groups = names if hold_out == "chains" else [f"{v}:{c}" for v, c in zip(start.tolist(), names)]
    return EmbeddingPairs(src=src, tgt=tgt, keys=[f"composition-{i}" for i in range(n)], groups=groups)


def composition_answers(values: int, tables: int, chain: int, seed: int = 0) -> Tensor:
    """``[V, V]``: row ``v`` is value ``v``'s target embedding (what :func:`answer_accuracy
    <efgraph.training.metrics.answer_accuracy>` picks the nearest of)."""
    _check(values, tables, chain)
    return _rotations(values, tables, chain, seed)[1].clone()


def decode_composition(src: Tensor, values: int, tables: int, chain: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Invert the input layout: ``src [N, V + L K]`` -> ``(start [N], chains [N, L])``."""
    q_in, _ = _rotations(values, tables, chain, seed)
    plain = src @ q_in.t()  # q_in is orthogonal; the row scale does not change an argmax
    start = plain[:, :values].argmax(dim=1)
    chains = plain[:, values:].view(src.shape[0], chain, tables).argmax(dim=2)
    return start, chains


def composition_oracle(src: Tensor, values: int, tables: int, chain: int, seed: int = 0,
                       identity: bool = False) -> Tensor:
    """The generator's own function: ``src [N, V + L K]`` -> the exact targets ``[N, V]``."""
    start, chains = decode_composition(src, values, tables, chain, seed)
    end = run_chains(start, chains, composition_tables(values, tables, seed, identity))
    return torch.nn.functional.one_hot(end, values).float() @ _rotations(values, tables, chain, seed)[1]


def seen_in_training(train_src: Tensor, test_src: Tensor, values: int, tables: int, chain: int,
                     seed: int = 0) -> Tensor:
    """``[N_test]`` bool: whether each test input (its start value and chain) is also a training
    input. Under ``composition_hold_out: pairs`` many are; only the others ask a model to compose.

    Args:
        train_src: ``[N_train, V + L K]``; test_src: ``[N_test, V + L K]``.
    """
    def inputs(src: Tensor) -> list[tuple[int, ...]]:
        start, chains = decode_composition(src, values, tables, chain, seed)
        return [tuple(row) for row in torch.cat([start.unsqueeze(1), chains], dim=1).tolist()]

    seen = set(inputs(train_src))
    return torch.tensor([row in seen for row in inputs(test_src)], dtype=torch.bool)


def memoriser_accuracy(train_src: Tensor, test_src: Tensor, values: int, tables: int, chain: int,
                       seed: int = 0) -> float:
    """The answer accuracy of a perfect memoriser: right on every test input that is a training
    input (:func:`seen_in_training`), right by chance (``1 / V``) on the others. A model above it
    composes lookups.

    Args:
        train_src: ``[N_train, V + L K]``; test_src: ``[N_test, V + L K]``.
    """
    known = float(seen_in_training(train_src, test_src, values, tables, chain, seed).float().mean())
    return known + (1.0 - known) / values
