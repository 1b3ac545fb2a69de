"""Deterministic, disjoint, covering, group-respecting splits that round-trip through JSON."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from efgraph.data import EmbeddingPairs, Split, make_split, split_pairs


def _assert_partition(split: Split, n: int) -> None:
    parts = [split.train, split.validation, split.test]
    assert all(p == sorted(p) for p in parts)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == n
    assert set(flat) == set(range(n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 300), seed=st.integers(0, 2**31))
def test_index_split_is_a_deterministic_partition(n, seed):
    split = make_split(n, seed=seed)
    _assert_partition(split, n)
    assert make_split(n, seed=seed) == split
    assert split.validation and split.test


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=3, max_size=25),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_group_split_keeps_each_group_in_one_part(sizes, seed, data):
    groups = [f"g{k}" for k, size in enumerate(sizes) for _ in range(size)]
    # Interleave rows so groups are not contiguous: the split must not rely on order.
    order = data.draw(st.permutations(range(len(groups))))
    groups = [groups[i] for i in order]
    split = make_split(len(groups), groups=groups, seed=seed)
    _assert_partition(split, len(groups))
    part_of_group: dict[str, str] = {}
    for name in ("train", "validation", "test"):
        for i in getattr(split, name):
            assert part_of_group.setdefault(groups[i], name) == name
    assert make_split(len(groups), groups=groups, seed=seed) == split


def test_index_split_sizes_follow_the_fractions():
    split = make_split(100)
    assert (len(split.train), len(split.validation), len(split.test)) == (80, 10, 10)
    split = make_split(100, fractions=(0.6, 0.3, 0.1))
    assert (len(split.train), len(split.validation), len(split.test)) == (60, 30, 10)
    # A small positive share still gets one row.
    split = make_split(5)
    assert (len(split.train), len(split.validation), len(split.test)) == (3, 1, 1)


def test_group_split_sizes_approximate_the_fractions():
    # 40 groups of varied size (like books of very different lengths).
    groups = [f"b{k}" for k in range(40) for _ in range(5 + (k * 7) % 23)]
    split = make_split(len(groups), groups=groups, seed=3)
    n = len(groups)
    assert abs(len(split.validation) - 0.1 * n) <= 0.03 * n
    assert abs(len(split.test) - 0.1 * n) <= 0.03 * n


def test_seed_changes_the_split():
    assert make_split(50, seed=0) != make_split(50, seed=1)
    groups = [f"g{i % 20}" for i in range(200)]
    assert make_split(200, groups=groups, seed=0) != make_split(200, groups=groups, seed=1)


def test_empty_parts_are_errors_unless_their_fraction_is_zero():
    with pytest.raises(ValueError, match="2 pairs are too few"):
        make_split(2)
    with pytest.raises(ValueError,
                       match=r"2 group\(s\) cannot fill the 3 parts train, validation, test"):
        make_split(6, groups=["a", "a", "a", "b", "b", "b"])
    split = make_split(10, fractions=(0.9, 0.1, 0.0))
    assert split.test == [] and len(split.validation) == 1
    split = make_split(6, groups=["a", "a", "a", "b", "b", "b"], fractions=(0.5, 0.5, 0.0))
    assert split.test == [] and len(split.train) == 3


@pytest.mark.parametrize("fractions, message", [
    ((0.8, 0.1), "must be \\(train, validation, test\\)"),
    ((0.8, 0.1, 0.2), "must sum to 1"),
    ((1.1, -0.1, 0.0), "finite and >= 0"),
    ((0.0, 0.5, 0.5), "train fraction must be > 0"),
])
def test_bad_fractions(fractions, message):
    with pytest.raises(ValueError, match=message):
        make_split(10, fractions=fractions)


def test_groups_length_must_match():
    with pytest.raises(ValueError, match="groups has 2 entries but there are 3 pairs"):
        make_split(3, groups=["a", "b"])


def test_split_validates_overlap_coverage_and_order():
    with pytest.raises(ValueError, match="index 1 is in both 'train' and 'test'"):
        Split([0, 1], [2], [1])
    with pytest.raises(ValueError, match="index 2 is missing"):
        Split([0, 1], [3], [4])
    with pytest.raises(ValueError, match="'validation' must be sorted"):
        Split([0], [2, 1], [3])
    with pytest.raises(ValueError, match="negative index -1"):
        Split([-1, 0], [1], [2])


def test_json_round_trip_and_corrupt_files(tmp_path):
    split = make_split(37, seed=5)
    path = split.to_json(tmp_path / "runs" / "split.json")
    assert Split.from_json(path) == split
    payload = json.loads(path.read_text())
    payload["test"] = sorted(payload["test"] + [payload["train"][0]])
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"split\.json: index \d+ is in both 'train' and 'test'"):
        Split.from_json(path)
    path.write_text(json.dumps({"train": [0]}))
    with pytest.raises(ValueError, match="not an efgraph split file"):
        Split.from_json(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        Split.from_json(path)


def test_split_pairs_uses_groups_and_apply_cuts_the_pairs():
    n = 60
    groups = [f"book{i // 6}" for i in range(n)]  # 10 books of 6 rows
    pairs = EmbeddingPairs(torch.arange(n, dtype=torch.float32)[:, None], torch.zeros(n, 2),
                           keys=[f"v{i}" for i in range(n)], groups=groups)
    split = split_pairs(pairs, seed=2)
    assert split == make_split(n, groups=groups, seed=2)
    train, val, test = split.apply(pairs)
    assert train.keys == [f"v{i}" for i in split.train]
    assert val is not None and test is not None
    assert set(train.groups).isdisjoint(test.groups) and set(val.groups).isdisjoint(test.groups)
    assert split_pairs(pairs, seed=2, by_group=False) == make_split(n, seed=2)
    with pytest.raises(ValueError, match="split is for 60 pairs but the pair set has 3"):
        split.apply(pairs.subset([0, 1, 2]))
