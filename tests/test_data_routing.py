"""The routing task: shapes, determinism, a known ceiling, and no linear shortcut."""

from __future__ import annotations

import pytest
import torch

from efgraph import EnergyConfig
from efgraph.data import make_routing_pairs, routing_ceiling, routing_dims, routing_oracle
from efgraph.training.baselines import RidgeBaseline
from efgraph.training.run import load_pairs


def test_shapes_unit_rows_and_determinism():
    pairs = make_routing_pairs(50, slots=3, token_dim=5, seed=1)
    assert (pairs.src_dim, pairs.tgt_dim) == routing_dims(3, 5) == (24, 15)
    torch.testing.assert_close(pairs.src.norm(dim=1), torch.ones(50))
    torch.testing.assert_close(pairs.tgt.norm(dim=1), torch.ones(50))
    again = make_routing_pairs(50, slots=3, token_dim=5, seed=1)
    assert torch.equal(pairs.src, again.src) and torch.equal(pairs.tgt, again.tgt)
    other = make_routing_pairs(50, slots=3, token_dim=5, seed=2)
    assert not torch.equal(pairs.src, other.src)


def test_the_target_puts_every_token_in_the_slot_its_address_names():
    """Undo the rotations by hand and check the permutation, independently of routing_oracle."""
    from efgraph.data.routing import _rotations

    slots, dim = 4, 6
    pairs = make_routing_pairs(20, slots, dim, seed=0)
    q_in, q_out = _rotations(slots, dim, 0)
    src = (pairs.src @ q_in.t()).view(20, slots, dim + slots)
    tgt = (pairs.tgt @ q_out.t()).view(20, slots, dim)
    scale = tgt.norm(dim=(1, 2)) / src[..., :dim].norm(dim=(1, 2))  # both sides were normalised
    for n in range(20):
        for i in range(slots):
            slot = int(src[n, i, dim:].argmax())
            torch.testing.assert_close(tgt[n, slot], src[n, i, :dim] * scale[n], atol=1e-5, rtol=1e-4)
        assert sorted(int(src[n, i, dim:].argmax()) for i in range(slots)) == list(range(slots))


def test_the_ceiling_is_one_without_noise_and_lower_with_it():
    clean = make_routing_pairs(200, 4, 8, seed=0)
    assert routing_ceiling(clean, 4, 8, seed=0) == pytest.approx(1.0, abs=1e-6)
    noisy = make_routing_pairs(200, 4, 8, seed=0, noise=0.5)
    assert 0.5 < routing_ceiling(noisy, 4, 8, seed=0) < 0.99
    torch.testing.assert_close(routing_oracle(noisy.src, 4, 8, seed=0), clean.tgt, atol=1e-5, rtol=1e-4)


def test_no_linear_map_gets_close_to_the_ceiling():
    """Ridge, fitted on plenty of pairs, scores about the mean token in every slot (~1/sqrt(S))."""
    pairs = make_routing_pairs(3000, 4, 8, seed=0)
    ridge = RidgeBaseline(mse_weight=1.0, cosine_weight=1.0)
    ridge.fit(pairs.src[:2500], pairs.tgt[:2500], pairs.src[2500:2750], pairs.tgt[2500:2750])
    held_out = slice(2750, 3000)
    cos = torch.nn.functional.cosine_similarity(ridge.predict(pairs.src[held_out]), pairs.tgt[held_out], dim=1)
    assert 0.3 < float(cos.mean()) < 0.65


@pytest.mark.parametrize("field,value", [("routing_slots", 1), ("routing_token_dim", 0), ("routing_noise", -0.1)])
def test_bad_sizes_name_the_field(field, value):
    kwargs = dict(slots=4, token_dim=8, noise=0.0)
    kwargs[{"routing_slots": "slots", "routing_token_dim": "token_dim", "routing_noise": "noise"}[field]] = value
    with pytest.raises(ValueError, match=field):
        make_routing_pairs(10, **kwargs)


def test_the_config_loads_routing_data_and_checks_its_widths():
    config = EnergyConfig(dataset="routing", routing_slots=3, routing_token_dim=4, synthetic_pairs=30,
                          input_dim=21, output_dim=12)
    pairs = load_pairs(config, progress=False)
    assert len(pairs) == 30 and (pairs.src_dim, pairs.tgt_dim) == (21, 12)
    with pytest.raises(ValueError, match="input_dim"):
        load_pairs(config.replace(input_dim=20), progress=False)
