"""Baselines: identity, closed-form ridge, parameter-matched MLP, and the comparison table."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from efgraph.training.baselines import (
    IdentityBaseline,
    MLPBaseline,
    ResidualRidgeBaseline,
    RidgeBaseline,
    TokenTransformer,
    TransformerBaseline,
    format_results_table,
    mlp_hidden_for_params,
    run_baselines,
    transformer_param_count,
    transformer_width_for_params,
)
from efgraph.data.routing import make_routing_pairs
from efgraph.training.metrics import embedding_loss, evaluate_predictions


def _linear_data(n: int, d_in: int, d_out: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(d_in, d_out, generator=g), torch.randn(d_out, generator=g)
    x = torch.randn(n, d_in, generator=g)
    return x, x @ w + b, w, b


def _teacher_splits(seed: int = 0):
    """A small nonlinear teacher (even in its input, so a linear map explains little of it)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(8, 16, generator=g) / 8**0.5 * 2
    w2 = torch.randn(16, 8, generator=g) / 4
    x = torch.randn(768, 8, generator=g)
    y = torch.tanh(x @ w1) ** 2 @ w2
    return (x[:512], y[:512]), (x[512:640], y[512:640]), (x[640:], y[640:])


# --- identity ------------------------------------------------------------------------------------
def test_identity_rejects_width_mismatch() -> None:
    with pytest.raises(ValueError, match="width"):
        IdentityBaseline().fit(torch.randn(4, 3), torch.randn(4, 5))


def test_identity_predicts_its_input() -> None:
    x = torch.randn(5, 3)
    baseline = IdentityBaseline().fit(x, torch.randn(5, 3))
    pred = baseline.predict(x)
    assert torch.equal(pred, x) and pred.data_ptr() != x.data_ptr()
    assert baseline.num_parameters == 0


# --- ridge ---------------------------------------------------------------------------------------
def test_ridge_recovers_exact_linear_map_and_beats_identity() -> None:
    x, y, w, b = _linear_data(200, 8, 8, seed=0)
    ridge = RidgeBaseline(alpha=1e-8).fit(x, y)
    assert ridge.alpha_ == 1e-8
    torch.testing.assert_close(ridge.weight.float(), w, atol=1e-4, rtol=0)
    torch.testing.assert_close(ridge.bias.float(), b, atol=1e-4, rtol=0)
    assert ridge.num_parameters == 8 * 8 + 8

    # Fresh rows through the same map.
    x_test = torch.randn(50, 8, generator=torch.Generator().manual_seed(9))
    y_test = x_test @ w + b
    pred = ridge.predict(x_test)
    assert pred.dtype == torch.float32
    ridge_scores = evaluate_predictions(pred, y_test)
    ident_scores = evaluate_predictions(IdentityBaseline().fit(x, y).predict(x_test), y_test)
    assert ridge_scores["mse"] < 1e-8
    assert ridge_scores["cosine"] > 0.99999
    assert ridge_scores["mse"] < ident_scores["mse"]
    assert ridge_scores["cosine"] > ident_scores["cosine"]


def test_ridge_handles_more_features_than_rows() -> None:
    # N < D_in: the unregularized normal equations are singular; ridge must still be finite.
    x, y, _, _ = _linear_data(10, 32, 4, seed=1)
    pred = RidgeBaseline(alpha=1.0).fit(x, y).predict(x)
    assert torch.isfinite(pred).all()


def test_ridge_picks_the_alpha_with_lowest_validation_loss() -> None:
    # Few noisy rows, many features: heavy shrinkage should help; independent refits decide.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 20, generator=g)
    w = torch.randn(20, 6, generator=g)
    y = x @ w + 3.0 * torch.randn(60, 6, generator=g)
    (xt, yt), (xv, yv) = (x[:30], y[:30]), (x[30:], y[30:])
    grid = [1e-3, 1.0, 30.0, 1e3]
    chosen = RidgeBaseline(alphas=grid).fit(xt, yt, xv, yv)
    refit_losses = {
        a: embedding_loss(RidgeBaseline(alpha=a, alphas=None).fit(xt, yt).predict(xv), yv, 1.0, 1.0).item()
        for a in grid
    }
    assert chosen.alpha_ == min(refit_losses, key=refit_losses.get)
    assert chosen.alpha_ != grid[0]  # the search mattered here
    for a in grid:
        assert chosen.val_losses_[a] == pytest.approx(refit_losses[a], rel=1e-5)


