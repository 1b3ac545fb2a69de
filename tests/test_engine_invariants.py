"""Invariants of a whole forward: forward-only motion, budgets, energy accounting, occupied cells."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import build_processor, force_spawning, spread_next_energies, tiny_config
from efgraph import create_debug_config
from efgraph.core.flow_state import FlowState
from reference import reference_step


def _x(config, batch=3, seed=0):
    return torch.randn(batch, config.input_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("regime", ["spawning", "dying"])
def test_flows_only_move_forward_and_every_flow_is_accounted_for_each_step(regime):
    """Per step, from flow ids alone (not the engine's counters): every flow present at the start
    continues, arrives or dies, exactly one of them; continuing flows advance >= 1 cell in z;
    children are new ids; and the loop, bounded by D-1 steps, ends with no flow left."""
    overrides = (dict(energy_threshold=0.001, spawn_threshold=0.002) if regime == "spawning"
                 else dict(energy_threshold=0.5, initial_flows_per_sample=6))
    config = tiny_config(lattice_depth=8, **overrides)
    proc = build_processor(config)
    x = _x(config)
    with torch.no_grad():  # short jumps: many steps (a little longer when about half die each step)
        proc.carrier.displacement_head.bias[2] = -4.0 if regime == "spawning" else 0.0
    if regime == "spawning":
        force_spawning(proc)
    else:
        spread_next_energies(proc, x)
    seen = {"spawned": 0, "died": 0, "arrived": 0}
    with torch.no_grad():
        state = proc.inject(x)
        next_id, steps = state.num_flows, 0
        for _ in range(config.lattice_depth - 1):
            if not state.num_flows:
                break
            result = proc.step(state, x.size(0), next_id)
            before = dict(zip(state.flow_id.tolist(), state.pos[:, 2].tolist()))
            after = dict(zip(result.next_state.flow_id.tolist(), result.next_state.pos[:, 2].tolist()))
            continuing = {f for f in after if f in before}
            children = set(after) - continuing
            arrived = set(result.arrivals.flow_id.tolist())
            died = set(before) - continuing - arrived
            assert not continuing & arrived and len(arrived) == result.arrivals.flow_id.numel()
            assert len(died) == result.num_died
            assert children == set(range(next_id, next_id + result.num_spawned))
            for f in continuing:
                assert math.floor(after[f]) >= math.floor(before[f]) + 1
            seen["spawned"] += len(children)
            seen["died"] += len(died)
            seen["arrived"] += len(arrived)
            next_id += result.num_spawned
            state, steps = result.next_state, steps + 1
    assert state.num_flows == 0, "flows left after D-1 steps"
    assert steps > 2
    if regime == "spawning":
        assert seen["spawned"] > 0
    else:
        assert seen["died"] > 0 and seen["arrived"] > 0


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


def _state_from_rows(rows: list[dict], like: FlowState) -> FlowState:
    """A FlowState built from the slow reference's per-flow rows (not from the engine's tensors)."""
    if not rows:
        none = torch.zeros(0, dtype=torch.long)
        return FlowState(h=like.h[:, :0], c=None if like.c is None else like.c[:, :0], pos=like.pos[:0],
                         energy=like.energy[:0], batch=none, flow_id=none)
    return FlowState(
        h=torch.stack([r["h"] for r in rows], dim=1),
        c=None if rows[0]["c"] is None else torch.stack([r["c"] for r in rows], dim=1),
        pos=torch.tensor([list(r["pos"]) for r in rows], dtype=torch.float32),
        energy=torch.tensor([r["energy"] for r in rows], dtype=torch.float32),
        batch=torch.tensor([r["batch"] for r in rows]),
        flow_id=torch.tensor([r["flow_id"] for r in rows]),
    )


@pytest.mark.parametrize("regime", ["preset", "dying"])
def test_energy_books_balance_at_every_step_recomputed_flow_by_flow(regime):
    """injected + created == in flight + arrived + lost, with every term recomputed per flow by the
    slow reference (its own arithmetic on per-flow energies), compared with the engine's trace."""
    overrides = dict(lattice_depth=8, max_active_flows=20, max_spawn_per_step=4)
    if regime == "dying":
        overrides["energy_threshold"] = 0.5
    config = tiny_config(**overrides)  # preset thresholds 0.1 / 0.8 unless dying
    proc = build_processor(config, seed=3)
    x = _x(config)
    with torch.no_grad():
        proc.carrier.displacement_head.bias[2] = -3.0  # short jumps: many steps
        if regime == "dying":  # next energies spread around the threshold
            spread_next_energies(proc, x)
        proc(x)
        engine_rows = proc.last_trace.energy
        state = proc.inject(x)
        injected = sum(state.energy.tolist())
        created = arrived = lost = 0.0
        rows, next_id, events = [], state.num_flows, {"spawned": 0, "died": 0, "created": 0.0}
        while state.num_flows:
            slow = reference_step(proc, state, x.size(0), next_id)
            created += slow["energy_created"]
            lost += slow["energy_dissipated"] + slow["energy_died"]
            arrived += sum(a["energy"] for a in slow["arrivals"])
            in_flight = sum(r["energy"] for r in slow["next"])
            rows.append([in_flight, arrived, lost, created])
            assert injected + created == pytest.approx(in_flight + arrived + lost, abs=1e-5)
            events["spawned"] += slow["num_spawned"]
            events["died"] += slow["num_died"]
            events["created"] += slow["energy_created"]
            next_id += slow["num_spawned"]
            state = _state_from_rows(slow["next"], state)
    torch.testing.assert_close(engine_rows, torch.tensor(rows), atol=1e-4, rtol=1e-5)
    assert rows[-1][0] == 0.0  # nothing in flight at the end
    assert events["created"] > 0  # the carrier raised some energies
    if regime == "preset":
        assert events["spawned"] > 0
    else:
        assert events["died"] > 0


