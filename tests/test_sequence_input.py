"""Sequence input (each token its own flow) and test-time depth (``FlowProcessor.at_depth``)."""

from __future__ import annotations

import math

import pytest
import torch

import efgraph.core.flow_processor as fp
from conftest import build_processor, force_spawning, tiny_config
from efgraph import load_model
from efgraph.core.input_face import token_mask
from efgraph.model_io import export_model


def _seq_config(**overrides):
    """A 7x2 face (one row of token cells plus one), tokens of width 12, up to 7 tokens."""
    base = dict(input_sequence=True, lattice_width=7, lattice_height=2, initial_flows_per_sample=7,
                max_active_flows=14, lattice_depth=6)
    base.update(overrides)
    return tiny_config(**base)


def _tokens(batch=3, tokens=5, seed=0, width=12):
    """Zero-padded token sequences: sample b has ``tokens - b`` real tokens (at least 1)."""
    x = torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(tokens).unsqueeze(0) < (tokens - torch.arange(batch)).clamp(min=1).unsqueeze(1)
    return x * mask.unsqueeze(2), mask


def _books_balance(trace):
    """``injected + created == in flight + arrived + lost`` after every step."""
    for in_flight, arrived, lost, created in trace.energy.tolist():
        assert float(trace.energy_injected) + created == pytest.approx(in_flight + arrived + lost, abs=1e-4)


def test_each_real_token_starts_one_flow_on_its_own_cell_whatever_the_length():
    config = _seq_config()
    proc = build_processor(config)
    x, mask = _tokens(tokens=5)
    state = proc.inject(x, mask)
    assert state.num_flows == int(mask.sum())  # padding tokens start no flow
    for b in range(3):
        cells = state.pos[state.batch == b]
        n = int(mask[b].sum())
        assert cells[:, 0].tolist() == list(range(n)) and bool((cells[:, 1:] == 0).all())  # token t on cell t
    longer = torch.cat([x, torch.randn(3, 2, 12)], dim=1)  # the same first tokens, then two more
    state_long = proc.inject(longer, torch.cat([mask, torch.ones(3, 2, dtype=torch.bool)], dim=1))
    first = state_long.pos[:, 0] < 5
    kept = torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], dim=1).reshape(-1)[
        torch.cat([mask, torch.ones(3, 2, dtype=torch.bool)], dim=1).reshape(-1)]
    torch.testing.assert_close(state_long.h[:, kept], state.h)  # a token's flow does not depend on T
    torch.testing.assert_close(state_long.energy[kept], state.energy)
    assert first.sum() == state.num_flows


def test_a_padding_tokens_content_changes_nothing_and_the_zero_padding_is_the_mask():
    config = _seq_config()
    proc = build_processor(config)
    x, mask = _tokens()
    noisy = x + 5.0 * torch.randn_like(x) * ~mask.unsqueeze(2)  # garbage where the mask says padding
    with torch.no_grad():
        torch.testing.assert_close(proc(noisy, mask), proc(x, mask))
    assert torch.equal(token_mask(x), mask)


