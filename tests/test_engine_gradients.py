"""Gradients reach every parameter; repeated forward/backward keeps no graph and no memory."""

from __future__ import annotations

import gc

import pytest
import torch

from conftest import build_processor, force_spawning, tiny_config
from efgraph.utils.device import process_rss_mb


@pytest.mark.parametrize("carrier_type", ["gru", "lstm"])
def test_every_parameter_gets_a_finite_nonzero_gradient(carrier_type):
    config = tiny_config(carrier_type=carrier_type, energy_threshold=0.001, spawn_threshold=0.002, lattice_depth=5)
    proc = build_processor(config)
    force_spawning(proc)
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, config.output_dim, generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.mse_loss(proc(x), target)
    loss.backward()
    assert proc.last_trace.total_spawned > 0
    for name, p in proc.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


def test_landing_position_receives_gradient():
    config = tiny_config()
    proc = build_processor(config)
    xy = torch.tensor([[1.3, 2.6], [4.0, 0.2]], requires_grad=True)
    dep = proc.lattice.collect_output_energy(torch.tensor([0, 1]), xy, torch.tensor([0.5, 0.9]),
                                             torch.randn(2, config.face_channels), 2)
    proc.lattice.read_out(dep, 2).sum().backward()
    assert (xy.grad.abs() > 0).all()


def test_consecutive_training_steps_keep_no_graph_and_no_memory():
    config = tiny_config(energy_threshold=0.001, spawn_threshold=0.002)
    proc = build_processor(config)
    force_spawning(proc)
    opt = torch.optim.AdamW(proc.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    rss = []
    for i in range(25):
        x = torch.randn(3, config.input_dim, generator=g)
        loss = proc(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()  # would raise "backward through the graph a second time" if a graph were chained
        opt.step()
        del loss
        gc.collect()
        rss.append(process_rss_mb())
    # after warm-up, 20 more batches must not grow the process (a chained graph grows every batch)
    assert rss[-1] - rss[4] < 20.0, f"RSS grew from {rss[4]:.1f} to {rss[-1]:.1f} MiB"
    assert not any(t.requires_grad for t in vars(proc.last_trace).values() if isinstance(t, torch.Tensor))
