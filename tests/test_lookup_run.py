"""``dataset: lookup`` through the run pipeline: sequence input, the data's own split, the test read
at ``test_depth``, answer accuracy per chain length."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import ROOT
from efgraph import EnergyConfig
from efgraph.training.run import load_pairs, model_inputs, run_training


def _config(**overrides) -> EnergyConfig:
    small = dict(carrier_hidden_dim=16, face_channels=8, readout_rank=4, lattice_depth=4, test_depth=6, epochs=1,
                 baseline_models="", eval_every=2, log_every=2, checkpoint_every=100, learning_diagnostics=False)
    return EnergyConfig.from_yaml(ROOT / "configs" / "lookup.yaml").replace(**{**small, **overrides})


def test_a_lookup_run_reads_tokens_keeps_the_datas_split_and_scores_each_test_length(tmp_path):
    config = _config()
    pairs = load_pairs(config, progress=False)
    assert model_inputs(config, pairs).shape[1:] == (11, config.input_dim)
    assert set(pairs.split) == {"train", "validation", "test"}
    outcome = run_training(config, tmp_path / "run", wandb_mode="disabled", progress=False, total_steps=3,
                           pairs=pairs)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    scores = results["test"]["energy-flow"]
    assert [k for k in scores if k.startswith("answer_accuracy_L")] == [f"answer_accuracy_L{n}" for n in range(6, 11)]
    assert all(0.0 <= scores[f"answer_accuracy_L{n}"] <= 1.0 for n in range(6, 11))
    assert results["split"]["test"] == 2560 and results["split"]["validation"] == 512
    assert "ridge" in results["test"] and "answer_accuracy_L10" in results["test"]["ridge"]
    # scripts/lookup_flows.py on the run: what the flows did, per chain length, and the length-8 figure
    sys.path.insert(0, str(ROOT / "scripts"))
    import lookup_flows

    assert lookup_flows.main([str(outcome.run_dir), "--json", str(tmp_path / "flows.json")]) == 0
    rows = json.loads((tmp_path / "flows.json").read_text())[str(outcome.run_dir)]
    assert list(rows) == [f"L{n}" for n in range(2, 11)]
    for stats in rows.values():  # every flow ends, by death or arrival, within the steps taken
        assert stats["died"] + stats["arrived"] == pytest.approx(1.0) and stats["steps_per_flow"] <= stats["steps"]
    assert rows["L10"]["steps"] <= config.test_depth - 1
    assert (outcome.run_dir / "flow_paths_len8.png").exists()


def test_sequence_input_needs_data_with_tokens_and_a_test_depth_below_the_lattice_is_refused():
    with pytest.raises(ValueError, match="input_sequence: the model reads token sequences, but dataset 'routing'"):
        load_pairs(EnergyConfig(dataset="routing", input_sequence=True, input_dim=24, output_dim=8,
                                initial_flows_per_sample=8), progress=False)
    with pytest.raises(ValueError, match=r"test_depth: must be 0 \(the lattice's own depth\) or >= lattice_depth"):
        _config(test_depth=3)
