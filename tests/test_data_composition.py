"""The composition task: chains of table lookups, checked against a slow per-pair reference."""

from __future__ import annotations

import pytest
import torch

from efgraph.config import EnergyConfig
from efgraph.data.composition import (
    composition_answers, composition_dims, composition_oracle, composition_tables, decode_composition,
    holds_out, make_composition_pairs, memoriser_accuracy, seen_in_training,
)
from efgraph.training.baselines import RidgeBaseline
from efgraph.training.metrics import answer_accuracy, answer_hits
from efgraph.training.run import load_pairs, make_run_split, score_predictions, task_oracle


def test_targets_are_the_values_the_chains_end_on_by_a_slow_reference():
    values, tables, chain = 7, 3, 4
    pairs = make_composition_pairs(200, values, tables, chain, seed=5)
    table = composition_tables(values, tables, seed=5)
    start, chains = decode_composition(pairs.src, values, tables, chain, seed=5)
    answers = composition_answers(values, tables, chain, seed=5)
    for i in range(len(pairs)):
        value = int(start[i])
        for j in range(chain):  # one lookup after the other, by hand
            value = int(table[int(chains[i, j]), value])
        torch.testing.assert_close(pairs.tgt[i], answers[value])
    # every table is a permutation of the values, and the layout decodes to valid ids
    assert all(sorted(row.tolist()) == list(range(values)) for row in table)
    assert pairs.src.shape == (200, composition_dims(values, tables, chain)[0]) and pairs.tgt.shape == (200, values)
    torch.testing.assert_close(pairs.src.norm(dim=1), torch.ones(200))
    torch.testing.assert_close(pairs.tgt.norm(dim=1), torch.ones(200))


def test_the_oracle_scores_the_ceiling_and_answers_are_scored_as_the_nearest_value():
    pairs = make_composition_pairs(300, 16, 8, 3, seed=1)
    oracle = composition_oracle(pairs.src, 16, 8, 3, seed=1)
    torch.testing.assert_close(oracle, pairs.tgt, atol=1e-5, rtol=0)
    answers = composition_answers(16, 8, 3, seed=1)
    assert answer_accuracy(oracle, pairs.tgt, answers) == 1.0
    # a prediction nearer another value is wrong, one merely scaled or noisy but nearest is right
    wrong = answers[(pairs.tgt @ answers.T).argmax(1).add(1) % 16]
    assert answer_accuracy(wrong, pairs.tgt, answers) == 0.0
    noisy = 3.0 * pairs.tgt + 0.05 * torch.randn(pairs.tgt.shape, generator=torch.Generator().manual_seed(0))
    assert answer_hits(noisy, pairs.tgt, answers).all()


def test_no_linear_shortcut():
    """A lookup is a product of a value and a table entry: ridge stays near the mean value."""
    pairs = make_composition_pairs(4000, 16, 8, 2, seed=0)
    ridge = RidgeBaseline().fit(pairs.src[:3000], pairs.tgt[:3000], pairs.src[3000:3500], pairs.tgt[3000:3500])
    pred = ridge.predict(pairs.src[3500:])
    cosine = torch.nn.functional.cosine_similarity(pred, pairs.tgt[3500:], dim=1).mean()
    assert cosine < 0.4 and answer_accuracy(pred, pairs.tgt[3500:], composition_answers(16, 8, 2)) < 0.25


@pytest.mark.parametrize("hold_out", ["inputs", "chains"])
def test_the_config_split_keeps_test_inputs_or_chains_out_of_training(hold_out):
    config = EnergyConfig.from_yaml("configs/composition.yaml").replace(composition_hold_out=hold_out)
    pairs = load_pairs(config)
    train, val, test = make_run_split(config, pairs).apply(pairs)
    start, chains = decode_composition(pairs.src, 16, 8, config.composition_chain, config.data_seed)
    key = (lambda i: tuple(chains[i].tolist())) if hold_out == "chains" else \
        (lambda i: (int(start[i]), *chains[i].tolist()))
    index = {k: i for i, k in enumerate(pairs.keys)}
    seen = {key(index[k]) for k in train.keys}
    for part in (val, test):
        assert not seen & {key(index[k]) for k in part.keys}
    # and every (position, table) of a test chain was learned somewhere in training
    learned = {(j, c) for k in train.keys for j, c in enumerate(chains[index[k]].tolist())}
    assert all((j, c) in learned for k in test.keys for j, c in enumerate(chains[index[k]].tolist()))


