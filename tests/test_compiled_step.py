"""``compile: true``: the whole step as compiled graphs over flows padded to bucket sizes.

What dynamo captures (graphs, static shapes, recompiles, the padding) is checked with the
``aot_eager`` backend, which traces forward and backward like Inductor but skips its C++ codegen
(minutes per graph on this CPU); one test runs Inductor itself on a single bucket."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

import efgraph.core.flow_processor as fp
from conftest import build_processor, force_spawning, spread_next_energies, tiny_config
from efgraph import FlowProcessor
from efgraph.core.compaction import bucket_rows


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(fp, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_buckets_hold_their_flows_with_bounded_padding_and_double_into_buckets():
    sizes = [bucket_rows(n) for n in range(0, 5000)]
    assert all(b >= max(n, 8) for n, b in enumerate(sizes))
    assert all(b <= 1.5 * n for n, b in enumerate(sizes) if n > 8)  # at most a third of the rows pad
    assert sizes == sorted(sizes)
    buckets = sorted(set(sizes))
    assert buckets[:6] == [8, 12, 16, 24, 32, 48] and len(buckets) == 20
    assert all(bucket_rows(2 * b) == 2 * b for b in buckets)  # every flow spawning still fits one bucket
    with pytest.raises(ValueError, match="n: must be >= 0"):
        bucket_rows(-1)


def _pair(config, seed=0, spawning=True):
    eager = build_processor(config, seed)
    if spawning:
        force_spawning(eager)
    compiled = FlowProcessor.from_config(config.replace(compile=True))
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _same_trace(a, b):
    for name in ("active", "occupied", "spawned", "died", "arrived"):
        assert getattr(a, name) == getattr(b, name), name
    torch.testing.assert_close(torch.stack(b.energy_rows), torch.stack(a.energy_rows), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(b.neighbourhood_rows), torch.stack(a.neighbourhood_rows))


@pytest.mark.parametrize("readout,layout", [("face", "chosen"), ("shared", "chosen"), ("face", "grids")])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_step_equals_eager_outputs_gradients_and_traces(aot_eager, readout, layout, checkpointing,
                                                                   monkeypatch):
    """Flows spawn (budgets bind), die and arrive over several steps; the compiled model pads
    them to buckets and must give the eager model's outputs, gradients and trace; also with the
    message passing and the face readout on their grids (the padding rows' own sample included),
    which the shipped configs take and this tiny lattice would not."""
    if layout == "grids":
        from efgraph.core import flow_step, readout as readout_module
        monkeypatch.setattr(flow_step, "grid_is_cheaper", lambda *args: True)
        monkeypatch.setattr(readout_module, "face_grid_is_cheaper", lambda *args: True)
    config = tiny_config(readout=readout, activation_checkpointing=checkpointing, energy_threshold=0.5,
                         max_active_flows=9, lattice_depth=5)
    eager, compiled = _pair(config, spawning=False)
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0))
    spread_next_energies(eager, x)
    with torch.no_grad():  # the survivors spawn: flows spawn, die and arrive in one forward
        eager.carrier.spawn_head.bias[0] = 10.0
    compiled.load_state_dict(eager.state_dict())
    y_eager, y_compiled = eager(x), compiled(x)
    trace = eager.last_trace
    assert trace.total_spawned > 0 and trace.total_died > 0 and sum(trace.arrived) > 0
    assert any(n not in {bucket_rows(n)} for n in trace.active)  # some steps really ran padded
    torch.testing.assert_close(y_compiled, y_eager, atol=1e-5, rtol=1e-5)
    _same_trace(trace, compiled.last_trace)
    y_eager.square().sum().backward()
    y_compiled.square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_residual_steps_equal_eager_under_checkpointing(aot_eager):
    """``residual_steps`` with half-open gates: the gated update, the first step's ban on spawning
    and the gated children go through the compiled graphs and the recompute like the eager step."""
    config = tiny_config(residual_steps=True, activation_checkpointing=True, max_active_flows=9, lattice_depth=5)
    eager, compiled = _pair(config, spawning=True)
    with torch.no_grad():
        eager.flow_step.gates.copy_(torch.tensor([0.4, 0.7, 1.0]))
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(1))
    y_eager, y_compiled = eager(x), compiled(x)
    assert eager.last_trace.total_spawned > 0 and eager.last_trace.spawned[0] == 0
    torch.testing.assert_close(y_compiled, y_eager, atol=1e-5, rtol=1e-5)
    _same_trace(eager.last_trace, compiled.last_trace)
    y_eager.square().sum().backward()
    y_compiled.square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    ran = len(eager.last_trace.active)  # the gates of the steps that ran get a gradient
    assert ran > 2 and eager.flow_step.gates.grad[: ran - 1].abs().min() > 0


@pytest.mark.parametrize("carrier_type", ["gru", "lstm"])
def test_padding_rows_are_canonical_after_a_compiled_step_that_compacts(aot_eager, carrier_type):
    """A compiled step in which flows die and spawn (the compaction runs): every padding row of the
    next state is canonical (see FlowState): sample B, zero energy, zero h and c, pos (0, 0, 0),
    flow id -1, and ``valid`` marks exactly the flows the step's counts say."""
    config = tiny_config(carrier_type=carrier_type, energy_threshold=0.5, spawn_threshold=0.55, max_active_flows=9,
                         compile=True)
    proc = build_processor(config)
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0))
    spread_next_energies(proc, x)
    with torch.no_grad():
        proc.carrier.spawn_head.bias[0] = 10.0
    injected = proc.inject(x)
    state = injected.padded(bucket_rows(injected.num_flows) + 8, 3)  # padding rows from the start too
    result = proc.step(state, 3, injected.num_flows)
    nxt = result.next_state
    assert result.num_died > 0 and result.num_spawned > 0
    pad = ~nxt.valid
    assert int(pad.sum()) == nxt.num_flows - nxt.num_active > 0
    assert nxt.num_active == state.num_active - result.num_died - result.num_arrived + result.num_spawned
    assert bool((nxt.batch[pad] == 3).all()) and bool((nxt.flow_id[pad] == -1).all())
    assert bool((nxt.energy[pad] == 0).all()) and bool((nxt.pos[pad] == 0).all())
    assert bool((nxt.h[:, pad] == 0).all()) and (nxt.c is None) == (carrier_type == "gru")
    if nxt.c is not None:
        assert bool((nxt.c[:, pad] == 0).all())
    # and the real rows are flows: of the batch, with their ids, energies and positions
    assert bool((nxt.batch[~pad] < 3).all()) and bool((nxt.flow_id[~pad] >= 0).all())
    assert bool((nxt.energy[~pad] > 0).all()) and bool((nxt.pos[~pad, 2] > 0).all())