def _near_identity_data(n: int, d: int, seed: int):
    """``y = x + x @ small + shift + noise``: a residual model's kind of task."""
    g = torch.Generator().manual_seed(seed)
    small, shift = 0.3 * torch.randn(d, d, generator=g) / d**0.5, 0.2 * torch.randn(d, generator=g)
    x = torch.randn(n, d, generator=g)
    return x, x + x @ small + shift + 0.3 * torch.randn(n, d, generator=g)


def test_residual_ridge_is_ridge_on_the_residual_plus_the_input() -> None:
    x, y = _near_identity_data(80, 6, seed=4)
    xv = torch.randn(20, 6, generator=torch.Generator().manual_seed(5))
    residual = ResidualRidgeBaseline(alpha=3.0, alphas=None).fit(x, y)
    on_residual = RidgeBaseline(alpha=3.0, alphas=None).fit(x, y - x)
    assert residual.name == "residual-ridge" and residual.num_parameters == 6 * 6 + 6
    torch.testing.assert_close(residual.predict(xv), xv + on_residual.predict(xv))
    # heavy shrinkage leaves identity plus the mean residual (plain ridge would leave the mean target)
    shrunk = ResidualRidgeBaseline(alpha=1e12, alphas=None).fit(x, y)
    torch.testing.assert_close(shrunk.predict(xv), xv + (y - x).mean(0), atol=1e-4, rtol=0)


def test_residual_ridge_selects_alpha_on_the_full_prediction_and_beats_identity() -> None:
    x, y = _near_identity_data(200, 12, seed=6)
    (xt, yt), (xv, yv) = (x[:40], y[:40]), (x[40:], y[40:])  # few rows: shrinkage matters
    grid = [1e-3, 1.0, 30.0, 1e3]
    chosen = ResidualRidgeBaseline(alphas=grid).fit(xt, yt, xv, yv)
    full_losses = {  # loss of src + ridge(src) against the target, as the test will score it
        a: embedding_loss(xv + RidgeBaseline(alpha=a, alphas=None).fit(xt, yt - xt).predict(xv), yv, 1.0, 1.0).item()
        for a in grid
    }
    for a in grid:
        assert chosen.val_losses_[a] == pytest.approx(full_losses[a], rel=1e-5)
    assert chosen.alpha_ == min(full_losses, key=full_losses.get)
    identity_loss = embedding_loss(xv, yv, 1.0, 1.0).item()
    plain = RidgeBaseline(alphas=grid).fit(xt, yt, xv, yv)
    assert chosen.val_losses_[chosen.alpha_] < identity_loss
    assert chosen.val_losses_[chosen.alpha_] < plain.val_losses_[plain.alpha_]
    with pytest.raises(ValueError, match="residual-ridge.*widths"):
        ResidualRidgeBaseline().fit(xt, yt[:, :5])


def test_ridge_rejects_non_positive_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        RidgeBaseline(alpha=0.0)


# --- MLP -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("in_dim", "out_dim", "n_params"),
    [(768, 768, 5_000_000), (16, 8, 1000), (3, 2, 50), (384, 768, 123_457), (10, 10, 21 + 10)],
)
def test_mlp_hidden_matches_param_count(in_dim: int, out_dim: int, n_params: int) -> None:
    hidden = mlp_hidden_for_params(in_dim, out_dim, n_params)
    count = lambda h: sum(  # noqa: E731 - the real module is the reference, not the formula
        p.numel() for p in nn.Sequential(nn.Linear(in_dim, h), nn.GELU(), nn.Linear(h, out_dim)).parameters()
    )
    per_unit = in_dim + out_dim + 1
    assert abs(count(hidden) - n_params) <= per_unit / 2  # within (half) one hidden unit's worth
    for other in (hidden - 1, hidden + 1):
        if other >= 1:
            assert abs(count(other) - n_params) >= abs(count(hidden) - n_params)