def test_children_start_with_positive_energy():
    """(Conservation within a spawn is checked against a step re-run without spawning in
    tests/test_properties.py, not against the engine's own books.)"""
    config = tiny_config(energy_threshold=0.001, spawn_threshold=0.002)
    proc = build_processor(config)
    force_spawning(proc)
    with torch.no_grad():
        state = proc.inject(_x(config))
        result = proc.step(state, 3, state.num_flows)
    assert result.num_spawned > 0
    children = result.next_state.flow_id >= state.num_flows
    assert bool((result.next_state.energy[children] > 0).all())


def _preset_processor(**overrides):
    """The debug preset's thresholds and budgets (death 0.1, spawn 0.8, 10 spawns per step) with
    small networks, untrained: the carrier's initial energies sit above the spawn threshold."""
    config = create_debug_config(input_dim=12, output_dim=10, carrier_hidden_dim=32, carrier_num_layers=2,
                                 child_rank=4, face_channels=8, readout_hidden_dim=16, **overrides)
    assert (config.energy_threshold, config.spawn_threshold, config.max_spawn_per_step) == (0.1, 0.8, 10)
    proc = build_processor(config, seed=0)
    with torch.no_grad():
        proc.carrier.displacement_head.bias[2] = -3.0  # short jumps: many steps
        # untrained flows are alike, so their spawn scores share one sign; centre the first
        # step's scores on 0 so that about half of them want to spawn, whatever the seed
        state = proc.inject(_x(config, batch=4))
        heads = proc.flow_step.advance(proc.flow_step.cells(state, 4).transformation, state.h, state.c, state.pos,
                             state.energy)[4]
        proc.carrier.spawn_head.bias[0] -= heads.spawn_score.median()
    return config, proc


def test_at_preset_thresholds_flows_spawn_again_and_again():
    config, proc = _preset_processor()
    with torch.no_grad():
        state = proc.inject(_x(config, batch=4))
        next_id, spawns_of = state.num_flows, {}
        while state.num_flows:
            result = proc.step(state, 4, next_id)
            for fid in result.spawner_flow_id.tolist():
                spawns_of[fid] = spawns_of.get(fid, 0) + 1
            next_id += result.num_spawned
            state = result.next_state
    assert max(spawns_of.values()) >= 3  # one flow spawned in three different steps
    assert any(fid >= 4 * config.initial_flows_per_sample for fid in spawns_of)  # children spawn too


@pytest.mark.parametrize("budget", ["max_spawn_per_step", "max_active_flows"])
def test_at_preset_thresholds_the_per_sample_budgets_bind(budget):
    config, proc = _preset_processor(**({"max_active_flows": 30} if budget == "max_active_flows" else {}))
    batch = 4
    with torch.no_grad():
        state = proc.inject(_x(config, batch=batch))
        next_id, bound = state.num_flows, False
        while state.num_flows:
            result = proc.step(state, batch, next_id)
            children = result.next_state.flow_id >= next_id
            spawned = torch.bincount(result.next_state.batch[children], minlength=batch)
            active = torch.bincount(result.next_state.batch, minlength=batch)
            assert int(spawned.max()) <= config.max_spawn_per_step
            assert int(active.max()) <= config.max_active_flows
            limit = spawned if budget == "max_spawn_per_step" else active
            bound |= bool((limit == getattr(config, budget)).any())
            next_id += result.num_spawned
            state = result.next_state
    assert bound, f"{budget} never bound"


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


def test_neuron_runs_on_one_row_per_flow_and_the_trace_counts_the_occupied_cells():
    # the neuron runs on F rows (a static size, so the step needs no sync to know C): the
    # first C are the occupied cells, the rest padding that no flow reads
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
    assert rows == trace.active
    assert expected == trace.occupied
    assert sum(trace.occupied) < sum(trace.active)  # flows did share cells


def test_trace_holds_no_graph():
    config = tiny_config()
    proc = build_processor(config)
    proc(_x(config)).sum().backward()
    trace = proc.last_trace
    assert not trace.energy.requires_grad and not trace.energy_injected.requires_grad
    summary = trace.summary()  # (its energy fractions are checked against the reference in test_properties.py)
    assert summary["peak_active_flows"] >= summary["initial_flows"] == 12


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_output_of_a_sample_does_not_depend_on_its_batch(radius):
    config = tiny_config(energy_threshold=0.001, spawn_threshold=0.002, interaction_radius=radius)
    proc = build_processor(config)
    force_spawning(proc)
    x = _x(config, batch=3)
    with torch.no_grad():
        together = proc(x)
        alone = torch.cat([proc(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
