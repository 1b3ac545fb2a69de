"""Per-sample budgets enforced on device: rank items within their group, keep the best few."""

from __future__ import annotations

import torch
from torch import Tensor


def rank_within_group(group: Tensor, score: Tensor, num_groups: int) -> Tensor:
    """Rank of each item among the items of its group, by descending score (0 = best).

    Two stable sorts (score, then group) order items group by group, best first; the rank is the
    position minus the group's start offset. Ties keep the original order, so the result is
    deterministic.

    Args:
        group: ``[N]`` int64 group (sample) of each item.
        score: ``[N]`` float score.
        num_groups: number of groups (``group < num_groups``).

    Returns:
        ``[N]`` int64 rank.
    """
    assert group.dtype == torch.long, f"group must be int64, got {group.dtype}"
    n = group.numel()
    if n == 0:
        return group.clone()
    by_score = torch.sort(score.detach(), descending=True, stable=True).indices
    order = by_score[torch.sort(group[by_score], stable=True).indices]
    # a scatter-add at a known size, not bincount (whose output size is the max: a host sync)
    counts = torch.zeros(num_groups, dtype=torch.long, device=group.device).index_add_(0, group, torch.ones_like(group))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(group)
    rank[order] = torch.arange(n, device=group.device) - starts[group[order]]
    return rank


def keep_top_per_group(group: Tensor, score: Tensor, limit: Tensor, num_groups: int) -> Tensor:
    """Boolean mask keeping at most ``limit[g]`` best-scoring items of each group ``g``.

    Args:
        group: ``[N]`` int64; score: ``[N]``; limit: ``[num_groups]`` int64 (>= 0).
    """
    rank = rank_within_group(group, score, num_groups)
    return rank < limit[group]
