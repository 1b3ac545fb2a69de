"""Micro-batches and activation checkpointing change the memory of a training step, not its result:
the trainer's own step gives the same gradients (fp tolerance), loss and flow counts."""

from __future__ import annotations

import pytest
import torch

from conftest import build_processor, force_spawning, tiny_config
from efgraph import EnergyTrainer
from efgraph.core.trace import FlowTrace
from efgraph.training.schedule import warmup_cosine_scheduler


def _config(**overrides):
    # energy threshold 0.5 with the next energies spread around it: flows die, live, spawn and arrive
    base = dict(batch_size=7, energy_threshold=0.5, spawn_threshold=0.6, max_active_flows=10, lattice_depth=6,
                grad_clip=1e9, learning_rate=1e-3, log_every=1)
    return tiny_config(**{**base, **overrides})


def _trainer(config) -> EnergyTrainer:
    proc = build_processor(config, seed=0)
    force_spawning(proc)
    with torch.no_grad():  # next energies straddle the 0.5 threshold: some flows die
        proc.carrier.energy_head.weight.mul_(20.0)
        proc.carrier.energy_head.bias.fill_(0.0)
    trainer = EnergyTrainer(proc, config, progress=False)
    trainer.scheduler = warmup_cosine_scheduler(trainer.optimizer, 0, 10)
    return trainer


def _step(config, x, y):
    trainer = _trainer(config)
    metrics = trainer.train_step(x, y)
    # grad_clip is huge: the gradients after the step are the raw accumulated ones
    grads = {name: p.grad.clone() for name, p in trainer.processor.named_parameters() if p.grad is not None}
    return trainer, metrics, grads


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    config = _config()
    return torch.randn(7, config.input_dim, generator=gen), torch.randn(7, config.output_dim, generator=gen)


@pytest.fixture(scope="module")
def whole(batch):
    return _step(_config(), *batch)


def _assert_same_step_as_the_whole_batch(run, whole):
    """The trainer's step ``run`` (trainer, metrics, gradients) equals the whole-batch step: the
    gradients (fp tolerance), the loss and grad norm, the merged trace and the flow metrics."""
    trainer, metrics, grads = run
    ref_trainer, ref_metrics, ref_grads = whole
    assert grads.keys() == ref_grads.keys()
    worst = 0.0
    for name, g in grads.items():
        # fp tolerance: summation order differs (checkpointing alone: exact)
        scale = float(ref_grads[name].abs().max())
        assert (g - ref_grads[name]).abs().max() <= 1e-5 * scale + 1e-12, f"gradient of {name}"
        worst = max(worst, float((g - ref_grads[name]).abs().max()) / max(scale, 1e-30))
    # the README's Memory plan quotes this: python -m pytest -s tests/test_micro_batching.py
    print(f"largest gradient difference to the whole batch, relative to the largest entry: {worst:.1e}")
    trace, ref_trace = trainer.processor.last_trace, ref_trainer.processor.last_trace
    # the dynamics are exercised, and the micro-batches' traces add up to the whole batch's
    assert ref_trace.total_died > 0 and ref_trace.total_spawned > 0 and ref_trace.total_arrived > 0
    for name in ("active", "occupied", "spawned", "died", "arrived"):
        assert getattr(trace, name) == getattr(ref_trace, name), name
    assert trace.batch_size == 7 and trace.initial_flows == ref_trace.initial_flows
    torch.testing.assert_close(trace.energy, ref_trace.energy, rtol=1e-5, atol=1e-5)
    assert metrics["train/loss"] == pytest.approx(ref_metrics["train/loss"], rel=1e-5)
    assert metrics["train/grad_norm"] == pytest.approx(ref_metrics["train/grad_norm"], rel=1e-4)
    for key in ("flows/arrived", "flows/spawned", "flows/died", "flows/mean_active_flows", "flows/active_step_1",
                "flows/energy_arrived_fraction", "flows/neighbourhood_flows", "flows/mean_energy_step_2"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5), key
    # one optimizer step per batch, whatever the micro-batching
    assert trainer.optimizer.state[next(iter(trainer.processor.parameters()))]["step"] == 1


