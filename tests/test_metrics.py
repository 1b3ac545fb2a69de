"""Metrics checked against slow, row-by-row reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from efgraph.training.metrics import embedding_loss, evaluate_predictions


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _reference(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Plain-Python loops in float64: cosine, MSE, and R@1 with "strictly best wins"."""
    p, t = pred.double().tolist(), target.double().tolist()
    n, d = len(p), len(p[0])
    mse = sum((p[i][k] - t[i][k]) ** 2 for i in range(n) for k in range(d)) / (n * d)
    cosine = sum(_cos(p[i], t[i]) for i in range(n)) / n
    hits = 0
    for i in range(n):
        sims = [_cos(p[i], t[j]) for j in range(n)]
        hits += all(sims[i] > sims[j] for j in range(n) if j != i)
    return {"cosine": cosine, "mse": mse, "r_at_1": hits / n}


def test_embedding_loss_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    ref = _reference(pred, target)
    assert embedding_loss(pred, target, 1.0, 0.0).item() == pytest.approx(ref["mse"], rel=1e-5)
    assert embedding_loss(pred, target, 0.0, 1.0).item() == pytest.approx(1 - ref["cosine"], rel=1e-5)
    combined = embedding_loss(pred, target, 0.3, 2.0).item()
    assert combined == pytest.approx(0.3 * ref["mse"] + 2.0 * (1 - ref["cosine"]), rel=1e-5)


def test_embedding_loss_is_zero_at_target_and_differentiable() -> None:
    target = torch.randn(4, 3)
    assert embedding_loss(target.clone(), target, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    pred = torch.randn(4, 3, requires_grad=True)
    embedding_loss(pred, target, 1.0, 1.0).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_evaluate_matches_reference_with_any_chunking(chunk_size: int | None) -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(40, 6, generator=g)
    # Noise comparable to the signal: some rows retrieve their target, some do not.
    pred = target + 0.9 * torch.randn(40, 6, generator=g)
    ref = _reference(pred, target)
    got = evaluate_predictions(pred, target, chunk_size=chunk_size)
    assert set(got) == {"cosine", "mse", "r_at_1"}
    assert 0.0 < ref["r_at_1"] < 1.0  # the case is not degenerate
    assert got["r_at_1"] == ref["r_at_1"]
    assert got["cosine"] == pytest.approx(ref["cosine"], rel=1e-5)
    assert got["mse"] == pytest.approx(ref["mse"], rel=1e-5)


def test_r_at_1_is_one_for_exact_predictions() -> None:
    target = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    got = evaluate_predictions(target.clone(), target, chunk_size=8)
    assert got["r_at_1"] == 1.0
    assert got["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert got["mse"] == 0.0


def test_r_at_1_is_zero_for_permuted_predictions() -> None:
    target = torch.randn(30, 16, generator=torch.Generator().manual_seed(3))
    perm = torch.roll(torch.arange(30), 1)  # no fixed point: every row gets another row's target
    got = evaluate_predictions(target[perm], target, chunk_size=4)
    assert got["r_at_1"] == 0.0
    assert got["r_at_1"] == _reference(target[perm], target)["r_at_1"]


def test_ties_count_as_misses() -> None:
    # A zero prediction is equally (0) similar to every target; duplicate targets tie for their rows.
    target = torch.randn(10, 4, generator=torch.Generator().manual_seed(4))
    assert evaluate_predictions(torch.zeros(10, 4), target)["r_at_1"] == 0.0
    dup = target.clone()
    dup[1] = dup[0]
    got = evaluate_predictions(dup.clone(), dup)
    assert got["r_at_1"] == pytest.approx(8 / 10)  # rows 0 and 1 tie with each other


def test_single_row_is_a_hit() -> None:
    assert evaluate_predictions(torch.randn(1, 3), torch.randn(1, 3))["r_at_1"] == 1.0


def test_half_precision_inputs_are_scored_in_float32() -> None:
    target = torch.randn(20, 8, generator=torch.Generator().manual_seed(5))
    got = evaluate_predictions(target.half(), target.half())
    assert got["r_at_1"] == 1.0
    assert isinstance(got["cosine"], float)


@pytest.mark.parametrize(
    ("pred", "target", "name"),
    [
        (torch.zeros(3), torch.zeros(3, 2), "pred"),
        (torch.zeros(3, 2), torch.zeros(3, 2, 1), "target"),
        (torch.zeros(3, 2), torch.zeros(4, 2), "target"),
        (torch.zeros(3, 2), torch.zeros(3, 5), "target"),
        (torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), "pred"),
        ([[0.0, 1.0]], torch.zeros(1, 2), "pred"),
        (torch.zeros(0, 2), torch.zeros(0, 2), "pred"),
    ],
)
def test_bad_shapes_name_the_argument(pred, target, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}:"):
        evaluate_predictions(pred, target)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        embedding_loss(pred, target, 1.0, 1.0)


def test_non_finite_values_are_rejected() -> None:
    pred = torch.randn(3, 2)
    pred[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^pred: .*NaN"):
        evaluate_predictions(pred, torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"^target: "):
        evaluate_predictions(torch.randn(3, 2), torch.full((3, 2), float("inf")))


def test_pair_scores_average_to_the_metrics_and_round_trip_through_npz(tmp_path) -> None:
    from efgraph.training.metrics import load_pair_scores, pair_scores, save_pair_scores

    g = torch.Generator().manual_seed(0)
    target = torch.randn(40, 6, generator=g)
    pred = target + 1.5 * torch.randn(40, 6, generator=g)  # noisy: some hits, some misses
    per_pair = pair_scores(pred, target, chunk_size=7)
    metrics = evaluate_predictions(pred, target)
    assert per_pair["cosine"].shape == per_pair["hit"].shape == (40,)
    assert per_pair["hit"].dtype == bool and 0 < per_pair["hit"].sum() < 40
    assert per_pair["cosine"].mean() == pytest.approx(metrics["cosine"], abs=1e-6)
    assert per_pair["hit"].mean() == pytest.approx(metrics["r_at_1"])
    path = save_pair_scores(tmp_path / "pairs.npz", {"energy-flow": per_pair, "ridge": pair_scores(target, target)})
    back = load_pair_scores(path)
    assert set(back) == {"energy-flow", "ridge"} and back["ridge"]["hit"].all()
    np.testing.assert_array_equal(back["energy-flow"]["cosine"], per_pair["cosine"])
    with pytest.raises(ValueError, match="'a/b'"):
        save_pair_scores(tmp_path / "bad.npz", {"a/b": per_pair})