@pytest.mark.parametrize("carrier_type", ["gru", "lstm"])
def test_padding_rows_stay_canonical_after_a_compiled_step_in_which_every_flow_continues(aot_eager,
                                                                                        carrier_type):
    """A compiled step in which no flow dies, arrives or spawns hands on its dense update without
    compacting (the fast path): its padding rows are canonical all the same (the carrier's update
    of a zero row is not), and the real rows are the eager step's."""
    config = tiny_config(carrier_type=carrier_type, energy_threshold=0.01, max_spawn_per_step=0, lattice_depth=20,
                         compile=True)
    proc = build_processor(config)
    eager = build_processor(replace(config, compile=False))
    eager.load_state_dict(proc.state_dict())
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        proc.carrier.energy_head.bias.fill_(8.0)  # every next energy near 1: no flow dies
        proc.carrier.displacement_head.bias[2] = -8.0  # the smallest move ahead: no flow arrives
        eager.load_state_dict(proc.state_dict())
    injected = proc.inject(x)
    state = injected.padded(bucket_rows(injected.num_flows) + 8, 3)
    result = proc.step(state, 3, injected.num_flows)
    nxt = result.next_state
    assert result.num_died == result.num_arrived == result.num_spawned == 0
    assert nxt.num_flows == state.num_flows and nxt.num_active == injected.num_flows  # not compacted
    pad = ~nxt.valid
    assert bool((nxt.batch[pad] == 3).all()) and bool((nxt.flow_id[pad] == -1).all())
    assert bool((nxt.energy[pad] == 0).all()) and bool((nxt.pos[pad] == 0).all())
    assert bool((nxt.h[:, pad] == 0).all())
    if nxt.c is not None:
        assert bool((nxt.c[:, pad] == 0).all())
    reference = eager.step(eager.inject(x), 3, injected.num_flows).next_state
    torch.testing.assert_close(nxt.h[:, ~pad], reference.h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt.pos[~pad], reference.pos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt.energy[~pad], reference.energy, atol=1e-5, rtol=1e-5)


