"""`start_cell_noise`: training forwards choose the start cells by a Gumbel top-k of the amplitudes."""

from __future__ import annotations

import pytest
import torch

from conftest import build_processor, tiny_config


def _start_cells(proc, x):
    injected = proc.lattice.place_initial_energy(x)
    return injected.pos[:, 0] + proc.config.lattice_width * injected.pos[:, 1], injected


def test_noise_draws_cells_outside_the_top_k_and_their_amplitudes_get_a_gradient():
    config = tiny_config(lattice_width=6, lattice_height=6, initial_flows_per_sample=3, start_cell_noise=5.0)
    proc = build_processor(config, seed=0)
    x = torch.randn(4, config.input_dim)
    amp = proc.lattice.amplitudes(x)
    top = set(amp[0].topk(3).indices.tolist())
    proc.eval()  # evaluation: the plain top K, noise buffer or not
    proc.lattice.start_noise.fill_(5.0)
    cells, _ = _start_cells(proc, x)
    assert set(cells.view(4, 3)[0].long().tolist()) == top
    proc.train()
    torch.manual_seed(0)
    drawn = set()
    for _ in range(20):
        cells, injected = _start_cells(proc, x)
        drawn |= set(cells.view(4, 3)[0].long().tolist())
        # each flow's energy is its own cell's amplitude, noise-free
        expected = torch.sigmoid(amp.gather(1, cells.view(4, 3).long()).reshape(-1) + proc.lattice.energy_bias)
        torch.testing.assert_close(injected.energy, expected)
    assert drawn - top  # cells outside the top K started flows
    # a drawn cell outside the top K gets a gradient through its flow's energy
    proc.lattice.face_keys.grad = None
    cells, injected = _start_cells(proc, x)
    injected.energy.sum().backward()
    outside = [c for c in cells.view(4, 3)[0].long().tolist() if c not in top]
    grad = proc.lattice.face_keys.grad
    assert grad is not None and all(grad[c].abs().sum() > 0 for c in outside)


def test_zero_noise_is_the_top_k_even_in_training():
    config = tiny_config(lattice_width=6, lattice_height=6, initial_flows_per_sample=3, start_cell_noise=1.0)
    proc = build_processor(config, seed=0)
    x = torch.randn(4, config.input_dim)
    proc.train()  # the buffer starts at 0: the trainer sets it each step
    cells, _ = _start_cells(proc, x)
    assert torch.equal(cells.view(4, 3).long(), proc.lattice.amplitudes(x).topk(3, dim=1).indices)


def test_bad_start_cell_noise_is_refused_by_name():
    with pytest.raises(ValueError, match="start_cell_noise: must be a finite number >= 0"):
        tiny_config(start_cell_noise=-0.5)
    with pytest.raises(ValueError, match="start_cell_noise_fraction: must be in"):
        tiny_config(start_cell_noise=1.0, start_cell_noise_fraction=1.5)


def test_the_trainer_anneals_the_noise_over_the_run():
    from efgraph import EnergyTrainer, FlowProcessor
    from efgraph.data import make_teacher_pairs

    config = tiny_config(input_dim=12, output_dim=12, batch_size=20, warmup_steps=1, eval_every=100, log_every=100,
                         checkpoint_every=100, start_cell_noise=3.0, start_cell_noise_fraction=0.5)
    pairs = make_teacher_pairs(100, 12, 12, seed=0)
    trainer = EnergyTrainer(FlowProcessor.from_config(config), config, progress=False)
    lattice = trainer.processor.lattice
    seen = []
    original = lattice.place_initial_energy
    lattice.place_initial_energy = lambda x: seen.append((lattice.training, float(lattice.start_noise))) or original(x)
    trainer.train(pairs.src, pairs.tgt, epochs=2)  # 10 steps
    noise = [n for training, n in seen if training]
    assert noise[0] == pytest.approx(3.0) and noise[1] == pytest.approx(2.4)  # 3 * (1 - 1 / 5)
    assert noise[-1] == 0.0 and len(noise) == 10
