"""`linear_skip`: a learned linear path from x to y beside the lattice, started at zero."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import build_processor, tiny_config
from efgraph.config import ARCHITECTURE_KEYS, EnergyConfig
from efgraph.data import Split
from efgraph.training.baselines import ResidualRidgeBaseline, start_linear_skip_at_ridge
from efgraph.training.checkpoint import load_checkpoint
from efgraph.training.run import load_pairs, run_training


def _twins(**overrides):
    """A model with the skip and the same model without it (the same lattice weights)."""
    with_skip = build_processor(tiny_config(linear_skip=True, **overrides), seed=0)
    without = build_processor(with_skip.config.replace(linear_skip=False), seed=1)
    without.load_state_dict({k: v for k, v in with_skip.state_dict().items() if not k.startswith("linear_skip.")})
    return with_skip, without


@pytest.mark.parametrize("residual", [False, True])
def test_at_initialisation_the_skip_adds_nothing_and_then_adds_exactly_w_x(residual):
    dims = dict(input_dim=10, output_dim=10) if residual else {}
    with_skip, without = _twins(residual=residual, **dims)
    x = torch.randn(5, with_skip.config.input_dim)
    assert torch.equal(with_skip.linear_skip.weight.detach(), torch.zeros(with_skip.config.output_dim,
                                                                          with_skip.config.input_dim))
    torch.testing.assert_close(with_skip(x), without(x))
    weight = torch.randn_like(with_skip.linear_skip.weight)
    with torch.no_grad():
        with_skip.linear_skip.weight.copy_(weight)
    torch.testing.assert_close(with_skip(x), without(x) + x @ weight.t())


def test_the_skip_gets_a_gradient_even_with_the_lattice_scaled_out():
    """bible.yaml's start: the output gate at 0, so the lattice is silent; the skip still learns."""
    proc = build_processor(tiny_config(linear_skip=True, output_gate_init=0.0), seed=0)
    x, target = torch.randn(4, proc.config.input_dim), torch.randn(4, proc.config.output_dim)
    torch.nn.functional.mse_loss(proc(x), target).backward()
    grad = proc.linear_skip.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the gradient of 0.5 |W x - t|^2 / n at W = 0 is -(t - y0)^T x scaled: check it against autograd's
    y0 = proc(x).detach()
    expected = -2.0 * (target - y0).t() @ x / target.numel()
    torch.testing.assert_close(grad, expected)


def test_the_skip_is_an_architecture_key_and_off_without_it():
    assert "linear_skip" in ARCHITECTURE_KEYS
    assert build_processor(tiny_config(), seed=0).linear_skip is None
    # a config saved before the field existed had no linear path
    old = tiny_config().to_dict()
    del old["linear_skip"]
    assert EnergyConfig.from_saved(old, "old run").linear_skip is False


def test_a_checkpoint_with_the_skip_does_not_load_into_a_model_without_it():
    with_skip, _ = _twins()
    without = build_processor(tiny_config(), seed=0)
    with pytest.raises(RuntimeError, match="linear_skip"):
        without.load_state_dict(with_skip.state_dict())


def test_started_at_the_ridge_the_model_is_the_ridge_until_its_gate_opens():
    """linear_skip_init: ridge with the lattice scaled out (output_gate_init 0, the bible configs)."""
    config = tiny_config(linear_skip=True, linear_skip_init="ridge", residual=True, input_dim=10, output_dim=10,
                         output_gate_init=0.0)
    proc = build_processor(config, seed=0)
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(200, 10, generator=gen)
    tgt = src + src @ torch.randn(10, 10, generator=gen) * 0.3 + 0.1 * torch.randn(200, 10, generator=gen)
    ridge = start_linear_skip_at_ridge(proc, config, src[:150], tgt[:150], src[150:], tgt[150:])
    assert isinstance(ridge, ResidualRidgeBaseline)
    torch.testing.assert_close(proc(src[150:]), ridge.predict(src[150:]), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        proc.output_face.output_gate.fill_(1.0)
    assert not torch.allclose(proc(src[150:]), ridge.predict(src[150:]), atol=1e-3)


def test_a_ridge_start_is_refused_without_the_skip():
    with pytest.raises(ValueError, match="linear_skip_init"):
        tiny_config(linear_skip_init="ridge")
    with pytest.raises(ValueError, match="linear_skip_init: must be one of"):
        tiny_config(linear_skip=True, linear_skip_init="lstsq")
    with pytest.raises(ValueError, match="needs linear_skip: true"):
        start_linear_skip_at_ridge(build_processor(tiny_config(), seed=0), tiny_config(), torch.randn(8, 12), torch.randn(8, 10), torch.randn(4, 12), torch.randn(4, 10))


def test_a_run_with_a_ridge_start_begins_at_the_ridge_of_its_training_split(tmp_path):
    """scripts/train.py's pipeline: the checkpoint after one step (its learning rate still warming
    up from 0) holds the residual ridge of the run's own training split."""
    config = EnergyConfig.from_yaml(Path(__file__).parents[1] / "configs/debug.yaml").with_overrides([
        "dataset=synthetic", "synthetic_pairs=300", "input_dim=16", "output_dim=16", "residual=true",
        "linear_skip=true", "linear_skip_init=ridge", "output_gate_init=0.0", "lattice_width=6", "lattice_height=6",
        "lattice_depth=3", "initial_flows_per_sample=4", "max_active_flows=8", "carrier_hidden_dim=16",
        "batch_size=8", "epochs=1", "warmup_steps=1000", "checkpoint_every=1", "eval_every=1000"])
    run_training(config, tmp_path / "run", wandb_mode="disabled", device="cpu", progress=False, stop_at_step=1)
    train, val, _ = Split.from_json(tmp_path / "run" / "split.json").apply(load_pairs(config, progress=False))
    ridge = ResidualRidgeBaseline(mse_weight=config.mse_weight, cosine_weight=config.cosine_weight).fit(
        train.src, train.tgt, val.src, val.tgt)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    torch.testing.assert_close(state["linear_skip.weight"], ridge.weight.t().float(), rtol=0, atol=1e-5)