def test_sequence_forward_is_forward_only_keeps_its_books_and_reaches_every_parameter():
    config = _seq_config(lattice_depth=8, energy_threshold=0.001, spawn_threshold=0.002)
    proc = build_processor(config)
    force_spawning(proc)
    with torch.no_grad():
        proc.carrier.displacement_head.bias[2] = -4.0  # short jumps: several steps
    x, mask = _tokens()
    y = proc(x, mask)
    trace = proc.last_trace
    assert y.shape == (3, config.output_dim) and trace.num_steps >= 3 and trace.total_spawned > 0
    assert all(n <= config.max_active_flows * 3 for n in trace.active)
    _books_balance(trace)
    y.square().sum().backward()
    missing = [n for n, p in proc.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_sequence_flows_move_forward_every_step():
    config = _seq_config(lattice_depth=8)
    proc = build_processor(config)
    with torch.no_grad():
        proc.carrier.displacement_head.bias[2] = -4.0
    x, mask = _tokens()
    with torch.no_grad():
        state = proc.inject(x, mask)
        for _ in range(config.lattice_depth - 1):
            if not state.num_flows:
                break
            result = proc.step(state, 3, state.num_flows)
            before = dict(zip(state.flow_id.tolist(), state.pos[:, 2].tolist()))
            for f, z in zip(result.next_state.flow_id.tolist(), result.next_state.pos[:, 2].tolist()):
                if f in before:
                    assert math.floor(z) >= math.floor(before[f]) + 1
            state = result.next_state
    assert state.num_flows == 0


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(fp, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_and_checkpointed_sequence_forwards_equal_the_plain_one(aot_eager):
    config = _seq_config()
    x, mask = _tokens()
    plain = build_processor(config)
    outputs = {}
    for name, overrides in (("plain", {}), ("compiled", {"compile": True}),
                            ("checkpointed", {"activation_checkpointing": True})):
        proc = build_processor(config.replace(**overrides))
        proc.load_state_dict(plain.state_dict())
        y = proc(x, mask)
        y.square().sum().backward()
        outputs[name] = (y.detach(), [p.grad.clone() for p in proc.parameters()])
    for name in ("compiled", "checkpointed"):
        torch.testing.assert_close(outputs[name][0], outputs["plain"][0], atol=1e-5, rtol=1e-5)
        for a, b in zip(outputs[name][1], outputs["plain"][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("residual_steps", [False, True])
def test_a_model_trained_at_one_depth_runs_deeper_with_its_parameters_and_exports(tmp_path, residual_steps):
    config = _seq_config(lattice_depth=5, residual_steps=residual_steps)
    proc = build_processor(config)
    if residual_steps:
        with torch.no_grad():
            proc.flow_step.gates.copy_(torch.tensor([0.3, 0.6, 0.9]))
    deeper = proc.at_depth(9)
    assert deeper.config.lattice_depth == 9 and deeper.config.position_z_extent == 4
    shared = {n: p for n, p in proc.named_parameters() if n != "flow_step.gates"}
    for name, param in deeper.named_parameters():
        if name in shared:
            assert torch.equal(param, shared[name]), name
    if residual_steps:  # the steps past the trained ones take the last trained gate
        assert deeper.flow_step.gates.tolist() == pytest.approx([0.3, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9])
    # the z code of a z the model saw is the code it was trained on
    z = torch.tensor([[0.0, 0.0, 3.0]])
    torch.testing.assert_close(deeper.lattice.position_encoding(z), proc.lattice.position_encoding(z))
    with torch.no_grad():
        deeper.carrier.displacement_head.bias[2] = -6.0  # short jumps: more steps than the trained depth has
    x, mask = _tokens(tokens=7)  # and a longer sequence than _tokens' default
    with torch.no_grad():
        y = deeper(x, mask)
    trace = deeper.last_trace
    assert trace.num_steps > config.lattice_depth - 1 and trace.total_arrived + trace.total_died > 0
    _books_balance(trace)
    loaded = load_model(export_model(deeper, tmp_path / "deep") / "model.safetensors")
    assert loaded.config.lattice_depth == 9
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, mask), y)


def test_at_depth_refuses_a_shallower_depth():
    proc = build_processor(_seq_config(lattice_depth=5))
    with pytest.raises(ValueError, match=r"depth: must be >= the model's lattice_depth \(5\), got 4"):
        proc.at_depth(4)


@pytest.mark.parametrize("make, message", [
    (lambda x, m: (x[:, 0], m), r"x: expected shape \[batch, tokens <= 7, 12\]"),
    (lambda x, m: (x[..., :5], m), r"x: embedding width 5 does not match config.input_dim 12"),
    (lambda x, m: (torch.cat([x, x], dim=1), torch.cat([m, m], dim=1)), r"x: 10 tokens; input_sequence takes 1 to"),
    (lambda x, m: (x, m[:, :3]), r"mask: expected a bool tensor of shape \(3, 5\)"),
    (lambda x, m: (x, m.float()), r"mask: expected a bool tensor"),
    (lambda x, m: (x, m & (torch.arange(3) != 1).unsqueeze(1)), r"mask: rows \[1\] hold no token"),
])
def test_bad_sequences_and_masks_are_one_clear_error(make, message):
    proc = build_processor(_seq_config())
    x, mask = _tokens()
    with pytest.raises(ValueError, match=message):
        proc(*make(x, mask))


def test_a_mask_with_vector_input_and_sequence_only_conflicts_are_refused():
    proc = build_processor(tiny_config())
    with pytest.raises(ValueError, match="mask: only read with input_sequence: true"):
        proc(torch.randn(2, 12), torch.ones(2, 1, dtype=torch.bool))
    for field in ("linear_skip", "residual"):
        with pytest.raises(ValueError, match=rf"{field}: reads x as one vector"):
            _seq_config(**{field: True}, output_dim=12)
    with pytest.raises(ValueError, match="injection: 'broadcast' lays one vector across the face"):
        _seq_config(injection="broadcast")
    with pytest.raises(ValueError, match="position_z_extent: must be >= 0"):
        tiny_config(position_z_extent=-1)


def test_jump_init_sets_how_far_an_untrained_flow_jumps():
    """Near 0 an untrained flow takes every step one cell at a time (D-1 steps); 0.5, the default,
    reproduces the jump head's old start (bias 0) and reaches the output face in fewer steps."""
    x, mask = _tokens()
    steps = {}
    for jump in (0.001, 0.5):
        proc = build_processor(_seq_config(lattice_depth=8, jump_init=jump, energy_threshold=0.001,
                                           max_spawn_per_step=0))
        with torch.no_grad():
            proc(x, mask)
        steps[jump] = proc.last_trace.num_steps
        assert float(proc.carrier.displacement_head.bias[2]) == pytest.approx(math.log(jump / (1 - jump)), abs=1e-6)
    assert steps[0.001] == 7 and steps[0.5] < 7
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"jump_init: must be in \(0, 1\)"):
            tiny_config(jump_init=bad)
