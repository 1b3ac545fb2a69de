"""Cheap text-level check that two parallel texts are aligned row by row.

Why this exists: some pythonbible 0.15.5 translation packages (BBE, WBS) return the wrong verse
for a verse id after some point (the text drifts), which would silently turn a translation
dataset into noise. Embedding 31k verses takes minutes, so the check runs on the raw text first.

The score is *self-calibrating*: for each row ``i`` we compare the word overlap of the claimed
pair ``(s_i, t_i)`` with the overlap of ``s_i`` against the neighbouring targets ``t_{i-1}`` and
``t_{i+1}`` (the decoys). A correctly aligned row beats both decoys almost always, however freely
the target translation paraphrases (a modern translation shares fewer words with the KJV than the
ASV does, but still more than a neighbouring verse). A misaligned row beats them only by chance:
at most about 1/3 for unrelated text, and about 0 for an off-by-one drift because one of the
decoys is then the real counterpart. The share of rows that win is the *win rate*.

Drift can start in the middle of a book (in pythonbible 0.15.5 BBE and WBS follow the KJV up to
Genesis 42 and drift from Genesis 43 on), so a whole-book average can hide it. The verdict
therefore uses the *worst window*: the lowest win rate over any run of ``window`` consecutive
rows. Measured on the full KJV text with ``window=25``: against WEB and ASV the worst window is
0.92; against BBE and WBS it is 0.00 and about 96% of windows fall below 0.75.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"[a-z0-9]+")

#: Windows of this many consecutive rows are scored (see the module docstring).
DEFAULT_WINDOW = 25
#: Lowest acceptable window win rate; aligned Bible text measured >= 0.92, drifted text ~0.3.
DEFAULT_MIN_WIN_RATE = 0.75


@dataclass(frozen=True)
class GroupAlignment:
    """Alignment statistics for one group of rows (e.g. one Bible book).

    Attributes:
        group: the group name.
        n: number of rows in the group.
        win_rate: share of rows whose pair overlap beats both decoy overlaps (ties count 1/2).
        median_overlap: median word-set Jaccard overlap of the claimed pairs.
        median_decoy_overlap: median Jaccard overlap of each source with its neighbour targets.
    """

    group: str
    n: int
    win_rate: float
    median_overlap: float
    median_decoy_overlap: float


@dataclass(frozen=True)
class AlignmentReport:
    """Alignment statistics over all rows and per group; see the module docstring.

    Attributes:
        n: number of rows.
        win_rate: share of all rows that beat their decoys (ties count 1/2).
        median_overlap: median Jaccard overlap of the claimed pairs.
        median_decoy_overlap: median overlap of each source with its best neighbour target.
        window: length of the windows behind ``worst_window_win_rate`` (``min(window, n)``).
        worst_window_start: index of the first row of the worst window.
        worst_window_win_rate: lowest win rate over all runs of ``window`` consecutive rows.
        groups: per-group statistics, in order of first appearance.
    """

    n: int
    win_rate: float
    median_overlap: float
    median_decoy_overlap: float
    window: int
    worst_window_start: int
    worst_window_win_rate: float
    groups: tuple[GroupAlignment, ...]

    def is_aligned(self, min_win_rate: float = DEFAULT_MIN_WIN_RATE) -> bool:
        """True when every window of consecutive rows reaches ``min_win_rate``."""
        return self.worst_window_win_rate >= min_win_rate

    def misaligned_groups(self, min_win_rate: float = DEFAULT_MIN_WIN_RATE) -> list[str]:
        """Names of the groups whose overall win rate is below ``min_win_rate``."""
        return [g.group for g in self.groups if g.win_rate < min_win_rate]


def word_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the lower-cased word sets of ``a`` and ``b``, in ``[0, 1]``."""
    wa, wb = _words(a), _words(b)
    if not wa or not wb:
        return 0.0
    return len(wa & wb) / len(wa | wb)


def alignment_report(
    source_texts: Sequence[str],
    target_texts: Sequence[str],
    groups: Sequence[str] | None = None,
    *,
    window: int = DEFAULT_WINDOW,
) -> AlignmentReport:
    """Score how well ``target_texts[i]`` corresponds to ``source_texts[i]`` for every ``i``.

    Args:
        source_texts: ``N >= 2`` texts.
        target_texts: ``N`` texts, claimed to be the counterparts of ``source_texts``.
        groups: optional ``N`` group names for the per-group statistics; rows of a group need
            not be contiguous.
        window: number of consecutive rows per scored window (clipped to ``N``).
    Returns:
        An :class:`AlignmentReport`; groups are listed in order of first appearance.
    """
    n = len(source_texts)
    if len(target_texts) != n:
        raise ValueError(f"{n} source texts but {len(target_texts)} target texts")
    if n < 2:
        raise ValueError("alignment needs at least 2 rows (a row is compared with its neighbours)")
    if groups is not None and len(groups) != n:
        raise ValueError(f"{n} texts but {len(groups)} group names")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    src_words = [_words(t) for t in source_texts]
    tgt_words = [_words(t) for t in target_texts]
    overlaps: list[float] = []
    decoys: list[float] = []
    wins: list[float] = []
    for i in range(n):
        own = _jaccard(src_words[i], tgt_words[i])
        # Neighbours wrap around at the ends; with n == 2 both decoys are the same row.
        decoy = max(
            _jaccard(src_words[i], tgt_words[(i - 1) % n]),
            _jaccard(src_words[i], tgt_words[(i + 1) % n]),
        )
        overlaps.append(own)
        decoys.append(decoy)
        wins.append(1.0 if own > decoy else 0.5 if own == decoy else 0.0)

    # Sliding-window sums in O(N) via a running total.
    w = min(window, n)
    window_sum = sum(wins[:w])
    worst_sum, worst_start = window_sum, 0
    for start in range(1, n - w + 1):
        window_sum += wins[start + w - 1] - wins[start - 1]
        if window_sum < worst_sum:
            worst_sum, worst_start = window_sum, start

    order: dict[str, list[int]] = {}
    for i, g in enumerate(groups if groups is not None else ["all"] * n):
        order.setdefault(g, []).append(i)
    per_group = tuple(
        GroupAlignment(
            group=g,
            n=len(rows),
            win_rate=sum(wins[i] for i in rows) / len(rows),
            median_overlap=statistics.median(overlaps[i] for i in rows),
            median_decoy_overlap=statistics.median(decoys[i] for i in rows),
        )
        for g, rows in order.items()
    )
    return AlignmentReport(
        n=n,
        win_rate=sum(wins) / n,
        median_overlap=statistics.median(overlaps),
        median_decoy_overlap=statistics.median(decoys),
        window=w,
        worst_window_start=worst_start,
        worst_window_win_rate=worst_sum / w,
        groups=per_group,
    )


def _words(text: str) -> frozenset[str]:
    # Straight and back-tick apostrophes are dropped so "God's"/"God`s" give the same words.
    return frozenset(_WORD.findall(text.lower()))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)
