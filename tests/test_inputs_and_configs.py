"""The seed's usage, every config file, bad input, and the logging levels."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from conftest import build_processor, tiny_config
from efgraph import (EnergyConfig, EnergyLattice, EnergyTrainer, FlowProcessor, SimpleNeuron, create_debug_config,
                     create_experiment_config)
from efgraph.training.run import seed_everything
from efgraph.training.run_logger import RunLogger

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class _Recorder(RunLogger):
    """Keeps every logged row in memory (no run folder, no W&B)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.rows: list[tuple[int, dict]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        super().log(metrics, step)
        self.rows.append((step, dict(metrics)))


def _usage(seed: int) -> tuple[FlowProcessor, list[float], object, dict]:
    """README's "Using it from Python", on the experiment preset shrunk to run in a second:
    config -> lattice, neuron, processor -> a forward and its trace -> EnergyTrainer(...).train."""
    config = create_experiment_config(
        lattice_width=6, lattice_height=5, lattice_depth=6, input_dim=12, output_dim=10,
        initial_flows_per_sample=4, max_active_flows=12, max_spawn_per_step=3, carrier_hidden_dim=16,
        carrier_num_layers=1, child_rank=4, face_channels=8, readout_hidden_dim=16, injection_rank=4,
        batch_size=4, epochs=2, warmup_steps=1, learning_rate=1e-2, log_every=1, seed=seed,
    )
    seed_everything(config.seed)  # what scripts/train.py does with the config's seed
    lattice = EnergyLattice(config)
    neuron = SimpleNeuron(config)
    processor = FlowProcessor(lattice, neuron, config)
    y = processor(torch.randn(8, config.input_dim))
    assert y.shape == (8, config.output_dim) and torch.isfinite(y).all()
    summary = processor.last_trace.summary()

    data = torch.Generator().manual_seed(1234)  # the same pairs for every seed
    inputs, targets = torch.randn(16, 12, generator=data), torch.randn(16, 10, generator=data)
    recorder = _Recorder()
    result = EnergyTrainer(processor, config, run_logger=recorder, progress=False).train(inputs, targets, epochs=2)
    losses = [m["train/loss"] for _, m in recorder.rows if "train/loss" in m]
    return processor, losses, result, summary


def test_seed_usage_works_as_written():
    """The README's usage trains: same seed -> the same losses and parameters, bit for bit;
    another seed -> another model."""
    a, losses_a, result_a, summary = _usage(seed=3)
    b, losses_b, _, _ = _usage(seed=3)
    c, losses_c, _, _ = _usage(seed=4)

    assert summary and all(math.isfinite(v) for v in summary.values())
    assert result_a.steps == 8 and len(losses_a) == 8  # 16 pairs / batch 4 x 2 epochs, a row per step
    assert all(math.isfinite(v) for v in losses_a) and result_a.last_train_loss == losses_a[-1]
    assert losses_a == losses_b
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert losses_a != losses_c
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    # training moved the weights: the same seed's untrained model differs from the trained one
    seed_everything(3)
    untrained = FlowProcessor.from_config(a.config)
    moved = {k for k, v in untrained.state_dict().items() if not torch.equal(v, a.state_dict()[k])}
    assert {"flow_step.carrier.rnn.weight_hh_l0", "output_face.output_gate", "output_face.readout_bias"} <= moved, moved


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads_and_runs_a_forward(path):
    config = EnergyConfig.from_yaml(path)
    # shrink only the carrier and batch: the lattice and flow budgets stay as the file says
    small = config.replace(carrier_hidden_dim=16, carrier_num_layers=1)
    proc = build_processor(small)
    tokens = (small.initial_flows_per_sample,) if small.input_sequence else ()  # a sequence: every token real
    x = torch.randn(2, *tokens, small.input_dim)
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
    variant that bible.yaml runs (chosen on the study's validation: lattice depth, injection,
    readout, where the linear skip starts) differ; every other field, written or defaulted, is the same."""
    import yaml

    from efgraph import EnergyConfig

    main = EnergyConfig.from_yaml(CONFIG_DIR / "bible.yaml").to_dict()
    full = EnergyConfig.from_yaml(CONFIG_DIR / "bible-full.yaml").to_dict()
    differing = {k for k in main if main[k] != full[k]}
    assert {"verses_per_book", "epochs", "eval_every"} <= differing
    assert differing <= {"verses_per_book", "epochs", "eval_every", "lattice_depth", "injection", "readout",
                         "linear_skip_init"}
    assert (full["verses_per_book"], full["epochs"], full["eval_every"]) == (0, 2, 200)
    assert main["lattice_depth"] <= full["lattice_depth"]
    assert yaml.safe_load((CONFIG_DIR / "bible.yaml").read_text())["dataset"] == "bible"


def test_a_lattice_from_another_config_is_refused_naming_the_fields():
    config = tiny_config()
    other = tiny_config(lattice_width=7)
    with pytest.raises(ValueError, match=r"lattice: .*lattice_width \(lattice 7, processor 6\)"):
        FlowProcessor(EnergyLattice(other), SimpleNeuron(config), config)


def test_the_readmes_python_block_runs_as_pasted(tmp_path, monkeypatch):
    """What a newcomer pastes first must run: the README's "Using it from Python" block, as is."""
    import re

    from conftest import ROOT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Using it from Python"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    assert (tmp_path / "my-model" / "model.safetensors").exists()
    assert not namespace["model"].training and namespace["y"].shape == (8, namespace["config"].output_dim)
