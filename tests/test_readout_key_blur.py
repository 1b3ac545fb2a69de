"""`readout_key_blur`: global credit for where a flow lands (training forwards read blurred keys)."""

from __future__ import annotations

import pytest
import torch

from conftest import build_processor, tiny_config
from efgraph.core.energy_lattice import blur_face_field
from efgraph.training.schedule import annealed_to_zero

def _landing_gradient(proc, xy):
    """d(sum of y) / d(landing point) of one flow landing at ``xy``."""
    xy = torch.tensor([xy], requires_grad=True)
    value = torch.ones(1, proc.config.face_channels)
    face = proc.lattice.collect_output_energy(torch.zeros(1, dtype=torch.long), xy, torch.ones(1), value, 1)
    proc.lattice.read_out(face).sum().backward()
    return xy.grad[0]


def test_a_blurred_readout_reaches_a_landing_far_from_the_only_informative_cells():
    proc = build_processor(tiny_config(lattice_width=8, lattice_height=8, readout_key_blur=2.0), seed=0)
    with torch.no_grad():  # keys are zero except on the face's last column
        keys = proc.lattice.readout_keys.view(8, 8, -1)
        keys.zero_()
        keys[:, 7] = 1.0
    proc.train()
    proc.lattice.key_blur.fill_(0.0)
    assert torch.equal(_landing_gradient(proc, [2.3, 4.0]), torch.zeros(2))  # a local kernel: no slope there
    proc.lattice.key_blur.fill_(2.0)
    assert _landing_gradient(proc, [2.3, 4.0])[0] != 0  # the blurred keys point toward x = 7
    # evaluation reads the keys themselves, whatever the blur
    proc.eval()
    assert torch.equal(_landing_gradient(proc, [2.3, 4.0]), torch.zeros(2))
    # the schedule: full blur at the start, 0 from fraction * total on
    assert annealed_to_zero(0, 1000, 2.0, 0.5) == 2.0
    assert annealed_to_zero(250, 1000, 2.0, 0.5) == 1.0
    assert annealed_to_zero(500, 1000, 2.0, 0.5) == 0.0 == annealed_to_zero(900, 1000, 2.0, 0.5)


def test_blur_of_zero_width_is_the_field_and_a_wide_blur_keeps_its_mean():
    field = torch.randn(6 * 5, 3)
    assert torch.equal(blur_face_field(field, 6, 5, torch.tensor(0.0)), field)
    wide = blur_face_field(field, 6, 5, torch.tensor(1e4))
    torch.testing.assert_close(wide, field.mean(dim=0, keepdim=True).expand_as(field), atol=1e-4, rtol=1e-4)


def test_readout_key_blur_is_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="readout_key_blur: blurs the readout keys"):
        tiny_config(readout="shared", readout_key_blur=1.0)
    with pytest.raises(ValueError, match="readout_key_blur: must be >= 0"):
        tiny_config(readout_key_blur=-1.0)
    with pytest.raises(ValueError, match="readout_key_blur_fraction: must be in"):
        tiny_config(readout_key_blur=1.0, readout_key_blur_fraction=0.0)


def test_the_trainer_anneals_the_blur_over_the_run():
    from efgraph import EnergyTrainer, FlowProcessor
    from efgraph.data import make_teacher_pairs

    config = tiny_config(input_dim=12, output_dim=12, batch_size=20, warmup_steps=1, eval_every=100, log_every=100,
                         checkpoint_every=100, readout_key_blur=2.0, readout_key_blur_fraction=1.0)
    pairs = make_teacher_pairs(100, 12, 12, seed=0)
    trainer = EnergyTrainer(FlowProcessor.from_config(config), config, progress=False)
    seen = []
    lattice = trainer.processor.lattice
    original = lattice.collect_output_energy
    lattice.collect_output_energy = lambda *a, **k: seen.append(float(lattice.key_blur)) or original(*a, **k)
    trainer.train(pairs.src, pairs.tgt, epochs=2)  # 10 steps
    steps = sorted(set(seen), reverse=True)
    assert steps[0] == pytest.approx(2.0) and steps[-1] == pytest.approx(0.2)  # 2 * (1 - 9 / 10)
    assert len(steps) == 10
