"""Gradients reach every parameter; a training step leaves nothing of its graph alive."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.utils._pytree
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import build_processor, force_spawning, spread_next_energies, tiny_config


def _spawning_model(carrier_type: str, **overrides):
    config = tiny_config(carrier_type=carrier_type, energy_threshold=0.001, spawn_threshold=0.002, lattice_depth=5,
                         **overrides)
    proc = build_processor(config)
    force_spawning(proc)
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, config.output_dim, generator=torch.Generator().manual_seed(1))
    return proc, x, target


def _assert_every_gradient_finite_and_nonzero(proc):
    for name, p in proc.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


@pytest.mark.parametrize("carrier_type", ["gru", "lstm"])
@pytest.mark.parametrize("injection,readout", [("face", "face"), ("broadcast", "shared")])
def test_with_the_gate_closed_every_parameter_gets_a_gradient_after_one_optimizer_step(carrier_type, injection,
                                                                                       readout):
    """The gate starts at 0 (the residual configs' setting, bible.yaml): the first backward
    reaches only the gate and the readout bias (the lattice is scaled in from zero); after one
    optimizer step every parameter gets a finite, non-zero gradient."""
    proc, x, target = _spawning_model(carrier_type, injection=injection, readout=readout, output_gate_init=0.0)
    assert float(proc.output_face.output_gate.detach()) == 0.0
    torch.nn.functional.mse_loss(proc(x), target).backward()
    reached = {name for name, p in proc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {"output_face.output_gate", "output_face.readout_bias"}
    torch.optim.AdamW(proc.parameters(), lr=1e-3).step()
    proc.zero_grad()
    torch.nn.functional.mse_loss(proc(x), target).backward()
    assert proc.last_trace.total_spawned > 0
    _assert_every_gradient_finite_and_nonzero(proc)


@pytest.mark.parametrize("carrier_type", ["gru", "lstm"])
def test_at_the_defaults_every_parameter_gets_a_gradient_at_initialisation(carrier_type):
    """The default gate starts open (output_gate_init 1)."""
    proc, x, target = _spawning_model(carrier_type)
    assert float(proc.output_face.output_gate.detach()) == 1.0
    torch.nn.functional.mse_loss(proc(x), target).backward()
    assert proc.last_trace.total_spawned > 0
    _assert_every_gradient_finite_and_nonzero(proc)


@pytest.mark.parametrize("readout", ["face", "shared"])
def test_with_the_gate_open_the_landing_position_gets_the_gradient_of_the_readout(readout):
    """d y / d (landing point) through the bilinear landing weights is the derivative of the
    readout itself: it equals central finite differences (float64, landing points inside cells,
    away from the kinks at whole cell coordinates), and it is not zero."""
    config = tiny_config(output_gate_init=1.0, readout=readout)
    proc = build_processor(config).double()
    g = torch.Generator().manual_seed(0)
    energy = torch.tensor([0.5, 0.9], dtype=torch.float64)
    values = torch.randn(2, config.face_channels, generator=g, dtype=torch.float64)
    xy = torch.tensor([[1.3, 2.6], [3.7, 0.2]], dtype=torch.float64, requires_grad=True)

    def y_of(xy: torch.Tensor) -> torch.Tensor:
        collected = proc.output_face.collect(torch.tensor([0, 1]), xy, energy, values, 2)
        return proc.output_face.read(collected)

    assert torch.autograd.gradcheck(y_of, (xy,), eps=1e-6, atol=1e-8, rtol=1e-6)
    y_of(xy).sum().backward()
    assert (xy.grad.abs() > 1e-6).all()


class _RecordOutputs(TorchDispatchMode):
    """Weak references to every tensor an op creates inside the block (below autograd: the very
    tensors autograd saves, links into the graph, or hands back). A tensor whose last Python
    reference goes while autograd still holds it keeps its Python object, so a weak reference
    dies only when the tensor does."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.refs.append(weakref.ref(t))
        return out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_training_step_leaves_nothing_of_its_graph_alive(checkpointing):
    """After a batch's step (backward, optimizer step, the caller's references dropped), no tensor
    that the batch's forward created and that is part of an autograd graph is alive: not its
    output, not a saved activation, not a step's hidden state. A model that kept a graph across
    batches -- an undetached tensor stashed on a module or in the trace, a recurrent state
    carried into the next batch -- fails here. (The trace's detached bookkeeping may stay.)"""
    config = tiny_config(energy_threshold=0.001, spawn_threshold=0.002, activation_checkpointing=checkpointing)
    proc = build_processor(config)
    force_spawning(proc)
    opt = torch.optim.AdamW(proc.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for batch in range(4):
        x = torch.randn(3, config.input_dim, generator=g)
        with _RecordOutputs() as created:
            y = proc(x)
        # what the graph holds for backward (saved activations, checkpointed states) and the output
        in_graph = [r for r in created.refs if r() is not None and r().requires_grad]
        assert len(in_graph) > 20
        loss = y.pow(2).mean()
        opt.zero_grad()
        loss.backward()  # would raise "backward through the graph a second time" if a graph were chained
        opt.step()
        assert proc.last_trace.total_spawned > 0 and proc.last_trace.num_steps >= 3
        del x, y, loss
        gc.collect()
        kept = [r() for r in in_graph if r() is not None]
        assert not kept, (f"batch {batch}: {len(kept)} tensors of its graph still alive, e.g. "
                          f"{[(tuple(t.shape), t.grad_fn) for t in kept[:5]]}")
    assert not any(t.requires_grad for t in vars(proc.last_trace).values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("replay_fates", [True, False])
def test_the_checkpointed_backward_differentiates_the_flows_the_forward_kept(monkeypatch, replay_fates):
    """With activation checkpointing, each step is run again in backward. A GPU's atomic
    scatter-add can round the rerun differently and put a flow that sits at the threshold on the
    other side; the counts still agree and ``torch.utils.checkpoint`` compares only shapes. The
    test moves ``energy_threshold`` across one flow's energy between forward and backward (the
    rerun then sees that flow die; no value changes): with the saved fates replayed the gradient
    equals the uncheckpointed one; deciding again (only the counts reused) gives another one."""
    from efgraph.core import flow_processor as fp

    config = tiny_config(energy_threshold=0.5)
    proc = build_processor(config)
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(1))
    spread_next_energies(proc, x)
    with torch.no_grad():  # the first step's next energies; put the threshold 1e-6 under one of them
        state = proc.inject(x)
        energy = proc.flow_step.advance(proc.flow_step.cells(state, x.size(0)).transformation, state.h, state.c,
                              state.pos, state.energy)[6]
    lowest_survivor = energy[energy > 0.5].min().item()
    forward_threshold, rerun_threshold = lowest_survivor - 1e-6, lowest_survivor + 1e-6

    def move_threshold(value: float) -> None:
        # the fault injection: the model's one (frozen) config changed in place behind its guard,
        # as a GPU's rounding would move the flow, so the rerun in backward sees the other side
        object.__setattr__(proc.config, "energy_threshold", value)

    def gradients(checkpointing: bool, rerun: float) -> list[torch.Tensor]:
        proc.zero_grad()
        proc.activation_checkpointing = checkpointing
        move_threshold(forward_threshold)
        y = proc(x)
        assert proc.last_trace.died[0] > 0 and proc.last_trace.num_steps >= 2
        move_threshold(rerun)  # read only by the checkpointed rerun in backward
        y.pow(2).sum().backward()
        return [p.grad.clone() for p in proc.parameters() if p.grad is not None]

    if not replay_fates:  # what the engine did before it saved fates: the rerun's own, only the counts reused
        decide, decided = fp.STEP_GRAPHS["decide"], []

        def deciding(*args, **kwargs):
            decided.append(decide(*args, **kwargs))
            return decided[-1]

        class CountsOnly(fp.StepDecisions):
            def masks(self):
                return decided[-1].died, decided[-1].arrived, decided[-1].spawns

        monkeypatch.setitem(fp.STEP_GRAPHS, "decide", deciding)
        monkeypatch.setattr(fp, "StepDecisions", CountsOnly)
    reference = gradients(False, forward_threshold)
    assert all(torch.equal(a, b) for a, b in zip(reference, gradients(True, forward_threshold)))
    perturbed = gradients(True, rerun_threshold)
    worst = max(((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item() for a, b in zip(reference, perturbed))
    print(f"replay_fates {replay_fates}: largest relative gradient change {worst:.2e}")
    if replay_fates:
        assert worst < 1e-4, worst  # the threshold scales the survival surrogate: 2e-6 relative
    else:
        assert worst > 1e-2, worst