@pytest.mark.parametrize("micro, checkpointing", [(3, False), (1, False), (7, True), (2, True)])
def test_micro_batches_and_checkpointing_give_the_whole_batch_gradient(batch, whole, micro, checkpointing):
    assert whole[0].micro_batch_size == 7 and not whole[0].processor.activation_checkpointing
    run = _step(_config(micro_batch_size=micro, activation_checkpointing=checkpointing), *batch)
    assert run[0].micro_batch_size == micro
    assert run[0].processor.activation_checkpointing == checkpointing
    _assert_same_step_as_the_whole_batch(run, whole)


def test_a_wrong_micro_batch_weighting_in_the_trainer_fails_the_comparison(batch, whole, monkeypatch):
    """The trainer itself, with its micro-batch weighting broken, fails the comparison above, at
    the gradients: 7 rows in micro-batches of 3 + 3 + 1, each micro-batch's mean loss weighted 1/3
    (a plain mean of the micro-batch means) instead of its share of the rows, 3/7, 3/7, 1/7.

    The trainer computes its weight inline (``rows * world / global_batch``, then
    ``embedding_loss(...) * weight``), so the bug is put in through the loss it looks up,
    ``efgraph.training.loop.embedding_loss``, which here cancels the row weight the trainer
    applies after it and puts the unweighted 1/3 in its place."""
    from efgraph.training import loop as loop_module

    rows, chunks = 7, 3
    real_loss = loop_module.embedding_loss

    def mean_of_micro_batch_means(pred, target, *weights):
        return real_loss(pred, target, *weights) * (rows / pred.size(0)) / chunks

    monkeypatch.setattr(loop_module, "embedding_loss", mean_of_micro_batch_means)
    run = _step(_config(micro_batch_size=3), *batch)
    assert run[0].micro_batch_size == 3 and batch[0].size(0) == rows
    with pytest.raises(AssertionError, match="gradient of"):
        _assert_same_step_as_the_whole_batch(run, whole)


def test_flow_summaries_only_on_logging_steps_and_the_arrival_count_kept(batch):
    trainer = _trainer(_config(micro_batch_size=3))
    quiet = trainer.train_step(*batch, log=False)
    assert not any(k.startswith(("flows/active_step_", "memory/")) for k in quiet)
    assert "flows/energy_arrived_fraction" not in quiet
    assert trainer._last_step_arrivals == trainer.processor.last_trace.total_arrived > 0  # for the dead-run alarm
    loud = trainer.train_step(*batch, log=True)
    assert "flows/active_step_1" in loud and "flows/energy_arrived_fraction" in loud


def test_merge_traces_adds_micro_batches_of_different_lengths():
    config = _config()
    proc = build_processor(config)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, config.input_dim, generator=gen) for n in (2, 3)]
    with torch.no_grad():  # pinned: part one takes 1 step (jumps to the output face), part two 5
        proc.carrier.energy_head.weight.zero_()
        proc.carrier.energy_head.bias.fill_(30.0)
        proc.carrier.displacement_head.weight[2].zero_()
        proc.carrier.displacement_head.bias[2] = 30.0
        proc(xs[0])
        short = proc.last_trace
        proc.carrier.displacement_head.bias[2] = -30.0
        proc(xs[1])
        long = proc.last_trace
    assert (short.num_steps, long.num_steps) == (1, 5)
    merged = FlowTrace.merge([short, long])
    assert merged.batch_size == 5 and merged.num_steps == 5
    assert merged.active == [short.active[0] + long.active[0], *long.active[1:]]
    assert merged.total_arrived == short.total_arrived + long.total_arrived
    # cumulative books: the short part's final row is carried on at later steps
    torch.testing.assert_close(merged.energy[-1], short.energy[-1] + long.energy[-1])
    injected = float(merged.energy_injected)
    in_flight, arrived, lost, created = merged.energy[-1].tolist()
    assert injected + created == pytest.approx(in_flight + arrived + lost, rel=1e-5)
