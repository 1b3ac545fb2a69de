"""The seeded synthetic teacher."""

from __future__ import annotations

import pytest
import torch

from efgraph.data import make_teacher_pairs
from efgraph.data.synthetic import teacher_network


def test_same_seed_gives_identical_pairs_and_other_seeds_differ():
    a = make_teacher_pairs(50, 12, 6, seed=3)
    b = make_teacher_pairs(50, 12, 6, seed=3)
    assert torch.equal(a.src, b.src) and torch.equal(a.tgt, b.tgt) and a.keys == b.keys
    c = make_teacher_pairs(50, 12, 6, seed=4)
    assert not torch.allclose(a.src, c.src) and not torch.allclose(a.tgt, c.tgt)


def test_shapes_unit_norm_and_target_is_the_teacher_of_the_source():
    pairs = make_teacher_pairs(40, 10, 7, seed=1, hidden_dim=16)
    assert pairs.src.shape == (40, 10) and pairs.tgt.shape == (40, 7)
    torch.testing.assert_close(pairs.src.norm(dim=1), torch.ones(40))
    torch.testing.assert_close(pairs.tgt.norm(dim=1), torch.ones(40))
    teacher = teacher_network(10, 7, hidden_dim=16, seed=1)
    expected = torch.nn.functional.normalize(teacher(pairs.src), dim=1)
    torch.testing.assert_close(pairs.tgt, expected)


def test_teacher_seed_fixes_the_function_while_seed_redraws_inputs():
    a = make_teacher_pairs(30, 8, 4, seed=1, teacher_seed=9)
    b = make_teacher_pairs(30, 8, 4, seed=2, teacher_seed=9)
    assert not torch.allclose(a.src, b.src)
    teacher = teacher_network(8, 4, seed=9)
    for pairs in (a, b):
        torch.testing.assert_close(pairs.tgt, torch.nn.functional.normalize(teacher(pairs.src),
                                                                            dim=1))
    # A different teacher gives different targets for the same inputs.
    c = make_teacher_pairs(30, 8, 4, seed=1, teacher_seed=10)
    assert torch.equal(a.src, c.src) and not torch.allclose(a.tgt, c.tgt)


def test_target_is_a_non_trivial_non_linear_map():
    pairs = make_teacher_pairs(400, 16, 8, seed=0)
    # Targets vary across inputs.
    assert pairs.tgt.std(dim=0).min() > 0.05
    # The best linear map (least squares) cannot reproduce the teacher exactly.
    x = torch.cat([pairs.src, torch.ones(len(pairs), 1)], dim=1).double()
    sol = torch.linalg.lstsq(x, pairs.tgt.double()).solution
    residual = (x @ sol - pairs.tgt.double()).pow(2).mean()
    assert residual > 1e-4


def test_noise_perturbs_targets_by_a_controlled_amount():
    clean = make_teacher_pairs(200, 16, 16, seed=5)
    noisy = make_teacher_pairs(200, 16, 16, seed=5, noise=0.1)
    assert torch.equal(clean.src, noisy.src)
    cos = (clean.tgt * noisy.tgt).sum(dim=1)
    assert 0.9 < cos.mean() < 0.9999
    torch.testing.assert_close(noisy.tgt.norm(dim=1), torch.ones(200))


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n must be >= 1"),
    ({"input_dim": 0}, "input_dim must be >= 1"),
    ({"noise": -0.1}, "noise must be a finite value >= 0"),
    ({"hidden_dim": 0}, "hidden_dim must be >= 1"),
])
def test_bad_arguments(kwargs, message):
    args = {"n": 4, "input_dim": 3, "output_dim": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        make_teacher_pairs(**args)
