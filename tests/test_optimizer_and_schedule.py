"""AdamW's two groups (weight decay on matrices only; one group with weight_decay_on: all) and the warm-up +
cosine schedule against torch's."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from conftest import tiny_config
from efgraph import EnergyTrainer, FlowProcessor
from efgraph.training.baselines import MLPBaseline
from efgraph.training.optim import DECAY_GROUP, NO_DECAY_GROUP, adamw, weight_decay_groups
from efgraph.training.schedule import warmup_cosine_scheduler


def _names_by_group(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in optimizer.param_groups]


def _covers_every_parameter_once(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(set(grouped))  # no parameter twice
    assert set(grouped) == {id(p) for p in model.parameters()}  # and none left out


def test_trainer_decays_matrices_but_not_the_gate_biases_or_scalars():
    config = tiny_config(weight_decay=0.1)
    trainer = EnergyTrainer(FlowProcessor.from_config(config), config, progress=False)
    model, opt = trainer.processor, trainer.optimizer
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    decay, no_decay = _names_by_group(model, opt)
    _covers_every_parameter_once(model, opt)
    for name in ("output_face.output_gate", "input_face.energy_bias", "output_face.readout_bias"):
        assert name in no_decay, name
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    assert {n for n in shapes if "bias" in n.rsplit(".", 1)[-1]} <= no_decay  # every bias, GRU's bias_ih too
    assert no_decay == {n for n, s in shapes.items() if len(s) < 2}
    assert decay == {n for n, s in shapes.items() if len(s) >= 2}
    assert "flow_step.carrier.rnn.weight_hh_l0" in decay and "output_face.readout_out.weight" in decay

    # what that means for a step: with zero gradients AdamW's update is 0 and only the decay acts,
    # so the matrices shrink by lr * weight_decay and the gate (the lattice's scale) stays put
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    gate, matrix = model.output_face.output_gate.detach().clone(), model.output_face.readout_out.weight.detach().clone()
    lr = opt.param_groups[0]["lr"]
    opt.step()
    assert torch.equal(model.output_face.output_gate.detach(), gate)
    torch.testing.assert_close(model.output_face.readout_out.weight.detach(), matrix * (1 - lr * 0.1))


def test_groups_leave_norm_weights_out_of_decay_and_hold_a_shared_parameter_once():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 4, bias=False))
    model[2].weight = nn.Parameter(torch.randn(4, 6))
    model.append(nn.Linear(6, 4))
    model[3].weight = model[2].weight  # tied
    opt = adamw(model, lr=1e-3, weight_decay=0.2)
    decay, no_decay = _names_by_group(model, opt)
    _covers_every_parameter_once(model, opt)
    assert no_decay == {"0.bias", "1.weight", "1.bias", "3.bias"}  # the norm's scale and shift included
    assert decay == {"0.weight", "2.weight"}
    assert opt.param_groups[DECAY_GROUP]["weight_decay"] == 0.2 and opt.param_groups[NO_DECAY_GROUP]["weight_decay"] == 0
    # the layout is fixed: a model without 1-D parameters still has the (empty) no-decay group
    groups = weight_decay_groups(nn.Linear(3, 3, bias=False), 0.1)
    assert [len(g["params"]) for g in groups] == [1, 0]


def test_mlp_baseline_uses_the_same_groups(monkeypatch):
    seen = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        if not seen:
            seen.append([(g["weight_decay"], [tuple(p.shape) for p in g["params"]]) for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    x = torch.randn(32, 5)
    MLPBaseline(hidden_dim=7, steps=2, batch_size=8, weight_decay=0.05).fit(x, x)
    assert seen == [[(0.05, [(7, 5), (5, 7)]), (0.0, [(7,), (5,)])]]


def test_weight_decay_on_all_is_one_group_that_decays_every_parameter_for_trainer_and_mlp(monkeypatch):
    """What efgraph did before the two groups (and what a run saved then resumes with)."""
    config = tiny_config(weight_decay=0.1, weight_decay_on="all")
    trainer = EnergyTrainer(FlowProcessor.from_config(config), config, progress=False)
    model, opt = trainer.processor, trainer.optimizer
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1]
    _covers_every_parameter_once(model, opt)
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    for p in model.parameters():  # zero gradients: only the decay acts, now on the gate too
        p.grad = torch.zeros_like(p)
    gate, lr = model.output_face.output_gate.detach().clone(), opt.param_groups[0]["lr"]
    opt.step()
    torch.testing.assert_close(model.output_face.output_gate.detach(), gate * (1 - lr * 0.1))

    seen = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        if not seen:
            seen.append([(g["weight_decay"], [tuple(p.shape) for p in g["params"]]) for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    x = torch.randn(32, 5)
    MLPBaseline(hidden_dim=7, steps=2, batch_size=8, weight_decay=0.05, weight_decay_on="all").fit(x, x)
    assert seen == [[(0.05, [(7, 5), (7,), (5, 7), (5,)])]]
    with pytest.raises(ValueError, match="weight_decay_on: must be one of"):
        tiny_config(weight_decay_on="vectors")
    with pytest.raises(ValueError, match="weight_decay_on: must be one of"):
        weight_decay_groups(model, 0.1, "vectors")


def test_resume_restores_both_groups_and_ends_with_the_same_parameters(tmp_path):
    """An uninterrupted run and one stopped at step 3 and resumed end equal (two groups in the state)."""
    config = tiny_config(weight_decay=0.1, epochs=2, checkpoint_every=3, eval_every=100, log_every=100)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, config.input_dim, generator=g), torch.randn(12, config.output_dim, generator=g)

    def trainer(run_dir):
        torch.manual_seed(0)
        return EnergyTrainer(FlowProcessor.from_config(config), config, run_dir=run_dir, progress=False)

    whole = trainer(tmp_path / "whole")
    whole.train(x, y)
    stopped = trainer(tmp_path / "stopped")
    stopped.train(x, y, max_steps=3)
    resumed = trainer(tmp_path / "resumed")
    resumed.train(x, y, resume_from=tmp_path / "stopped" / "checkpoints" / "last.pt")
    state = resumed.optimizer.state_dict()
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.1, 0.0]
    assert resumed.step == whole.step == 8
    for (name, a), b in zip(whole.processor.named_parameters(), resumed.processor.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# ---- the schedule ----------------------------------------------------------------------------------
def _lrs(scheduler_of, steps: int, current_step: int = 0) -> list[float]:
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    scheduler = scheduler_of(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


def _torch_schedule(warmup: int, total: int):
    def build(opt):
        cosine = CosineAnnealingLR(opt, T_max=total - warmup)
        if warmup == 0:
            return cosine
        return SequentialLR(opt, [LinearLR(opt, start_factor=1 / warmup, total_iters=warmup - 1), cosine],
                            milestones=[warmup])
    return build


@pytest.mark.parametrize("warmup, total", [(4, 20), (0, 10), (1, 7), (2, 9), (30, 200)])
def test_schedule_equals_torch_sequential_linear_then_cosine_step_by_step(warmup, total):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's deprecation notices about epoch arguments
        theirs = _lrs(_torch_schedule(warmup, total), total + 1)
    ours = _lrs(lambda opt: warmup_cosine_scheduler(opt, warmup, total), total + 1)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    assert ours[0] == pytest.approx(0.5 / max(warmup, 1)) and ours[-1] == pytest.approx(0.0, abs=1e-12)
    # current_step = k continues where k steps of the fresh schedule left off, to the end
    for k in (1, warmup, total // 2, total - 1):
        later = _lrs(lambda opt: warmup_cosine_scheduler(opt, warmup, total, current_step=k), total + 1 - k)
        assert later == pytest.approx(theirs[k:], rel=1e-9, abs=1e-12), k