def test_mlp_hidden_rejects_budget_below_one_unit() -> None:
    with pytest.raises(ValueError, match="n_params"):
        mlp_hidden_for_params(100, 100, 50)


def test_mlp_lowers_validation_loss_on_nonlinear_teacher() -> None:
    train, val, _ = _teacher_splits()
    kwargs = dict(target_params=1000, batch_size=64, lr=1e-2, seed=0, eval_every=25)
    untrained = MLPBaseline(steps=1, **kwargs).fit(*train, *val)
    trained = MLPBaseline(steps=150, **kwargs).fit(*train, *val)
    assert abs(trained.num_parameters - 1000) <= (8 + 8 + 1) / 2
    assert trained.best_val_loss_ < 0.5 * untrained.best_val_loss_
    # A linear map cannot express this teacher; the MLP must do better than ridge.
    ridge_loss = embedding_loss(RidgeBaseline().fit(*train, *val).predict(val[0]), val[1], 1.0, 1.0).item()
    assert trained.best_val_loss_ < ridge_loss


def test_mlp_keeps_best_validation_checkpoint() -> None:
    train, val, _ = _teacher_splits()
    # 12 training rows and 128 hidden units: the MLP overfits, so validation loss rises again.
    mlp = MLPBaseline(hidden_dim=128, steps=200, batch_size=12, lr=3e-2, weight_decay=0.0, seed=0, eval_every=10)
    mlp.fit(train[0][:12], train[1][:12], *val)
    losses = [loss for _, loss in mlp.history_]
    assert [s for s, _ in mlp.history_] == list(range(10, 201, 10))
    assert mlp.best_step_ < 200 and losses[-1] > 1.05 * min(losses)  # precondition: the test means something
    assert mlp.best_val_loss_ == min(losses)
    final_loss = embedding_loss(mlp.predict(val[0]), val[1], 1.0, 1.0).item()
    assert final_loss == pytest.approx(min(losses), rel=1e-5)


def test_mlp_is_deterministic_and_leaves_global_rng_alone() -> None:
    train, val, test = _teacher_splits()
    kwargs = dict(hidden_dim=16, steps=30, batch_size=32, lr=1e-2, eval_every=10)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = MLPBaseline(seed=5, **kwargs).fit(*train, *val)
    assert torch.equal(torch.rand(3), expected_next)
    b = MLPBaseline(seed=5, **kwargs).fit(*train, *val)
    c = MLPBaseline(seed=6, **kwargs).fit(*train, *val)
    assert torch.equal(a.predict(test[0]), b.predict(test[0]))
    assert not torch.equal(a.predict(test[0]), c.predict(test[0]))


def test_mlp_without_validation_keeps_final_weights() -> None:
    train, _, _ = _teacher_splits()
    mlp = MLPBaseline(hidden_dim=8, steps=5, batch_size=600, lr=1e-2).fit(*train)  # batch > N is fine
    assert mlp.best_step_ == 5 and mlp.best_val_loss_ is None and mlp.history_ == []


def test_a_learned_baseline_trains_in_the_models_loop_batches_and_all() -> None:
    """The baseline's fit is the lattice's loop: the same batches (the loop's epoch permutations
    of its seed, the last batch short) and the same updates as a Trainer run on the same network."""
    from efgraph.training.loop import Trainer

    train, val, _ = _teacher_splits()
    mlp = MLPBaseline(hidden_dim=8, steps=7, batch_size=100, lr=1e-2, eval_every=3, grad_clip=0.5, seed=3)
    mlp.fit(train[0], train[1], *val)
    torch.manual_seed(3)
    net = mlp.build(8, 8)
    seen: list[Tensor] = []
    forward = net.forward
    net.forward = lambda x: (seen.append(x) if net.training else None, forward(x))[1]
    trainer = Trainer(net, mlp.training, device="cpu", progress=False)
    trainer.train(train[0], train[1], total_steps=7, val_inputs=val[0], val_targets=val[1])
    trainer.restore_best()
    sizes = [x.size(0) for x in seen]  # the training forwards
    assert sizes == [100] * 5 + [12, 100]  # 512 rows: an epoch of 6 batches, the last of 12, then the next epoch
    assert torch.equal(net(val[0]), mlp.model(val[0]))


