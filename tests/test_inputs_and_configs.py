"""The seed's usage, every config file, bad input, and the logging levels."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import build_processor, tiny_config
from efgraph import EnergyConfig, EnergyLattice, FlowProcessor, SimpleNeuron, create_debug_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def test_seed_usage_works_as_written():
    config = create_debug_config(carrier_hidden_dim=32, carrier_num_layers=1)
    lattice = EnergyLattice(config)
    neuron = SimpleNeuron(config)
    processor = FlowProcessor(lattice, neuron, config)
    x = torch.randn(2, 768)
    y = processor(x)
    assert y.shape == (2, 768) and torch.isfinite(y).all()


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads_and_runs_a_forward(path):
    config = EnergyConfig.from_yaml(path)
    # shrink only the carrier and batch: the lattice and flow budgets stay as the file says
    small = config.replace(carrier_hidden_dim=16, carrier_num_layers=1)
    proc = build_processor(small)
    x = torch.randn(2, small.input_dim)
    with torch.no_grad():
        y = proc(x)
    assert y.shape == (2, small.output_dim) and torch.isfinite(y).all()
    trace = proc.last_trace
    assert trace.num_steps <= small.lattice_depth - 1
    assert trace.initial_flows == 2 * small.initial_flows_per_sample


def test_configs_dir_is_not_empty():
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} >= {"debug", "experiment", "optimized"}


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(3, 11), "width 11"),
        (torch.randn(0, 12), "empty batch"),
        (torch.randn(12), "shape"),
        (torch.tensor([[float("nan")] * 12, [0.0] * 12]), r"non-finite.*\[0\]"),
        (torch.tensor([[0.0] * 12, [float("inf")] * 12]), r"non-finite.*\[1\]"),
        (torch.zeros(2, 12, dtype=torch.long), "floating"),
        (torch.zeros(2, 12, dtype=torch.float64), "dtype torch.float64 does not match"),
        ([[0.0] * 12], "torch.Tensor"),
    ],
)
def test_bad_input_raises_value_error(x, message):
    proc = build_processor(tiny_config())
    with pytest.raises(ValueError, match=message):
        proc(x)


def test_mismatched_neuron_is_rejected():
    config = tiny_config()
    other = tiny_config(message_dim=7)
    with pytest.raises(ValueError, match="neuron"):
        FlowProcessor(EnergyLattice(config), SimpleNeuron(other), config)


def test_debug_levels_log_only_when_enabled(caplog):
    from efgraph.utils.logging import DEBUG_ENERGY, DEBUG_SPAWN

    proc = build_processor(tiny_config())
    x = torch.randn(2, 12)
    with caplog.at_level(logging.INFO, logger="efgraph"):
        proc(x)
    assert not [r for r in caplog.records if r.levelno in (DEBUG_ENERGY, DEBUG_SPAWN)]
    with caplog.at_level(DEBUG_SPAWN, logger="efgraph"):
        proc(x)
    levels = {r.levelname for r in caplog.records}
    assert {"DEBUG_ENERGY", "DEBUG_SPAWN"} <= levels


def test_bible_full_is_bible_on_every_verse_with_a_shorter_schedule():
    """bible-full.yaml must stay the bible.yaml model: only the data size, the schedule and the
    lattice depth differ (bible.yaml runs the one-step variant chosen on the study's validation)."""
    import yaml

    main = yaml.safe_load((CONFIG_DIR / "bible.yaml").read_text())
    full = yaml.safe_load((CONFIG_DIR / "bible-full.yaml").read_text())
    assert set(full) == set(main)
    differing = {k for k in main if main[k] != full[k]}
    assert differing == {"verses_per_book", "epochs", "eval_every", "lattice_depth"}
    assert (full["verses_per_book"], full["epochs"], full["eval_every"]) == (0, 2, 200)
    assert main["lattice_depth"] < full["lattice_depth"]


def test_a_lattice_from_another_config_is_refused_naming_the_fields():
    config = tiny_config()
    other = tiny_config(lattice_width=7)
    with pytest.raises(ValueError, match=r"lattice: .*lattice_width \(7 vs 6\)"):
        FlowProcessor(EnergyLattice(other), SimpleNeuron(config), config)
