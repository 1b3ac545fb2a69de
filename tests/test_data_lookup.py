"""The NDR compositional table lookup: its protocol, encodings, oracle and argument checks."""

from __future__ import annotations

import pytest
import torch

from efgraph.data.lookup import (MAX_VECTOR_CHAIN, decode_tokens, decode_vector, encode_vector, lookup_benchmark,
                                 lookup_oracle, lookup_tables, run_lookups)
from efgraph.training.metrics import answer_accuracy


@pytest.fixture(scope="module")
def bench():
    return lookup_benchmark(seed=3, d=20)


def _inputs(split) -> set[tuple[int, ...]]:
    return {(int(v), *[int(t) for t in c if t >= 0]) for v, c in zip(split.start, split.chains)}


def _chains(split) -> set[tuple[int, ...]]:
    return {tuple(int(t) for t in c if t >= 0) for c in split.chains}


def test_protocol_train_validation_and_test_lengths(bench):
    train, val, test = bench.train, bench.validation, bench.test
    singles = {(v, t) for v in range(8) for t in range(9)}
    assert singles <= _inputs(train)  # every single lookup
    assert int(train.lengths.max()) == 5 and int(train.lengths.min()) == 1
    assert set(val.lengths.tolist()) == {2, 3, 4, 5}
    assert set(test.lengths.tolist()) == {6, 7, 8, 9, 10}
    assert _chains(val).isdisjoint(_chains(train))  # no validation chain, with any start value, in training
    for length in range(2, 6):  # 10 % of all inputs of each length, none repeated
        n = int((train.lengths == length).sum())
        assert abs(n / (8 * 9 ** length) - 0.1) < 0.005
        rows = train.rows(train.lengths == length)
        assert len(_inputs(rows)) == n
        # whole chains held back: 16 per length, each with all 8 start values
        held = val.rows(val.lengths == length)
        assert len(_chains(held)) == 16 and len(_inputs(held)) == 16 * 8
    for length in range(6, 11):
        rows = test.rows(test.lengths == length)
        assert len(_chains(rows)) == 64 and len(rows) == 512


