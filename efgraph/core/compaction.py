"""Compaction without host syncs, and the one place a step reads the device.

``torch.unique``, ``nonzero`` and boolean-mask indexing return a tensor whose *size* depends on
the data, so on a GPU each of them blocks the host until the device has caught up (a sync). A
lattice step needs a handful of such compactions; done naively that is ~9 syncs per step, each
draining the launch queue. The engine instead

* computes every data-dependent quantity at a size the host already knows (:func:`unique_padded`
  returns ``N`` rows, the first ``count`` real, the rest padding), and
* reads all the counts it needs to shape the next step in one copy (:func:`read_counts`), then
  slices stable sorts by those host integers.

So a step costs one sync, whatever happens in it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unique_padded(ids: Tensor, fill: int) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.unique(ids, sorted=True, return_inverse=True)`` at a static size, without a sync.

    Args:
        ids: ``[N]`` int64.
        fill: id of the padding rows (pick one larger than any id to keep ``unique`` sorted).

    Returns:
        ``unique [N]``: the distinct ids ascending in rows ``< count``, ``fill`` after;
        ``inverse [N]``: row of each id in ``unique``; ``count``: scalar int64 tensor.
    """
    n = ids.numel()
    if n == 0:
        return ids.clone(), ids.clone(), torch.zeros((), dtype=torch.long, device=ids.device)
    sorted_ids, order = torch.sort(ids)
    starts_run = torch.ones(n, dtype=torch.bool, device=ids.device)
    starts_run[1:] = sorted_ids[1:] != sorted_ids[:-1]
    run = torch.cumsum(starts_run, 0) - 1  # row of each sorted id in `unique`
    inverse = torch.empty_like(run).scatter_(0, order, run)
    unique = torch.full_like(sorted_ids, fill).scatter_(0, run, sorted_ids)
    return unique, inverse, run[-1] + 1


def read_counts(counts: Tensor | list[Tensor]) -> list[int]:
    """The host values of a 1-D int tensor (or of scalar int tensors), in one device -> host copy
    (the step's one sync).

    The explicit ``.to("cpu", copy=True)`` makes the copy visible to
    :mod:`efgraph.utils.dispatch_count` on a CPU run too, so tests count it."""
    stacked = torch.stack(counts) if isinstance(counts, list) else counts
    return stacked.to("cpu", copy=True).tolist()


def bucket_rows(n: int, smallest: int = 8) -> int:
    """The padded row count for ``n`` flows when the step is compiled: the smallest of
    ``smallest * {1, 1.5, 2, 3, 4, 6, ...}`` (powers of two and their 3/2) that holds ``n``.

    Every compiled graph has static shapes, so each bucket costs a compile; two buckets per
    octave bound the graphs at ``2 log2(max flows / smallest)`` per graph kind while padding
    wastes at most a third of a step (a sixth on average). Twice a bucket is a bucket, so a step
    whose flows all spawn still fits its successor in one."""
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    rows = smallest
    while rows < n:
        rows = rows * 3 // 2 if rows & (rows - 1) == 0 else rows * 4 // 3  # 8, 12, 16, 24, 32, ...
    return rows
