"""A lattice step costs one host sync and a bounded number of dispatcher ops.

Counted with :class:`efgraph.utils.dispatch_count.count_ops` (a ``TorchDispatchMode``) over a whole
forward + backward, so what a GPU would pay (a sync drains the launch queue) is pinned on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_processor, spread_next_energies, tiny_config
from efgraph import create_debug_config
from efgraph.core import flow_processor
from efgraph.core.compaction import read_counts, unique_padded
from efgraph.utils.dispatch_count import count_ops

# measured at debug batch 8 (see README "Syncs and ops per step"); the bound fails on a regression
MAX_OPS_PER_STEP = 800


def _count_training_step(proc, x, **counter):
    target = torch.randn(x.size(0), proc.config.output_dim, device=x.device)
    with count_ops(**counter) as mode:
        loss = torch.nn.functional.mse_loss(proc(x), target)
        loss.backward()
    return mode.count, proc.last_trace


def _lively_processor(radius=1, checkpointing=False, device="cpu"):
    """Flows spawn, die and arrive in the forward of the returned ``x``."""
    config = tiny_config(interaction_radius=radius, energy_threshold=0.5, spawn_threshold=0.6,
                         activation_checkpointing=checkpointing, batch_size=4)
    proc = build_processor(config).to(device)
    x = torch.randn(4, config.input_dim).to(device)  # drawn after build_processor seeded the generator
    spread_next_energies(proc, x)
    with torch.no_grad():
        proc.carrier.spawn_head.bias[0] = 5.0
    return proc, x


def _assert_one_sync_per_step(count, trace):
    assert trace.total_spawned > 0 and trace.total_died > 0 and trace.total_arrived > 0
    assert count.syncs <= trace.num_steps, (count.syncs, trace.num_steps, dict(count.sync_names))
    assert set(count.sync_names) == {"aten::_to_copy"}  # the one read of the step's counts


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("radius", [0, 1])
def test_a_forward_backward_syncs_once_per_lattice_step_while_flows_spawn_die_and_arrive(radius, checkpointing):
    proc, x = _lively_processor(radius, checkpointing)
    _assert_one_sync_per_step(*_count_training_step(proc, x))


# one host read of each kind: what the counter names it on a CPU run. On CUDA each is a
# device -> host round-trip; on a CPU run tolist, numpy, cpu and to("cpu") dispatch no op at all
HOST_READS = {
    "tolist": (lambda t: t.tolist(), "Tensor.tolist"),
    "numpy": (lambda t: t.detach().numpy(), "Tensor.numpy"),
    "np.asarray": (lambda t: np.asarray(t.detach()), "Tensor.__array__"),
    "cpu": (lambda t: t.cpu(), "Tensor.cpu"),
    "to_cpu": (lambda t: t.to("cpu"), "Tensor.to(cpu)"),
    "item": (lambda t: t.sum().item(), "aten::_local_scalar_dense"),
    "bool": (lambda t: bool(t.sum() > 0), "aten::_local_scalar_dense"),
    "int": (lambda t: int(t.detach().sum()), "aten::_local_scalar_dense"),
    "float": (lambda t: float(t.detach().sum()), "aten::_local_scalar_dense"),
}


@pytest.mark.parametrize("kind", sorted(HOST_READS))
def test_a_host_read_inside_the_step_fails_the_one_sync_test(monkeypatch, kind):
    """The step's neuron, patched to also read its output on the host once per call (once per
    step): the counter sees each such read, and the one-sync check above fails."""
    read, name = HOST_READS[kind]
    proc, x = _lively_processor()
    neuron = proc.neuron.forward

    def reading_neuron(cell_input):
        out = neuron(cell_input)
        read(out)
        return out

    monkeypatch.setattr(proc.neuron, "forward", reading_neuron)
    count, trace = _count_training_step(proc, x)
    assert count.sync_names[name] == trace.num_steps, dict(count.sync_names)
    assert count.syncs == 2 * trace.num_steps  # the step's own read, and this one
    with pytest.raises(AssertionError):
        _assert_one_sync_per_step(count, trace)


def test_debug_preset_batch_8_syncs_and_ops_per_step():
    config = create_debug_config(carrier_hidden_dim=32)  # op counts do not depend on widths
    proc = build_processor(config)
    x = torch.randn(8, config.input_dim)
    count, trace = _count_training_step(proc, x)
    assert trace.total_spawned > 0
    assert count.syncs / trace.num_steps <= 1.0
    assert count.ops / trace.num_steps <= MAX_OPS_PER_STEP, count.by_name.most_common(10)


def test_the_counter_sees_the_syncs_it_claims_to_count():
    t = torch.tensor([3, 1, 3, 0])
    with count_ops() as mode:
        t.nonzero()
        t[t > 0]  # boolean-mask indexing: a nonzero inside
        torch.unique(t)
        t.sum().item()
        t.to("cpu", copy=True)
        t + 1
    assert mode.count.syncs == 5 and mode.count.ops >= 6


@pytest.mark.parametrize("kind", sorted(HOST_READS))
def test_the_counter_counts_each_host_read_once(kind):
    read, name = HOST_READS[kind]
    with count_ops() as mode:
        read(torch.tensor([0.5, 1.5]))
    assert mode.count.syncs == 1 and dict(mode.count.sync_names) == {name: 1}


def test_a_host_copy_is_read_for_free_but_the_device_tensor_is_not():
    t = torch.tensor([3.0, 1.0])
    with count_ops() as mode:
        host = t.to("cpu", copy=True)  # the step's read: one sync
        host.tolist(), host[1:].numpy(), float(host.sum()), host.cpu().tolist()  # on the host already: free
        t.cpu().tolist()  # another copy of the device tensor: one more
        t.tolist()  # the device tensor itself, although .cpu() on a CPU run returned it: one more
    assert mode.count.syncs == 3, dict(mode.count.sync_names)
    assert dict(mode.count.sync_names) == {"aten::_to_copy": 1, "Tensor.cpu": 1, "Tensor.tolist": 1}


@pytest.mark.parametrize("n", [0, 1, 7, 64])
def test_unique_padded_equals_torch_unique(n):
    ids = torch.randint(0, 10, (n,))
    unique, inverse, count = unique_padded(ids, fill=99)
    expected, expected_inverse = torch.unique(ids, sorted=True, return_inverse=True)
    k = int(count)
    assert k == expected.numel() and unique.shape == ids.shape
    assert torch.equal(unique[:k], expected) and (unique[k:] == 99).all()
    assert torch.equal(inverse, expected_inverse)


def test_read_counts_reads_scalars_in_one_copy():
    with count_ops() as mode:
        values = read_counts([torch.tensor(3), torch.tensor(0), torch.tensor(12)])
    assert values == [3, 0, 12] and mode.count.syncs == 1


# ---- CUDA: the real syncs (skipped without a GPU) ---------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("kind", sorted(set(HOST_READS) - {"numpy", "np.asarray"}))  # numpy() of a CUDA tensor raises
def test_on_cuda_each_host_read_is_a_sync_and_is_counted(kind):
    read, _ = HOST_READS[kind]
    t = torch.tensor([0.5, 1.5], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with count_ops(cpu_is_device=False) as mode, pytest.warns(UserWarning, match="synchroniz"):
            read(t)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert mode.count.syncs == 1, dict(mode.count.sync_names)


@cuda
@pytest.mark.parametrize("checkpointing", [False, True])
def test_on_cuda_a_forward_backward_syncs_only_in_its_one_read_per_step(monkeypatch, checkpointing):
    """The whole forward + backward under ``set_sync_debug_mode("error")``, but for the step's
    read of its counts (``read_counts``), which is let through and counted."""
    proc, x = _lively_processor(checkpointing=checkpointing, device="cuda")
    real_read, reads = flow_processor.read_counts, []

    def the_one_read(counts):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real_read(counts)
        finally:
            reads.append(len(counts))
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(flow_processor, "read_counts", the_one_read)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        count, trace = _count_training_step(proc, x, cpu_is_device=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert trace.total_spawned > 0 and trace.total_died > 0 and trace.total_arrived > 0
    assert len(reads) == trace.num_steps  # one read per step (a recompute reuses the forward's)
    assert count.syncs == trace.num_steps, dict(count.sync_names)
