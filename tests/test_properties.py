"""Property-based tests over valid configs and inputs (hypothesis).

For any valid small config and any finite input: a forward finishes within D-1 steps, respects
the per-sample budgets, accounts for every flow (from flow ids) and every unit of energy (every
flow's energy and the trace's books against the slow per-flow reference, tests/reference.py), and
returns finite outputs; spawning moves energy from parent to child and creates none. Any
out-of-range value of a field raises ValueError naming that field.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import build_processor, force_spawning, tiny_config
from efgraph.utils.memory import flows_per_step_bound
from reference import reference_step

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors, one op after another (the per-flow reference most of all): a second intra-op
    thread only adds waits, 10-20x the time on a loaded 2-core machine (measured: GELU of [1, 32]
    11 ms with 2 threads, 16 us with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@st.composite
def configs_and_inputs(draw):
    width, height = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    depth = draw(st.integers(2, 8))
    k = draw(st.integers(1, min(4, width * height)))
    energy_threshold = draw(st.floats(0.0, 0.6))
    spawn_threshold = draw(st.floats(energy_threshold + 0.01, 1.0))
    config = tiny_config(
        lattice_width=width, lattice_height=height, lattice_depth=depth, initial_flows_per_sample=k,
        max_active_flows=draw(st.integers(k, 3 * k + 4)), max_spawn_per_step=draw(st.integers(0, 5)),
        energy_threshold=energy_threshold, spawn_threshold=spawn_threshold,
        max_lateral_step=draw(st.floats(0.0, 4.0)), carrier_type=draw(st.sampled_from(["gru", "lstm"])),
        aggregation=draw(st.sampled_from(["mean", "sum"])), carrier_num_layers=draw(st.integers(1, 2)),
        interaction_radius=draw(st.integers(0, 2)), survival_gradient=draw(st.booleans()),
    )
    batch = draw(st.integers(1, 4))
    scale = draw(st.floats(0.0, 100.0))
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(batch, config.input_dim, generator=torch.Generator().manual_seed(seed)) * scale
    spawn_bias = draw(st.floats(-5.0, 10.0))
    return config, x, seed, spawn_bias


def _by_id(flow_id: torch.Tensor, energy: torch.Tensor) -> dict[int, float]:
    return dict(zip(flow_id.tolist(), energy.tolist()))


@SETTINGS
@given(configs_and_inputs())
def test_any_valid_forward_keeps_every_invariant(case):
    """Per step, on the engine's own state: forward-only motion, the per-sample budgets (and the
    memory plan's bound on flows per step), every flow
    accounted for from flow ids (continues, arrives or dies, exactly one; children are new ids), and
    every flow's energy, continuing, child or arrival, equal to the slow per-flow reference's
    (tests/reference.py, which shares only the weights). The forward's trace is then checked
    against sums the reference recounts flow by flow on those states, not against the engine's
    own differences: the books (in flight, arrived, lost, created) at every step, the summary's
    energy fractions, and the flow counts."""
    config, x, seed, spawn_bias = case
    proc = build_processor(config, seed=seed % 1000)
    batch_size = x.size(0)
    with torch.no_grad():
        proc.carrier.spawn_head.bias[0] = spawn_bias
        y = proc(x)
        trace = proc.last_trace
        state = proc.inject(x)
        injected = sum(state.energy.tolist())
        next_id, rows, counts = state.num_flows, [], {"active": [], "spawned": [], "died": [], "arrived": []}
        arrived = lost = created = 0.0
        for _ in range(config.lattice_depth - 1):  # bounded: a bug fails the test instead of hanging it
            if not state.num_flows:
                break
            # no sample runs more flows than the memory plan's worst case assumes
            assert int(torch.bincount(state.batch).max()) <= flows_per_step_bound(config)[len(rows)]
            result = proc.step(state, batch_size, next_id)
            slow = reference_step(proc, state, batch_size, next_id)
            nxt = result.next_state
            # forward only: every continuing flow (not a new child) went up by >= 1 cell in z
            old_z = _by_id(state.flow_id, state.pos[:, 2])
            for f, z in _by_id(nxt.flow_id, nxt.pos[:, 2]).items():
                if f in old_z:
                    assert math.floor(z) >= math.floor(old_z[f]) + 1
            # budgets per sample
            active = torch.bincount(nxt.batch, minlength=batch_size)
            spawned = torch.bincount(nxt.batch[nxt.flow_id >= next_id], minlength=batch_size)
            assert int(active.max()) <= config.max_active_flows
            assert int(spawned.max()) <= config.max_spawn_per_step
            # every flow accounted for, from ids alone
            next_energy = _by_id(nxt.flow_id, nxt.energy)
            arrival_energy = _by_id(result.arrivals.flow_id, result.arrivals.energy)
            continuing = set(old_z) & set(next_energy)
            died = set(old_z) - continuing - set(arrival_energy)
            assert not continuing & set(arrival_energy) and set(arrival_energy) <= set(old_z)
            assert set(next_energy) - continuing == set(range(next_id, next_id + result.num_spawned))
            # every flow's energy, against the reference's
            slow_next = {r["flow_id"]: r["energy"] for r in slow["next"]}
            slow_arrivals = {a["flow_id"]: a["energy"] for a in slow["arrivals"]}
            assert next_energy.keys() == slow_next.keys() and arrival_energy.keys() == slow_arrivals.keys()
            assert len(died) == slow["num_died"]
            for f, e in [*next_energy.items(), *arrival_energy.items()]:
                assert e == pytest.approx({**slow_next, **slow_arrivals}[f], abs=1e-5)
                assert 0.0 <= e <= 1.0
            # the books, recounted flow by flow by the reference
            arrived += sum(slow_arrivals.values())
            lost += slow["energy_dissipated"] + slow["energy_died"]
            created += slow["energy_created"]
            rows.append([sum(slow_next.values()), arrived, lost, created])
            for name, n in [("active", state.num_flows), ("spawned", slow["num_spawned"]),
                            ("died", slow["num_died"]), ("arrived", len(slow_arrivals))]:
                counts[name].append(n)
            next_id += len(set(next_energy) - continuing)
            state = nxt
        assert state.num_flows == 0 and len(rows) <= config.lattice_depth - 1
    # the forward's trace against the recount
    assert float(trace.energy_injected) == pytest.approx(injected, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(trace.energy, torch.tensor(rows), rtol=1e-5, atol=1e-4)
    for name, per_step in counts.items():
        assert getattr(trace, name) == per_step, name
    summary = trace.summary()
    if injected > 0:
        for name, value in [("arrived", arrived), ("lost", lost), ("created", created)]:
            assert summary[f"energy_{name}_fraction"] == pytest.approx(value / injected, rel=1e-4, abs=1e-5), name
    assert y.shape == (x.size(0), config.output_dim)
    assert torch.isfinite(y).all()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs_and_inputs())
def test_spawning_moves_energy_from_parent_to_child_and_creates_none(case):
    """In a step where flows spawn, each parent's energy plus its child's equals the energy the
    carrier set for that flow, read from the same step run with spawning off (the engine's public
    step results, not its books); the continuing flows that did not spawn are unchanged."""
    config, x, seed, _ = case
    config = config.replace(lattice_depth=max(config.lattice_depth, 3),  # a step that no flow ends in
                            energy_threshold=min(config.energy_threshold, 0.001), spawn_threshold=0.002,
                            max_spawn_per_step=max(config.max_spawn_per_step, 1),
                            max_active_flows=max(config.max_active_flows, config.initial_flows_per_sample + 1))
    proc = build_processor(config, seed=seed % 1000)
    force_spawning(proc)
    with torch.no_grad():
        proc.carrier.displacement_head.bias[2] = -4.0  # short jumps: no flow arrives in the first step
        state = proc.inject(x)
        result = proc.step(state, x.size(0), state.num_flows)
        proc.carrier.spawn_head.bias[0] = -1e4  # the same step, nobody spawns
        alone = proc.step(state, x.size(0), state.num_flows)
    assert result.num_spawned > 0 and alone.num_spawned == 0
    set_by_carrier = _by_id(alone.next_state.flow_id, alone.next_state.energy)
    after = _by_id(result.next_state.flow_id, result.next_state.energy)
    parents = result.spawner_flow_id.tolist()
    # child i belongs to the i-th spawner
    child_of = {p: state.num_flows + i for i, p in enumerate(parents)}
    assert set(after) == set(set_by_carrier) | set(child_of.values())
    for f, energy in set_by_carrier.items():
        got = after[f] + after[child_of[f]] if f in child_of else after[f]
        assert got == pytest.approx(energy, rel=1e-6, abs=1e-7)
        if f in child_of:
            assert 0.0 < after[child_of[f]] <= after[f]  # the child takes less than half


FIELD_BAD_VALUES = {
    "lattice_width": st.integers(-5, 0), "lattice_height": st.integers(-5, 0), "lattice_depth": st.integers(-5, 1),
    "input_dim": st.integers(-5, 0), "carrier_hidden_dim": st.integers(-5, 0), "carrier_num_layers": st.integers(-5, 0),
    "max_spawn_per_step": st.integers(-5, -1), "batch_size": st.integers(-5, 0),
    "energy_threshold": st.one_of(st.floats(-10, -0.001), st.floats(1.001, 10)),
    "spawn_threshold": st.one_of(st.floats(-10, 0.1), st.floats(1.001, 10)),
    "learning_rate": st.floats(-1, 0), "max_lateral_step": st.floats(-10, -0.001),
    "carrier_type": st.text(max_size=5).filter(lambda s: s not in ("gru", "lstm")),
    "aggregation": st.text(max_size=5).filter(lambda s: s not in ("mean", "sum")),
    "val_fraction": st.one_of(st.floats(-1, 0), st.floats(0.5, 2)),
}


@SETTINGS
@given(st.sampled_from(sorted(FIELD_BAD_VALUES)).flatmap(lambda name: st.tuples(st.just(name), FIELD_BAD_VALUES[name])))
def test_any_invalid_value_raises_naming_its_field(case):
    name, value = case
    with pytest.raises(ValueError, match=name):
        tiny_config(**{name: value})