def test_recompiles_over_a_training_run_are_bounded_by_the_buckets(aot_eager):
    """Twenty training steps whose flow counts wander (spawning, budgets, deaths): the graphs
    compiled are at most 3 parts (decide, compact, deposit x2 kinds) per bucket seen, none is
    compiled twice, and a second pass over the same batches compiles nothing."""
    config = tiny_config(energy_threshold=0.2, spawn_threshold=0.3, max_active_flows=20)
    _, compiled = _pair(config)
    opt = torch.optim.AdamW(compiled.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, config.input_dim, generator=g) for _ in range(10)]
    seen: set[int] = set()
    for epoch in range(2):
        if epoch == 1:
            before = counters["stats"]["unique_graphs"]
        for x in batches:
            y = compiled(x)
            seen.update(bucket_rows(n) for n in compiled.last_trace.active)
            opt.zero_grad()
            y.square().mean().backward()
            opt.step()
    graphs = counters["stats"]["unique_graphs"]
    assert len(seen) >= 2
    assert graphs <= 4 * len(seen), (graphs, sorted(seen))
    assert counters["stats"]["unique_graphs"] == before  # nothing new in the second pass
    assert not counters["graph_break"]


def test_the_budget_is_data_to_the_compiled_step(aot_eager):
    """Changing ``active_flow_budget`` between forwards changes what spawns but compiles nothing."""
    config = tiny_config(max_active_flows=12)
    _, compiled = _pair(config)
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0))
    compiled(x)
    graphs = counters["stats"]["unique_graphs"]
    per_sample = []
    for budget in (11, 10, 9):
        compiled.active_flow_budget = budget
        compiled(x)
        per_sample.append(max(compiled.last_trace.active) / 3)
    assert per_sample == sorted(per_sample, reverse=True) and per_sample[-1] <= 9
    # the counts shrink, so new buckets may appear, but no graph is compiled for a budget value
    assert counters["stats"]["unique_graphs"] - graphs <= 4


def test_a_deep_copy_of_a_compiled_model_runs_its_own_weights(aot_eager):
    config = tiny_config(compile=True)
    original = FlowProcessor.from_config(config)
    clone = copy.deepcopy(original)
    with torch.no_grad():
        clone.carrier.displacement_head.bias.add_(0.5)
        clone.carrier.energy_head.bias.sub_(1.0)
    eager = FlowProcessor.from_config(config.replace(compile=False))
    eager.load_state_dict(clone.state_dict())
    x = torch.randn(2, config.input_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(clone(x), eager(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(original(x), clone(x))


def test_inductor_compiles_the_step_and_equals_eager():
    """The real backend, on one bucket: every flow continues to the output face in one step."""
    torch._dynamo.reset()
    config = tiny_config(lattice_depth=2, initial_flows_per_sample=4, batch_size=2, carrier_num_layers=1)
    eager, compiled = _pair(config, spawning=False)
    x = torch.randn(2, config.input_dim, generator=torch.Generator().manual_seed(0))
    y_eager, y_compiled = eager(x), compiled(x)
    torch.testing.assert_close(y_compiled, y_eager, atol=1e-5, rtol=1e-5)
    y_eager.sum().backward()
    y_compiled.sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    torch._dynamo.reset()
