"""Property-based tests over valid configs and inputs (hypothesis).

For any valid small config and any finite input: a forward finishes within D-1 steps, respects
the per-sample budgets, accounts for every flow and every unit of energy, and returns finite
outputs. Any out-of-range value of a field raises ValueError naming that field.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import build_processor, tiny_config

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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


@SETTINGS
@given(configs_and_inputs())
def test_any_valid_forward_keeps_every_invariant(case):
    config, x, seed, spawn_bias = case
    proc = build_processor(config, seed=seed % 1000)
    with torch.no_grad():
        proc.carrier.spawn_head.bias[0] = spawn_bias
        state = proc.inject(x)
        batch_size = x.size(0)
        injected = float(state.energy.sum())
        created, ended, steps, next_id = state.num_flows, 0, 0, state.num_flows
        arrived_energy = lost_energy = created_energy = 0.0
        for _ in range(config.lattice_depth - 1):  # bounded: a bug fails the test instead of hanging it
            if not state.num_flows:
                break
            result = proc.step(state, batch_size, next_id)
            steps += 1
            nxt = result.next_state
            # forward only: every continuing flow (not a new child) went up by >= 1 cell in z
            old_z = {int(f): float(z) for f, z in zip(state.flow_id, state.pos[:, 2])}
            for f, z in zip(nxt.flow_id.tolist(), nxt.pos[:, 2].tolist()):
                if f in old_z:
                    assert math.floor(z) >= math.floor(old_z[f]) + 1
            # budgets per sample
            active = torch.bincount(nxt.batch, minlength=batch_size)
            spawned = torch.bincount(nxt.batch[nxt.flow_id >= next_id], minlength=batch_size)
            assert int(active.max()) <= config.max_active_flows
            assert int(spawned.max()) <= config.max_spawn_per_step
            created += result.num_spawned
            ended += result.num_died + result.arrivals.batch.numel()
            next_id += result.num_spawned
            arrived_energy += float(result.energy_arrived)
            lost_energy += float(result.energy_dissipated + result.energy_died)
            created_energy += float(result.energy_created)
            in_flight = float(nxt.energy.sum())
            assert injected + created_energy == pytest.approx(in_flight + arrived_energy + lost_energy,
                                                              rel=1e-5, abs=1e-5)
            assert bool(((nxt.energy >= 0) & (nxt.energy <= 1)).all())  # bounded
            state = nxt
        assert state.num_flows == 0 and steps <= config.lattice_depth - 1
        assert created == ended
        y = proc(x)
    assert y.shape == (x.size(0), config.output_dim)
    assert torch.isfinite(y).all()


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
