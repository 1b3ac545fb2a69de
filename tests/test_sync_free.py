"""A lattice step costs one host sync and a bounded number of dispatcher ops.

Counted with :class:`efgraph.utils.dispatch_count.count_ops` (a ``TorchDispatchMode``) over a whole
forward + backward, so what a GPU would pay (a sync drains the launch queue) is pinned on CPU.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_processor, spread_next_energies, tiny_config
from efgraph import create_debug_config
from efgraph.core.compaction import read_counts, unique_padded
from efgraph.utils.dispatch_count import count_ops

# measured at debug batch 8 (see README "Syncs and ops per step"); the bound fails on a regression
MAX_OPS_PER_STEP = 800


def _count_training_step(proc, x):
    target = torch.randn(x.size(0), proc.config.output_dim)
    with count_ops() as mode:
        loss = torch.nn.functional.mse_loss(proc(x), target)
        loss.backward()
    return mode.count, proc.last_trace


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("radius", [0, 1])
def test_a_forward_backward_syncs_once_per_lattice_step_while_flows_spawn_die_and_arrive(radius, checkpointing):
    config = tiny_config(interaction_radius=radius, energy_threshold=0.5, spawn_threshold=0.6,
                         activation_checkpointing=checkpointing, batch_size=4)
    proc = build_processor(config)
    x = torch.randn(4, config.input_dim)
    spread_next_energies(proc, x)
    with torch.no_grad():
        proc.carrier.spawn_head.bias[0] = 5.0
    count, trace = _count_training_step(proc, x)
    assert trace.total_spawned > 0 and trace.total_died > 0 and trace.total_arrived > 0
    assert count.syncs <= trace.num_steps, (count.syncs, trace.num_steps, dict(count.sync_names))
    assert set(count.sync_names) == {"aten::_to_copy"}  # the one read of the step's counts


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
