"""bf16 autocast keeps the invariants and stays close to fp32; CUDA tests run where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from conftest import build_processor, force_spawning, tiny_config
from efgraph import EnergyTrainer, FlowProcessor
from efgraph.data import make_teacher_pairs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("carrier_type", ["gru", "lstm"])
def test_bf16_autocast_matches_fp32_and_keeps_energy_exact_with_the_gate_open(carrier_type):
    # gate open: with the default closed gate the lattice's part of y is 0 and any two runs agree
    config = tiny_config(carrier_type=carrier_type, energy_threshold=0.001, spawn_threshold=0.002, output_gate_init=1.0)
    proc = build_processor(config)
    force_spawning(proc)
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y32 = proc(x)
        fp32_active = proc.last_trace.active
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = proc(x)
            state = proc.inject(x)
            top, h, _ = proc.carrier.step(torch.randn(state.num_flows, proc.carrier.step_input_dim), state.h, state.c)
    trace = proc.last_trace
    assert h.dtype == top.dtype == state.h.dtype == torch.float32  # the recurrent cell stays fp32
    assert trace.active == fp32_active
    # injected + created == in flight + arrived + lost, in fp32 under bf16 autocast too
    books = trace.energy[:, :3].sum(1) - trace.energy[:, 3]
    torch.testing.assert_close(books, trace.energy_injected.expand(trace.num_steps), rtol=1e-5, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(y32, y16.float()).min() > 0.99


def test_bf16_training_step_updates_every_parameter():
    config = tiny_config(precision="bf16", batch_size=8, warmup_steps=1, energy_threshold=0.001, spawn_threshold=0.002)
    proc = build_processor(config)
    force_spawning(proc)
    pairs = make_teacher_pairs(16, config.input_dim, config.output_dim, seed=0)
    before = {k: v.clone() for k, v in proc.state_dict().items()}
    trainer = EnergyTrainer(proc, config, progress=False)
    trainer.train(pairs.src, pairs.tgt, epochs=1)
    unchanged = [k for k, v in proc.state_dict().items() if torch.equal(v, before[k])]
    assert unchanged == []


@needs_cuda
def test_cuda_forward_backward_matches_cpu_with_the_gate_open():
    config = tiny_config(energy_threshold=0.001, spawn_threshold=0.002, output_gate_init=1.0)
    cpu = build_processor(config)
    force_spawning(cpu)
    gpu = FlowProcessor.from_config(config).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(3, config.input_dim)
    y_cpu, y_gpu = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-4, rtol=1e-4)
    assert gpu.last_trace.active == cpu.last_trace.active
    y_gpu.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())


@needs_cuda
def test_cuda_training_reports_cuda_memory_and_runs_bf16():
    config = tiny_config(precision="bf16", batch_size=8, warmup_steps=1)
    pairs = make_teacher_pairs(32, config.input_dim, config.output_dim, seed=0)
    trainer = EnergyTrainer(FlowProcessor.from_config(config), config, device="cuda", progress=False)
    trainer.train(pairs.src, pairs.tgt, epochs=1, max_steps=1)  # builds the schedule
    metrics = trainer.train_step(pairs.src[:8], pairs.tgt[:8])
    assert metrics["memory/cuda_peak_mb"] > 0 and metrics["train/skipped_steps"] == 0
