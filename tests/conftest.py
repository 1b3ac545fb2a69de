"""Shared fixtures: tiny configs that run in milliseconds on a CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from efgraph import EnergyConfig, EnergyLattice, FlowProcessor, SimpleNeuron, create_debug_config


def tiny_config(**overrides) -> EnergyConfig:
    """A 6x5x6 lattice, small widths, every other field at its default (as users run it: the
    output gate starts open; a test of the residual configs' closed gate says so); override anything."""
    base = dict(
        lattice_width=6, lattice_height=5, lattice_depth=6, input_dim=12, output_dim=10,
        initial_flows_per_sample=4, max_active_flows=12, max_spawn_per_step=3,
        carrier_hidden_dim=16, carrier_num_layers=2, child_rank=4, face_channels=8, readout_hidden_dim=16,
        injection_rank=4, readout_rank=4, batch_size=3,
    )
    base.update(overrides)
    return create_debug_config(**base)


def build_processor(config: EnergyConfig, seed: int = 0) -> FlowProcessor:
    torch.manual_seed(seed)
    return FlowProcessor(EnergyLattice(config), SimpleNeuron(config), config)


def force_spawning(proc: FlowProcessor) -> None:
    """Make every eligible flow want to spawn and keep its energy: budgets then always bind."""
    with torch.no_grad():
        proc.carrier.spawn_head.bias[0] = 10.0
        proc.carrier.energy_head.bias.fill_(6.0)


def spread_next_energies(proc: FlowProcessor, x: torch.Tensor) -> None:
    """Make the carrier's first next energies straddle 0.5 (half the flows above, half below):
    with ``energy_threshold=0.5`` some flows then die and some live, whatever the seed."""
    with torch.no_grad():
        proc.carrier.energy_head.weight.mul_(20.0)
        state = proc.inject(x)
        logits = proc.flow_step.advance(proc.flow_step.cells(state, x.size(0)).transformation, state.h, state.c,
                              state.pos, state.energy)[4].energy_logit
        # the threshold midway between the two middle logits: no flow sits on it, where the
        # batched engine and the per-flow reference could round it to different sides
        middle = logits.sort().values[(logits.numel() - 1) // 2:(logits.numel() + 2) // 2 + 1]
        proc.carrier.energy_head.bias.sub_(middle[:2].mean())


ROOT = Path(__file__).resolve().parents[1]


def train_script_command(run_dir: Path, settings: list[str], *extra: str, launcher: list[str] | None = None) -> list[str]:
    """``scripts/train.py`` on configs/debug.yaml with ``--set`` for each setting, then ``extra``
    (so that a later ``--set`` in ``extra`` wins). ``launcher`` replaces ``python`` (e.g. torchrun)."""
    cmd = [*(launcher or [sys.executable]), str(ROOT / "scripts/train.py"), "--config", str(ROOT / "configs/debug.yaml"),
           "--output-dir", str(run_dir), "--no-progress"]
    for item in settings:
        cmd += ["--set", item]
    return cmd + list(extra)


@pytest.fixture
def tiny() -> EnergyConfig:
    return tiny_config()