def test_one_lookup_is_split_by_pair_and_small_chain_spaces_are_not_held_out():
    assert make_composition_pairs(50, 16, 8, 1).groups is None  # a held-out (value, table) would be unknowable
    assert not holds_out(3, 3, "chains") and holds_out(3, 3, "inputs")  # 27 chains < 30
    assert holds_out(8, 2, "chains")


def test_run_scores_every_model_with_the_answer_and_the_oracle_is_the_tasks():
    config = EnergyConfig.from_yaml("configs/composition.yaml").replace(synthetic_pairs=500)
    pairs = load_pairs(config)
    metrics = score_predictions(config, task_oracle(config, pairs.src), pairs.tgt)
    assert metrics["cosine"] == pytest.approx(1.0) and metrics["answer_accuracy"] == 1.0
    assert set(metrics) == {"cosine", "mse", "r_at_1", "answer_accuracy"}


@pytest.mark.parametrize("field, value, message", [
    ("composition_values", 1, "composition_values: must be >= 2"),
    ("composition_tables", 0, "composition_tables: must be >= 1"),
    ("composition_chain", 0, "composition_chain: must be >= 1"),
    ("composition_hold_out", "values", "composition_hold_out: must be one of"),
])
def test_bad_knobs_are_rejected_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        EnergyConfig.from_yaml("configs/composition.yaml").replace(**{field: value})
    generator_args = {"composition_values": (10, 1, 8, 2), "composition_tables": (10, 16, 0, 2),
                      "composition_chain": (10, 16, 8, 0)}
    if field in generator_args:
        with pytest.raises(ValueError, match=message):
            make_composition_pairs(*generator_args[field])


def test_a_width_that_does_not_match_the_chain_names_the_field():
    config = EnergyConfig.from_yaml("configs/composition.yaml").replace(composition_chain=4)
    with pytest.raises(ValueError, match="input_dim: config says 40 but the source embeddings are 48 wide"):
        load_pairs(config)


def test_seen_inputs_are_the_test_inputs_with_a_start_and_chain_in_training():
    pairs = make_composition_pairs(400, 4, 2, 2, seed=3)  # 16 distinct inputs: most test rows were seen
    train, test = pairs.src[:300], torch.cat([pairs.src[300:], pairs.src[:5]])
    seen = seen_in_training(train, test, 4, 2, 2, seed=3)
    start, chains = decode_composition(test, 4, 2, 2, seed=3)
    t_start, t_chains = decode_composition(train, 4, 2, 2, seed=3)
    known = {(int(a), *b.tolist()) for a, b in zip(t_start, t_chains)}
    assert seen.tolist() == [(int(a), *b.tolist()) in known for a, b in zip(start, chains)]
    assert seen[-5:].all()  # rows copied from training are seen
    other = make_composition_pairs(50, 16, 8, 3, seed=3).src  # one training input: only its copies are seen
    assert seen_in_training(other[:1], other, 16, 8, 3, seed=3).tolist() == [
        bool(torch.equal(row, other[0])) for row in other]
    assert memoriser_accuracy(train, test, 4, 2, 2, seed=3) == pytest.approx(
        seen.float().mean().item() + (1 - seen.float().mean().item()) / 4)


def test_with_the_identity_table_a_chain_through_table_0_is_the_shorter_chain():
    table = composition_tables(16, 8, seed=3, identity=True)
    assert torch.equal(table[0], torch.arange(16))
    assert torch.equal(table[1:], composition_tables(16, 8, seed=3)[1:])  # the other tables are unchanged
    pairs = make_composition_pairs(3000, 16, 8, 2, seed=3, identity=True)
    start, chains = decode_composition(pairs.src, 16, 8, 2, seed=3)
    value = (pairs.tgt @ composition_answers(16, 8, 2, seed=3).t()).argmax(dim=1)  # each target's value
    single = chains[:, 0] == 0  # (v, identity, k): the single lookup f_k(v)
    assert 0.08 < float(single.float().mean()) < 0.17  # 1 / 8 of the chains
    assert torch.equal(value[single], table[chains[single, 1], start[single]])
    torch.testing.assert_close(composition_oracle(pairs.src, 16, 8, 2, seed=3, identity=True), pairs.tgt,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides,message", [
    (dict(dataset="composition", composition_tables=1, input_dim=17, output_dim=16), "composition_tables >= 2"),
    (dict(dataset="routing"), "only read with dataset 'composition'"),
])
def test_the_identity_table_is_refused_where_it_cannot_be_read(overrides, message):
    with pytest.raises(ValueError, match=message):
        EnergyConfig(composition_identity=True, **overrides)
