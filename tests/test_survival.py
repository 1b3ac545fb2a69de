"""Death without a gradient cliff: the dead-lattice mechanism (issue 11) and the survival gradient.

Mechanism: a flow under ``energy_threshold`` leaves the active set, so nothing it would have done
is computed and no gradient reaches the parameters that made it die. When *every* flow dies before
the output face, the output is ``x + readout_bias`` whatever the lattice's parameters are: every
other gradient is exactly zero and the optimiser can never leave that state. The survival
gradient (:mod:`efgraph.core.survival`) lets dying flows send a surrogate gradient with no change
to the forward.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_processor, spread_next_energies, tiny_config


def _dead_processor(survival: bool, seed: int = 0, gate: float = 0.0):
    """A residual model whose flows all die in their first step (next energy ~ sigmoid(-4) = 0.018),
    with the residual configs' closed gate by default."""
    config = tiny_config(input_dim=10, output_dim=10, residual=True, survival_gradient=survival,
                         max_active_flows=8, max_spawn_per_step=2, output_gate_init=gate)
    proc = build_processor(config, seed=seed)
    with torch.no_grad():
        proc.carrier.energy_head.bias.fill_(-4.0)
    return config, proc


def _teacher_batches(seed: int, steps: int, batch: int = 32):
    """Residual teacher pairs (x, x + tanh(x W)): a task the lattice can help with."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=g)
    teacher = torch.randn(10, 10, generator=g) * 0.5
    for _ in range(steps):
        xb = x[torch.randint(0, 256, (batch,), generator=g)]
        yield xb, xb + torch.tanh(xb @ teacher)


def test_a_dead_lattice_outputs_x_plus_bias_and_sends_no_gradient_without_the_survival_gradient():
    config, proc = _dead_processor(survival=False)
    x, target = next(_teacher_batches(0, 1))
    y = proc(x)
    assert proc.last_trace.total_arrived == 0 and proc.last_trace.total_died == proc.last_trace.initial_flows
    torch.testing.assert_close(y, x + proc.output_face.readout_bias)
    torch.nn.functional.mse_loss(y, target).backward()
    alive = [name for name, p in proc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert alive == ["output_face.readout_bias"]


def test_the_survival_gradient_changes_no_output_and_reaches_the_energy_head():
    x, target = next(_teacher_batches(0, 1))
    grads, outputs = {}, {}
    for survival in (False, True):
        _, proc = _dead_processor(survival)
        with torch.no_grad():  # half alive: the forward must be identical with and without phantoms
            proc.carrier.energy_head.weight.mul_(30.0)
            proc.carrier.energy_head.bias.fill_(-1.5)
        y = proc(x)
        assert 0 < proc.last_trace.total_died < proc.last_trace.initial_flows + proc.last_trace.total_spawned
        torch.nn.functional.mse_loss(y, target).backward()
        outputs[survival], grads[survival] = y.detach(), proc.carrier.energy_head.bias.grad.clone()
    assert torch.equal(outputs[False], outputs[True])
    assert not torch.equal(grads[False], grads[True])


@pytest.mark.parametrize("gate", [0.0, 1.0])
def test_the_survival_gradient_points_where_keeping_the_flow_alive_would(gate, monkeypatch):
    """For every flow that dies, the sign of the surrogate gradient on its energy logit equals the
    sign of a finite difference: the loss with that flow kept alive (depositing, at the threshold
    energy, its value where it stood) minus the loss without it. One lattice step (depth 2), so a
    flow that lives arrives at once and "kept alive" is exactly one more deposit. The gate closed
    (the default) must not silence the signal: the finite difference is then taken as if the gate
    were open (a closed gate makes every deposit count 0), which is what the phantom reads."""
    import efgraph.core.flow_processor as fp

    config = tiny_config(input_dim=10, output_dim=10, lattice_depth=2, energy_threshold=0.5,
                         output_gate_init=gate, initial_flows_per_sample=6)
    proc = build_processor(config, seed=4)
    x, target = next(_teacher_batches(0, 1, batch=4))
    spread_next_energies(proc, x)  # energies straddle the threshold: half of the flows die
    logits = []

    def keep_logits(energy_logit, threshold):
        energy_logit.retain_grad()
        logits.append(energy_logit)
        return fp_survival(energy_logit, threshold)

    fp_survival = fp.survival_phantom_energy
    monkeypatch.setattr(fp, "survival_phantom_energy", keep_logits)
    results = []
    step = proc.step
    monkeypatch.setattr(proc, "step", lambda *args, **kwargs: results.append(step(*args, **kwargs)) or results[-1])
    y = proc(x)
    loss = torch.nn.functional.mse_loss(y, target)
    loss.backward()
    died = proc.last_trace.total_died
    assert died >= 8 and len(logits) == 1 and len(results) == 1
    dying = results[0].phantoms.batch < x.size(0)  # the step's rows that died (the phantoms' rows)
    assert int(dying.sum()) == died
    surrogate = logits[0].grad[dying]
    lat, ph = proc.output_face, results[0].phantoms.deposited(x.size(0))
    open_gate = max(abs(float(lat.output_gate.detach())), 1.0)
    agree = 0
    with torch.no_grad():
        for i in range(died):
            kept = lat.collect(ph.batch[i:i + 1], ph.xy[i:i + 1],
                              torch.tensor([config.energy_threshold]), ph.value[i:i + 1], x.size(0))
            y_kept = y.detach() + open_gate * lat.readout_out(kept)
            delta = torch.nn.functional.mse_loss(y_kept, target) - loss.detach()
            assert surrogate[i] != 0 and delta != 0
            agree += int(torch.sign(surrogate[i]) == torch.sign(delta))
    assert agree == died


@pytest.mark.parametrize("gate", [0.0, 1.0])
@pytest.mark.parametrize("survival", [False, True])
def test_training_recovers_from_a_dead_lattice_only_with_the_survival_gradient(survival, gate):
    """At the residual configs' closed gate (0) and the default open one (1)."""
    _, proc = _dead_processor(survival, seed=2, gate=gate)
    opt = torch.optim.AdamW(proc.parameters(), lr=3e-3)
    arrivals = []
    for x, target in _teacher_batches(2, 60):
        loss = torch.nn.functional.mse_loss(proc(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        arrivals.append(proc.last_trace.total_arrived)
    if survival:
        assert sum(arrivals[-10:]) > 0, f"still dead after 60 steps: {arrivals}"
    else:
        assert sum(arrivals) == 0  # absorbing: nothing ever arrives again
