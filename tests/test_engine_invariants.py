"""Invariants of a whole forward: forward-only motion, budgets, energy accounting, occupied cells."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import build_processor, force_spawning, tiny_config


def _x(config, batch=3, seed=0):
    return torch.randn(batch, config.input_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spawning", [False, True])
def test_flows_only_move_forward_and_all_are_accounted_for(spawning):
    config = tiny_config(lattice_depth=8, **(dict(energy_threshold=0.001, spawn_threshold=0.002) if spawning else {}))
    proc = build_processor(config)
    if spawning:
        force_spawning(proc)
    with torch.no_grad():
        proc.carrier.displacement_head.bias[2] = -4.0  # short jumps: many steps
    proc.record_paths = True
    with torch.no_grad():
        proc(_x(config))
    trace = proc.last_trace
    assert 1 <= trace.num_steps <= config.lattice_depth - 1
    # z cell of every flow grows by >= 1 between consecutive records; arrivals end on the output face
    last_z: dict[int, float] = {}
    for record in trace.paths:
        for fid, z in zip(record["flow_id"].tolist(), record["pos"][:, 2].tolist()):
            if fid in last_z:
                assert math.floor(z) >= math.floor(last_z[fid]) + 1
            last_z[fid] = z
    assert all(z == config.lattice_depth - 1 for z in trace.paths[-1]["pos"][:, 2].tolist())
    # every flow ends as arrived or died: none is dropped
    assert trace.initial_flows + trace.total_spawned == trace.total_arrived + trace.total_died
    assert trace.num_steps > 2
    if spawning:
        assert trace.total_spawned > 0


def test_a_forward_ends_within_depth_minus_one_steps_even_with_minimal_jumps():
    config = tiny_config(lattice_depth=7)
    proc = build_processor(config)
    with torch.no_grad():
        proc.carrier.displacement_head.weight.zero_()
        proc.carrier.displacement_head.bias[2] = -30.0  # dz == 1 exactly
        proc.carrier.energy_head.bias.fill_(30.0)  # nobody dies
        proc.carrier.spawn_head.bias[0] = -30.0  # nobody spawns
        proc(_x(config))
    trace = proc.last_trace
    assert trace.num_steps == config.lattice_depth - 1
    assert trace.total_arrived == trace.initial_flows


@pytest.mark.parametrize("max_active, max_spawn", [(5, 3), (12, 1), (8, 0), (20, 20)])
def test_budgets_hold_per_sample_every_step_when_everyone_wants_to_spawn(max_active, max_spawn):
    config = tiny_config(initial_flows_per_sample=4, max_active_flows=max_active, max_spawn_per_step=max_spawn,
                         energy_threshold=0.0, spawn_threshold=0.0001, lattice_depth=9)
    proc = build_processor(config)
    force_spawning(proc)
    with torch.no_grad():
        proc.carrier.displacement_head.bias[2] = -4.0
        state = proc.inject(_x(config))
        next_id, any_spawn = state.num_flows, False
        while state.num_flows:
            result = proc.step(state, 3, next_id)
            children = result.next_state.flow_id >= next_id
            spawned = torch.bincount(result.next_state.batch[children], minlength=3)
            active = torch.bincount(result.next_state.batch, minlength=3)
            assert int(spawned.max()) <= max_spawn
            assert int(active.max()) <= max_active
            if max_spawn > 0:  # the budget binds: a sample below max_active with candidates spawns
                continuing = torch.bincount(result.next_state.batch[~children], minlength=3)
                expected = torch.minimum((max_active - continuing).clamp(min=0, max=max_spawn), continuing)
                assert spawned.tolist() == expected.tolist()
            any_spawn |= result.num_spawned > 0
            next_id += result.num_spawned
            state = result.next_state
    assert any_spawn == (max_spawn > 0 and max_active > 4)


@pytest.mark.parametrize("spawning", [False, True])
def test_energy_is_accounted_for_at_every_step(spawning):
    overrides = dict(energy_threshold=0.001, spawn_threshold=0.002) if spawning else dict(energy_threshold=0.3)
    config = tiny_config(lattice_depth=8, **overrides)
    proc = build_processor(config)
    if spawning:
        force_spawning(proc)
    else:
        with torch.no_grad():
            proc.carrier.energy_head.bias.fill_(0.5)  # a real gate: energy is dissipated and flows die
    with torch.no_grad():
        proc.carrier.displacement_head.bias[2] = -3.0
        proc(_x(config))
    trace = proc.last_trace
    injected = float(trace.energy_injected)
    energy = trace.energy
    assert energy.shape == (trace.num_steps, 3)
    torch.testing.assert_close(energy.sum(dim=1), torch.full((trace.num_steps,), injected), rtol=1e-5, atol=1e-5)
    assert float(energy[-1, 0]) == 0.0  # nothing in flight at the end
    assert (energy[:, 2] > 0).all()  # the gate dissipates something every step
    assert trace.total_spawned > 0 if spawning else trace.total_died > 0


def test_spawning_conserves_energy_within_the_step():
    config = tiny_config(energy_threshold=0.001, spawn_threshold=0.002)
    proc = build_processor(config)
    force_spawning(proc)
    with torch.no_grad():
        state = proc.inject(_x(config))
        result = proc.step(state, 3, state.num_flows)
    assert result.num_spawned > 0
    after_gate = state.energy.sum() - result.energy_dissipated - result.energy_died - result.energy_arrived
    assert float(result.next_state.energy.sum()) == pytest.approx(float(after_gate), rel=1e-6)
    children = result.next_state.flow_id >= state.num_flows
    assert bool((result.next_state.energy[children] > 0).all())


def test_children_differ_from_their_parents():
    config = tiny_config(energy_threshold=0.001, spawn_threshold=0.002)
    proc = build_processor(config)
    force_spawning(proc)
    with torch.no_grad():
        state = proc.inject(_x(config))
        nxt = proc.step(state, 3, state.num_flows).next_state
    children = nxt.flow_id >= state.num_flows
    assert children.any()
    parents_h = nxt.h[:, ~children]
    for i in children.nonzero().flatten().tolist():
        assert (nxt.h[:, i : i + 1] - parents_h).abs().amax(dim=(0, 2)).min() > 1e-4


def test_neuron_runs_on_exactly_the_occupied_cells():
    config = tiny_config(lattice_width=3, lattice_height=3)
    proc = build_processor(config)
    proc.record_paths = True
    rows = []
    handle = proc.neuron.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    with torch.no_grad():
        proc(_x(config))
    handle.remove()
    trace = proc.last_trace
    expected = []
    for record in trace.paths[:-1]:  # the last record holds the arrivals, after the final step
        cells = {(b, math.floor(x + 0.5), math.floor(y + 0.5), math.floor(z))
                 for b, (x, y, z) in zip(record["batch"].tolist(), record["pos"].tolist())}
        expected.append(len(cells))
    assert rows == expected == trace.occupied
    assert sum(trace.occupied) < sum(trace.active)  # flows did share cells


def test_trace_holds_no_graph():
    config = tiny_config()
    proc = build_processor(config)
    proc(_x(config)).sum().backward()
    trace = proc.last_trace
    assert not trace.energy.requires_grad and not trace.energy_injected.requires_grad
    summary = trace.summary()
    assert 0.0 <= summary["energy_arrived_fraction"] <= 1.0
    assert summary["peak_active_flows"] >= summary["initial_flows"] == 12


def test_output_of_a_sample_does_not_depend_on_its_batch():
    config = tiny_config(energy_threshold=0.001, spawn_threshold=0.002)
    proc = build_processor(config)
    force_spawning(proc)
    x = _x(config, batch=3)
    with torch.no_grad():
        together = proc(x)
        alone = torch.cat([proc(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
