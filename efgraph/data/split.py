"""Deterministic train / validation / test splits, by index or by group.

With ``groups`` (e.g. the Bible book of each verse) whole groups go to one part, so that
near-duplicate neighbours (consecutive verses, parallel passages in the same book) cannot sit on
both sides of the train/test line and inflate test scores. A :class:`Split` is plain sorted index
lists that can be saved with a run (:meth:`Split.to_json`) and reloaded exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from efgraph.data._atomic import atomic_write
from efgraph.data.pairs import EmbeddingPairs

PART_NAMES: tuple[str, str, str] = ("train", "validation", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)

_JSON_FORMAT = "efgraph.split/v1"


@dataclass(frozen=True)
class Split:
    """Three disjoint sorted index lists that together cover ``range(n)``.

    Attributes:
        train, validation, test: row indices into the pair set. A part may be empty only if it
            was requested with fraction 0.
    """

    train: list[int]
    validation: list[int]
    test: list[int]

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for name in PART_NAMES:
            part = getattr(self, name)
            if not isinstance(part, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in part
            ):
                raise ValueError(f"split part {name!r} must be a list of ints")
            if part != sorted(part):
                raise ValueError(f"split part {name!r} must be sorted")
            for i in part:
                if i < 0:
                    raise ValueError(f"split part {name!r} holds a negative index {i}")
                if i in seen:
                    raise ValueError(f"index {i} is in both {seen[i]!r} and {name!r}")
                seen[i] = name
        n = len(seen)
        if n == 0:
            raise ValueError("split is empty: all three parts have no indices")
        missing = sorted(set(range(n)) - seen.keys())
        if missing:
            raise ValueError(
                f"split does not cover 0..{n - 1}: index {missing[0]} is missing "
                f"(largest index present: {max(seen)})"
            )

    @property
    def n(self) -> int:
        """Total number of indices (= number of pairs the split was made for)."""
        return len(self.train) + len(self.validation) + len(self.test)

    def apply(
        self, pairs: EmbeddingPairs
    ) -> tuple[EmbeddingPairs, EmbeddingPairs | None, EmbeddingPairs | None]:
        """Cut ``pairs`` into (train, validation, test); an empty part gives None."""
        if len(pairs) != self.n:
            raise ValueError(f"split is for {self.n} pairs but the pair set has {len(pairs)}")
        train, validation, test = (
            pairs.subset(part) if part else None
            for part in (self.train, self.validation, self.test)
        )
        if train is None:
            raise ValueError("split has an empty train part")
        return train, validation, test

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the split to ``path`` as JSON (atomically) so a run can be reproduced."""
        payload = {"format": _JSON_FORMAT, "n": self.n,
                   **{name: getattr(self, name) for name in PART_NAMES}}
        text = json.dumps(payload, separators=(",", ":")) + "\n"
        return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Split:
        """Load a split written by :meth:`to_json`, re-validating it."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(payload, dict) or payload.get("format") != _JSON_FORMAT:
            raise ValueError(f"{path}: not an efgraph split file (expected format "
                             f"{_JSON_FORMAT!r})")
        missing = [name for name in PART_NAMES if name not in payload]
        if missing:
            raise ValueError(f"{path}: missing part(s) {', '.join(missing)}")
        try:
            split = cls(*(payload[name] for name in PART_NAMES))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        if payload.get("n", split.n) != split.n:
            raise ValueError(f"{path}: header says n={payload['n']} but the parts hold "
                             f"{split.n} indices")
        return split


def make_split(
    n: int,
    *,
    groups: Sequence[str] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> Split:
    """Split ``range(n)`` into train / validation / test.

    Args:
        n: number of pairs.
        groups: optional group name per index; if given, every group lands in exactly one part
            and the part sizes only approximate ``fractions`` (off by at most about one group).
        fractions: (train, validation, test) shares, each ``>= 0``, summing to 1. A 0 share
            gives an empty part on purpose; any positive share must end up non-empty.
        seed: the same (n, groups, fractions, seed) always gives the same split.
    Raises:
        ValueError: bad fractions, ``len(groups) != n``, or a part with a positive share that
            cannot get any index (too few pairs or groups).
    """
    fracs = _check_fractions(fractions)
    if n < 1:
        raise ValueError(f"cannot split {n} pairs")
    rng = random.Random(seed)
    if groups is None:
        order = list(range(n))
        rng.shuffle(order)
        sizes = _index_part_sizes(n, fracs)
        bounds = [0, sizes[0], sizes[0] + sizes[1], n]
        parts = [sorted(order[bounds[k]:bounds[k + 1]]) for k in range(3)]
    else:
        parts = _group_parts(n, list(groups), fracs, rng)
    for name, part, frac in zip(PART_NAMES, parts, fracs):
        if frac > 0 and not part:  # safety net; the size checks above should prevent this
            raise ValueError(f"the {name} part is empty although its fraction is {frac}")
    return Split(*parts)


def split_from_labels(labels: Sequence[str]) -> Split:
    """The split a data set gives row by row (a pair file's ``split`` column): row ``i`` goes to the
    part ``labels[i]`` names (``"train"``, ``"validation"`` or ``"test"``).

    Raises:
        ValueError: naming the ``split`` column and its allowed values, for an unknown label or a
            part that no row names (a run needs all three).
    """
    parts: dict[str, list[int]] = {name: [] for name in PART_NAMES}
    for i, label in enumerate(labels):
        if label not in parts:
            raise ValueError(f"split[{i}]: {label!r} is not a split label; the split column allows "
                             f"{', '.join(PART_NAMES)}")
        parts[label].append(i)
    empty = [name for name in PART_NAMES if not parts[name]]
    if empty:
        raise ValueError(f"split: no row is labelled {', '.join(repr(e) for e in empty)}; the split column must "
                         f"give each of {', '.join(PART_NAMES)} at least one row")
    return Split(*(parts[name] for name in PART_NAMES))


def split_pairs(
    pairs: EmbeddingPairs,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    by_group: bool = True,
) -> Split:
    """:func:`make_split` for a pair set, by ``pairs.groups`` when present and ``by_group``;
    the pairs' own per-row ``split`` (:func:`split_from_labels`) when they carry one."""
    if pairs.split is not None:
        return split_from_labels(pairs.split)
    groups = pairs.groups if by_group else None
    return make_split(len(pairs), groups=groups, fractions=fractions, seed=seed)


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fracs = [float(f) for f in fractions]
    if len(fracs) != 3:
        raise ValueError(f"fractions must be (train, validation, test), got {tuple(fractions)}")
    if any(not math.isfinite(f) or f < 0 for f in fracs):
        raise ValueError(f"fractions must be finite and >= 0, got {tuple(fracs)}")
    if not math.isclose(sum(fracs), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {tuple(fracs)} (sum {sum(fracs)})")
    if fracs[0] == 0:
        raise ValueError("the train fraction must be > 0")
    return fracs


def _index_part_sizes(n: int, fracs: list[float]) -> list[int]:
    """Sizes of the (train, validation, test) parts for an index split; sum is ``n``."""
    # Round the small parts and give train the remainder; lift a positive share that rounds to
    # 0 up to 1 row (taken from train), so 0.8/0.1/0.1 of 10 pairs is 8/1/1 and of 5 is 3/1/1.
    val, test = (max(round(f * n), 1) if f > 0 else 0 for f in fracs[1:])
    train = n - val - test
    if train < 1:
        raise ValueError(f"{n} pairs are too few to split with fractions {tuple(fracs)}: "
                         "every part with a positive share needs at least one pair")
    return [train, val, test]


def _group_parts(n: int, groups: list[str], fracs: list[float],
                 rng: random.Random, attempts: int = 32) -> list[list[int]]:
    """Assign whole groups to parts; returns three sorted index lists.

    One greedy pass over a shuffled group order can miss the fractions by a large group (with
    Bible books, 0.117/0.083 instead of 0.1/0.1), so ``attempts`` seeded orders are tried and the
    assignment closest to the target sizes is kept. Still deterministic for a given ``rng``.
    """
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries but there are {n} pairs")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    active = [PART_NAMES[k] for k in range(3) if fracs[k] > 0]
    if len(members) < len(active):
        raise ValueError(
            f"{len(members)} group(s) cannot fill the {len(active)} parts "
            f"{', '.join(active)}: every group goes to a single part, so a part would be empty; "
            "use more groups, split by index (no groups), or set a fraction to 0"
        )
    sizes = {name: len(rows) for name, rows in members.items()}
    targets = [f * n for f in fracs]
    best: tuple[float, list[list[str]]] | None = None
    for _ in range(attempts):
        # Sorting before shuffling makes the order independent of row order and dict order.
        names = sorted(members)
        rng.shuffle(names)
        assignment = _greedy_assign(names, sizes, fracs, targets)
        filled = [sum(sizes[name] for name in part) for part in assignment]
        error = sum(abs(f - t) for f, t in zip(filled, targets))
        if best is None or error < best[0]:
            best = (error, assignment)
    assert best is not None
    return [sorted(i for name in part for i in members[name]) for part in best[1]]


def _greedy_assign(names: list[str], sizes: dict[str, int], fracs: list[float],
                   targets: list[float]) -> list[list[str]]:
    """One greedy pass: group names (in the given order) -> three lists of names."""
    filled = [0, 0, 0]
    parts: list[list[str]] = [[], [], []]
    active = [k for k in range(3) if fracs[k] > 0]
    # First give each part with a positive share one group, smallest shares first, so a small
    # validation/test share is not starved when large groups come first.
    seeds = sorted(active, key=lambda k: fracs[k])
    for k, name in zip(seeds, names):
        parts[k].append(name)
        filled[k] += sizes[name]
    # Then each remaining group goes to the part furthest below its target size.
    for name in names[len(seeds):]:
        k = max(active, key=lambda k: targets[k] - filled[k])
        parts[k].append(name)
        filled[k] += sizes[name]
    return parts