def test_targets_follow_the_tables_by_a_slow_reference_and_the_oracle_scores_1(bench):
    for split in bench.splits().values():
        for i in range(0, len(split), max(1, len(split) // 50)):
            value = int(split.start[i])
            for t in split.chains[i, : int(split.lengths[i])]:
                value = int(bench.tables[int(t), value])
            assert value == int(split.answer[i])
            torch.testing.assert_close(split.tgt[i], bench.answers[value])
        oracle = lookup_oracle(bench, split.seq, split.mask)
        assert answer_accuracy(oracle, split.tgt, bench.answers) == 1.0
        torch.testing.assert_close(oracle, split.tgt)
    assert all(sorted(row.tolist()) == list(range(8)) for row in bench.tables)


def test_masks_padding_and_both_encodings_decode_to_the_same_chain(bench):
    for split in bench.splits().values():
        assert split.seq.shape == (len(split), 1 + int(split.lengths.max()), 20)
        assert split.mask.dtype == torch.bool
        assert torch.equal(split.mask.sum(dim=1), split.lengths + 1)
        assert torch.equal(split.mask, torch.arange(split.mask.shape[1]) < (split.lengths + 1).unsqueeze(1))
        assert bool((split.seq[~split.mask] == 0).all())  # padding rows are zero
        torch.testing.assert_close(split.seq[split.mask].norm(dim=1), torch.ones(int(split.mask.sum())))
        torch.testing.assert_close(split.vec.norm(dim=1), torch.ones(len(split)))
        s_tok, c_tok, l_tok = decode_tokens(split.seq, split.mask, bench.tokens, bench.values)
        s_vec, c_vec, l_vec = decode_vector(split.vec, bench.values, bench.num_tables, bench.vector_rotation)
        assert torch.equal(s_tok, split.start) and torch.equal(s_vec, split.start)
        assert torch.equal(l_tok, split.lengths) and torch.equal(l_vec, split.lengths)
        assert torch.equal(c_tok, split.chains)
        assert torch.equal(c_vec[:, : split.chains.shape[1]], split.chains)
        assert bool((c_vec[:, split.chains.shape[1]:] == -1).all())


def test_determinism_by_seed():
    a, b, c = lookup_benchmark(seed=1, d=17), lookup_benchmark(seed=1, d=17), lookup_benchmark(seed=2, d=17)
    for name in ("train", "validation", "test"):
        for field in ("start", "chains", "seq", "mask", "vec", "tgt"):
            assert torch.equal(getattr(a.splits()[name], field), getattr(b.splits()[name], field))
    assert not torch.equal(a.tables, c.tables) and not torch.equal(a.train.chains, c.train.chains)
    assert torch.equal(lookup_tables(seed=1), a.tables)


def test_run_lookups_skips_padding():
    table = lookup_tables(seed=0)
    start = torch.tensor([3, 3])
    chains = torch.tensor([[4, 2, -1], [4, 2, 7]])
    out = run_lookups(start, chains, table)
    assert int(out[0]) == int(table[2, table[4, 3]])
    assert int(out[1]) == int(table[7, out[0]])


@pytest.mark.parametrize("kwargs, message", [
    (dict(d=16), "d: must be an integer >= 17"),
    (dict(values=1), "values: must be an integer >= 2"),
    (dict(max_train_length=7), "max_train_length: must be an integer in 2 .. 6"),
    (dict(train_fraction=0.0), "train_fraction: must be in (0, 1]"),
    (dict(train_fraction=1.5), "train_fraction: must be in (0, 1]"),
    (dict(val_chains=0), "val_chains: must be an integer in 1 .. 40"),
    (dict(test_lengths=(5, 6)), "test_lengths: must be an integer in 6 .. 10"),
    (dict(test_lengths=(11,)), "test_lengths: must be an integer in 6 .. 10"),
    (dict(test_lengths=()), "test_lengths: give at least one"),
    (dict(test_chains=0), "test_chains: must be an integer >= 1"),
    (dict(train_fraction=1.0), "train_fraction: 1.0 of the 648 inputs of length 2"),
])
def test_bad_arguments_name_the_argument_and_its_range(kwargs, message):
    with pytest.raises(ValueError) as err:
        lookup_benchmark(**kwargs)
    assert message in str(err.value)


def test_vector_encoding_refuses_chains_longer_than_its_slots():
    rotation = torch.eye(8 + MAX_VECTOR_CHAIN * 10)
    with pytest.raises(ValueError, match="chain length: the vector encoding has 10 chain slots"):
        encode_vector(torch.zeros(1, dtype=torch.long), torch.zeros(1, 11, dtype=torch.long), 8, 9, rotation)


def test_the_benchmark_as_a_pair_file_keeps_its_split_column_and_sequences(tmp_path):
    from efgraph.data import load_embedding_pairs, lookup_pairs, save_embedding_pairs
    from efgraph.data.split import split_pairs

    bench = lookup_benchmark(seed=0, d=17, max_train_length=3, test_lengths=(6, 10), test_chains=2)
    loaded = load_embedding_pairs(save_embedding_pairs(lookup_pairs(bench), tmp_path / "lookup.pt"))
    split = split_pairs(loaded)
    assert [len(part) for part in (split.train, split.validation, split.test)] == [
        len(bench.train), len(bench.validation), len(bench.test)]
    test = loaded.subset(split.test)
    assert test.src_seq.shape == (len(bench.test), 11, 17)
    torch.testing.assert_close(test.src_seq, bench.test.seq)
    torch.testing.assert_close(test.tgt, bench.test.tgt)
    train = loaded.subset(split.train)
    assert torch.equal(train.src_mask[:, :4], bench.train.mask) and not bool(train.src_mask[:, 4:].any())
