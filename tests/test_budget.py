"""Per-sample ranking used by the spawn budget equals a Python sort."""

from __future__ import annotations

import torch

from efgraph.core.budget import keep_top_per_group, rank_within_group


def test_rank_within_group_matches_python_sort():
    g = torch.Generator().manual_seed(0)
    group = torch.randint(0, 5, (200,), generator=g)
    score = torch.randint(0, 10, (200,), generator=g).float()  # many ties: order must be stable
    rank = rank_within_group(group, score, 5)
    for b in range(5):
        members = [i for i in range(200) if group[i] == b]
        members.sort(key=lambda i: (-score[i].item(), i))
        assert [rank[i].item() for i in members] == list(range(len(members)))


def test_keep_top_per_group_respects_each_limit():
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    score = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 1.0])
    keep = keep_top_per_group(group, score, torch.tensor([2, 0, 5]), 3)
    assert keep.tolist() == [False, True, True, False, False, True]


def test_rank_of_empty_input():
    assert rank_within_group(torch.zeros(0, dtype=torch.long), torch.zeros(0), 3).numel() == 0