def test_a_non_finite_loss_stops_a_learned_baseline_naming_the_step() -> None:
    train, val, _ = _teacher_splits()
    class BrokenMLP(MLPBaseline):  # a network whose output is NaN from the start
        def build(self, in_dim: int, out_dim: int) -> nn.Module:
            net = super().build(in_dim, out_dim)
            with torch.no_grad():
                net.net[2].bias.fill_(float("nan"))
            return net

    with pytest.raises(FloatingPointError, match=r"step 1: loss is nan \(first non-finite: parameter net.2.bias\)"):
        BrokenMLP(hidden_dim=8, steps=5, batch_size=64, lr=1e-2).fit(*train, *val)


def test_baselines_reject_half_given_validation() -> None:
    train, val, _ = _teacher_splits()
    with pytest.raises(ValueError, match="val_src, val_tgt"):
        RidgeBaseline().fit(*train, val[0], None)


# --- run_baselines / table -----------------------------------------------------------------------
def test_run_baselines_scores_each_baseline_on_test() -> None:
    train, val, test = _teacher_splits()
    kwargs = dict(target_params=600, steps=20, batch_size=32, lr=1e-2, seed=0, mse_weight=1.0, cosine_weight=1.0)
    results = run_baselines(train, val, test, **kwargs)
    assert list(results) == ["identity", "ridge", "mlp", "transformer"]
    identity_expected = evaluate_predictions(test[0], test[1])
    assert results["identity"] == pytest.approx(identity_expected)
    for metrics in results.values():
        assert set(metrics) == {"cosine", "mse", "r_at_1"}

    # Different widths: no identity row.
    narrow = lambda split: (split[0], split[1][:, :5])  # noqa: E731
    results = run_baselines(narrow(train), narrow(val), narrow(test), **kwargs, learned=("mlp",))
    assert list(results) == ["ridge", "mlp"]

    # A residual model is compared with the residual ridge beside the ridge, and a residual MLP.
    results = run_baselines(train, val, test, **kwargs, residual=True, learned=("transformer", "mlp"))
    assert list(results) == ["identity", "ridge", "residual-ridge", "residual-transformer", "residual-mlp"]
    assert list(run_baselines(train, val, test, **kwargs, learned=())) == ["identity", "ridge"]
    with pytest.raises(ValueError, match="baseline_models.*'gru'"):
        run_baselines(train, val, test, **kwargs, learned=("gru",))
    expected = ResidualRidgeBaseline().fit(*train, *val).predict(test[0])
    assert results["residual-ridge"] == pytest.approx(evaluate_predictions(expected, test[1]))


def test_format_results_table() -> None:
    results = {
        "ridge": {"cosine": 0.912345, "mse": 0.00123456, "r_at_1": 0.5},
        "energy|flow": {"cosine": 0.95, "mse": 0.001, "r_at_1": 0.75, "loss": 1.0},
    }
    lines = format_results_table(results).strip().split("\n")
    assert lines[0] == "| model | cosine | MSE | R@1 |"
    assert set(lines[1].replace("|", "").replace("-", "").replace(":", "").strip()) == set()
    assert lines[2] == "| ridge | 0.9123 | 0.001235 | 0.5000 |"
    assert lines[3] == "| energy\\|flow | 0.9500 | 0.001 | 0.7500 |"
    with pytest.raises(ValueError, match="'bad'.*r_at_1"):
        format_results_table({"bad": {"cosine": 1.0, "mse": 0.0}})


