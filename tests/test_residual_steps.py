"""`residual_steps`: a deep lattice that starts as the one-step lattice and learns to use its steps."""

from __future__ import annotations

import pytest
import torch

from conftest import build_processor, tiny_config


def _one_step_twin(deep):
    """The one-step lattice (depth 2) with the deep model's weights (it has no step gates)."""
    one = build_processor(deep.config.replace(lattice_depth=2), seed=1)
    state = {k: v for k, v in deep.state_dict().items() if k != "flow_step.gates"}
    one.load_state_dict(state)
    return one


@pytest.mark.parametrize("carrier_type", ["gru", "lstm"])
@pytest.mark.parametrize("readout", ["face", "shared"])
def test_a_deep_lattice_with_every_gate_closed_computes_the_one_step_output(carrier_type, readout):
    deep = build_processor(tiny_config(residual_steps=True, lattice_depth=6, carrier_type=carrier_type,
                                       readout=readout), seed=0)
    assert deep.flow_step.gates is not None and torch.equal(deep.flow_step.gates.detach(), torch.zeros(4))
    one = _one_step_twin(deep)
    x = torch.randn(5, deep.config.input_dim)
    y_deep, y_one = deep(x), one(x)
    torch.testing.assert_close(y_deep, y_one, rtol=1e-5, atol=1e-6)
    # the deep forward really took more than one step, and nothing spawned on the way
    assert len(deep.last_trace.active) > 1
    assert sum(deep.last_trace.spawned) == 0


def test_open_gates_make_the_later_steps_count_and_every_gate_gets_a_gradient():
    deep = build_processor(tiny_config(residual_steps=True, lattice_depth=6), seed=0)
    one = _one_step_twin(deep)
    x = torch.randn(5, deep.config.input_dim)
    y = deep(x)
    y.square().sum().backward()
    steps = len(deep.last_trace.active)
    assert steps > 1
    grad = deep.flow_step.gates.grad
    # the gates of the steps that ran get a gradient at 0 (ReZero), the others none
    assert torch.all(grad[: steps - 1] != 0), grad
    with torch.no_grad():
        deep.flow_step.gates.fill_(0.5)
    assert not torch.allclose(deep(x), one(x), atol=1e-4)


def test_a_gate_outside_zero_one_is_clamped_in_the_forward_and_still_learns():
    deep = build_processor(tiny_config(residual_steps=True, lattice_depth=6), seed=0)
    one = _one_step_twin(deep)
    x = torch.randn(4, deep.config.input_dim)
    with torch.no_grad():
        deep.flow_step.gates.fill_(-0.3)  # closed: the forward is the one-step model's
    torch.testing.assert_close(deep(x), one(x), rtol=1e-5, atol=1e-6)
    deep(x).sum().backward()
    assert deep.flow_step.gates.grad.abs().sum() > 0  # straight through the clamp: it can reopen
    with torch.no_grad():
        deep.flow_step.gates.fill_(1.0)
        full = deep(x)
        deep.flow_step.gates.fill_(7.0)  # above 1 acts as 1
        torch.testing.assert_close(deep(x), full)


def test_energies_stay_in_range_and_the_books_balance_with_open_gates():
    deep = build_processor(tiny_config(residual_steps=True, lattice_depth=6), seed=3)
    with torch.no_grad():
        deep.flow_step.gates.copy_(torch.tensor([0.2, 0.5, 0.9, 1.0]))
        deep.carrier.spawn_head.bias[0] = 5.0  # spawning on at the open steps
    x = torch.randn(6, deep.config.input_dim)
    deep(x)
    trace = deep.last_trace
    assert sum(trace.spawned) > 0
    assert trace.spawned[0] == 0  # the first step never spawns
    in_flight, arrived, lost, created = (float(v) for v in trace.energy_rows[-1])
    injected = float(trace.energy_injected)
    assert in_flight == pytest.approx(0.0, abs=1e-6)
    assert injected + created == pytest.approx(arrived + lost, rel=1e-5)


def test_residual_steps_change_nothing_in_a_one_step_lattice():
    config = tiny_config(lattice_depth=2)
    plain = build_processor(config, seed=0)
    gated = build_processor(config.replace(residual_steps=True), seed=0)
    assert gated.flow_step.gates is None
    x = torch.randn(4, config.input_dim)
    torch.testing.assert_close(plain(x), gated(x), rtol=0, atol=0)


def test_the_trainer_logs_each_later_steps_gate():
    from efgraph import EnergyTrainer, FlowProcessor
    from efgraph.data import make_teacher_pairs

    config = tiny_config(input_dim=12, output_dim=12, lattice_depth=5, residual_steps=True, batch_size=20,
                         warmup_steps=1, eval_every=100, log_every=1, checkpoint_every=100)
    trainer = EnergyTrainer(FlowProcessor.from_config(config), config, progress=False)
    pairs = make_teacher_pairs(20, 12, 12, seed=0)
    trainer.train(pairs.src, pairs.tgt, epochs=1)
    metrics = trainer.train_step(pairs.src, pairs.tgt, log=True)
    # depth 5: lattice steps 1-4, of which 2-4 are gated, each logged at its learned value
    assert [k for k in metrics if k.startswith("model/step_gate_")] == [f"model/step_gate_{t}" for t in (2, 3, 4)]
    assert [metrics[f"model/step_gate_{t}"] for t in (2, 3, 4)] == trainer.processor.flow_step.gates.tolist()
    assert trainer.processor.flow_step.gates.abs().sum() > 0  # the steps trained moved them off 0


def _train_with_a_gate_pushed_closed(project: bool):
    """A depth-5 lattice whose first gate starts far below 0 (as a long-closed gate ends), trained a
    few steps; returns the trained gates."""
    from efgraph import EnergyTrainer, FlowProcessor
    from efgraph.data import make_teacher_pairs

    config = tiny_config(input_dim=12, output_dim=12, lattice_depth=5, residual_steps=True, batch_size=20,
                         project_step_gates=project, warmup_steps=1, eval_every=100, log_every=100,
                         checkpoint_every=100)
    processor = FlowProcessor.from_config(config)
    with torch.no_grad():
        processor.flow_step.gates.copy_(torch.tensor([-2.0, 0.5, 3.0]))
    trainer = EnergyTrainer(processor, config, progress=False)
    pairs = make_teacher_pairs(20, 12, 12, seed=0)
    trainer.train(pairs.src, pairs.tgt, epochs=3)
    return trainer.processor.flow_step.gates.detach()


def test_projected_gates_stay_in_the_unit_interval_and_free_ones_do_not():
    projected = _train_with_a_gate_pushed_closed(project=True)
    assert ((projected >= 0) & (projected <= 1)).all(), projected
    free = _train_with_a_gate_pushed_closed(project=False)
    assert free[0] < -1.5 and free[2] > 2.5, free  # Adam moves a gate ~lr a step: far out stays far out


def test_projecting_gates_changes_no_forward():
    config = tiny_config(residual_steps=True, lattice_depth=5)
    gates = torch.tensor([0.0, 0.3, 1.0])
    outs = []
    for project in (False, True):
        proc = build_processor(config.replace(project_step_gates=project), seed=0)
        with torch.no_grad():
            proc.flow_step.gates.copy_(gates)
        proc.project_parameters()  # in range: untouched
        assert torch.equal(proc.flow_step.gates.detach(), gates)
        outs.append(proc(torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0))))
    assert torch.equal(outs[0], outs[1])