def test_residual_mlp_predicts_its_input_plus_the_mlp():
    """What the residual MLP computes (the schedule is checked against the model's below)."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=1)
    mlp = MLPBaseline(hidden_dim=4, steps=3, batch_size=8, lr=1e-2, residual=True)
    mlp.fit(x, x)
    assert mlp.name == "residual-mlp"
    with torch.no_grad():
        inner = mlp.model.net(x)
    assert inner.abs().max() > 1e-3  # the inner MLP is not zero, so the sum below is a real check
    torch.testing.assert_close(mlp.predict(x), x + inner)
    with pytest.raises(ValueError, match="residual"):
        MLPBaseline(hidden_dim=4, steps=1, residual=True).fit(x, x[:, :5])


def test_mlp_baseline_gets_the_models_steps_lr_schedule_clipping_and_budget(tmp_path, monkeypatch):
    """The comparison is fair only if the MLP trains as the model does: same number of optimizer
    steps, the same learning rate at every step (warm-up + cosine), clipping, weight decay, batch
    size and (about) the same parameter count. The model's lr is read from its logged train/lr."""
    import json

    from conftest import tiny_config
    from efgraph import EnergyTrainer, FlowProcessor
    from efgraph.data import make_teacher_pairs
    from efgraph.training.baselines import fit_baselines
    from efgraph.training.run import baseline_options

    config = tiny_config(input_dim=12, output_dim=12, batch_size=16, learning_rate=3e-3, warmup_steps=3,
                         epochs=2, log_every=1, eval_every=4, grad_clip=0.5, weight_decay=0.05)
    pairs = make_teacher_pairs(120, 12, 12, seed=0)
    train, val = (pairs.src[:80], pairs.tgt[:80]), (pairs.src[80:], pairs.tgt[80:])
    torch.manual_seed(0)
    trainer = EnergyTrainer(FlowProcessor.from_config(config), config, run_dir=tmp_path, progress=False)
    trainer.train(*train, val_inputs=val[0], val_targets=val[1], total_steps=7)  # ends mid-epoch on purpose
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    model_lrs = [r["train/lr"] for r in rows if "train/lr" in r]
    assert len(model_lrs) == 7
    n_params = sum(p.numel() for p in trainer.processor.parameters())

    mlp_lrs, clips = [], []
    real_step, real_clip = torch.optim.AdamW.step, torch.nn.utils.clip_grad_norm_

    def recording_step(self, *args, **kwargs):
        mlp_lrs.append(self.param_groups[0]["lr"])
        assert self.param_groups[0]["weight_decay"] == 0.05
        return real_step(self, *args, **kwargs)

    def recording_clip(parameters, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return real_clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    fitted = fit_baselines(train, val, **baseline_options(config, 80, n_params, steps=trainer.total_steps))
    mlp, transformer = fitted[-2:]  # config.baseline_models: "mlp,transformer", the default
    assert (mlp.name, transformer.name) == ("mlp", "transformer")
    assert mlp.batch_size == transformer.batch_size == config.batch_size
    assert mlp_lrs == pytest.approx(model_lrs * 2, rel=1e-12)  # step for step, each learned baseline
    assert clips == [0.5] * 14
    per_unit = 12 + 12 + 1  # a hidden unit's parameters: the budget is matched to within half of one
    assert abs(mlp.num_parameters - n_params) <= per_unit / 2
    width = transformer.shape()["width"]  # the closest multiple of heads: within half a width step
    step = transformer_param_count(12, 12, 8, width + 4, 2) - transformer_param_count(12, 12, 8, width, 2)
    assert abs(transformer.num_parameters - n_params) <= step / 2


# --- Transformer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("in_dim, out_dim, tokens, width, layers", [(84, 48, 8, 64, 2), (7, 3, 2, 4, 1), (16, 16, 5, 12, 3)])
def test_transformer_param_count_is_the_modules(in_dim, out_dim, tokens, width, layers):
    model = TokenTransformer(in_dim, out_dim, tokens=tokens, width=width, layers=layers, heads=4, residual=False)
    assert sum(p.numel() for p in model.parameters()) == transformer_param_count(in_dim, out_dim, tokens, width, layers)
    assert model(torch.randn(3, in_dim)).shape == (3, out_dim)


def test_transformer_width_is_the_multiple_of_heads_closest_to_the_budget():
    for n_params in (20_000, 135_216, 148_000, 1_000_000):
        width = transformer_width_for_params(84, 48, n_params, tokens=8, layers=2, heads=4)
        counts = {w: abs(transformer_param_count(84, 48, 8, w, 2) - n_params) for w in range(4, 1024, 4)}
        assert width % 4 == 0 and counts[width] == min(counts.values())
    assert transformer_width_for_params(84, 48, 135_216, tokens=8, layers=2, heads=4) == 64  # the model
    with pytest.raises(ValueError, match="n_params.*too small"):
        transformer_width_for_params(84, 48, 100, tokens=8, layers=2, heads=4)


def test_transformer_baseline_checks_its_arguments():
    with pytest.raises(ValueError, match="target_params, width"):
        TransformerBaseline(target_params=1000, width=8)
    with pytest.raises(ValueError, match="transformer_width.*multiple of transformer_heads"):
        TransformerBaseline(width=10, heads=4)
    with pytest.raises(ValueError, match="transformer_layers"):
        TransformerBaseline(width=8, layers=0)


def test_residual_transformer_predicts_its_input_plus_the_network():
    x = torch.nn.functional.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    tf = TransformerBaseline(width=8, tokens=2, layers=1, heads=2, steps=3, batch_size=8, lr=1e-2, residual=True).fit(x, x)
    assert tf.name == "residual-transformer" and tf.shape() == {"tokens": 2, "width": 8, "layers": 1, "heads": 2}
    with torch.no_grad():
        inner = tf.model.decode(tf.model.encoder(tf.model.tokenize(x).view(64, 2, 8)).flatten(1))
    torch.testing.assert_close(tf.predict(x), x + inner)


def test_transformer_is_deterministic_and_keeps_its_best_validation_state():
    train, val, _ = _teacher_splits()
    kwargs = dict(width=8, tokens=2, layers=1, heads=2, steps=60, batch_size=32, lr=1e-2, eval_every=10)
    a, b = TransformerBaseline(seed=3, **kwargs).fit(*train, *val), TransformerBaseline(seed=3, **kwargs).fit(*train, *val)
    torch.testing.assert_close(a.predict(val[0]), b.predict(val[0]), rtol=0, atol=0)
    assert a.best_val_loss_ == min(loss for _, loss in a.history_)
    final = embedding_loss(a.predict(val[0]), val[1], 1.0, 1.0).item()
    assert final == pytest.approx(a.best_val_loss_, rel=1e-5)


def test_transformer_routes_where_an_equal_size_mlp_cannot():
    """The peer the lattice is measured against: on routing data (each token to the slot its address
    names) attention routes and an MLP of the same size stays near ridge (small: 6 slots of 4,
    1500 steps; measured 0.77 against 0.42, ridge 0.39)."""
    pairs = make_routing_pairs(6000, slots=6, token_dim=4, seed=0)
    train, val, test = (pairs.src[:4800], pairs.tgt[:4800]), (pairs.src[4800:5400], pairs.tgt[4800:5400]), \
        (pairs.src[5400:], pairs.tgt[5400:])
    options = dict(target_params=20_000, steps=1500, batch_size=64, lr=3e-3, warmup_steps=50, grad_clip=1.0,
                   seed=0, mse_weight=1.0, cosine_weight=1.0, eval_every=200)
    results = run_baselines(train, val, test, **options)
    assert results["transformer"]["cosine"] > 0.7
    assert results["mlp"]["cosine"] < results["ridge"]["cosine"] + 0.1 < results["transformer"]["cosine"] - 0.2
