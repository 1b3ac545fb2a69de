"""scripts/composition_seen.py: a composition study's test cosine on seen and on unseen inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from efgraph.config import EnergyConfig
from efgraph.data.composition import seen_in_training
from efgraph.training.metrics import save_pair_scores
from efgraph.training.run import load_pairs, make_run_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import composition_seen  # noqa: E402


def _scores(cosine: np.ndarray) -> dict[str, np.ndarray]:
    return {"cosine": cosine, "hit": cosine > 0.9}


def _study(folder: Path, config: EnergyConfig) -> np.ndarray:
    """A study folder without training: its config, split and per-pair scores written by hand."""
    folder.mkdir()
    config.to_yaml(folder / "study_config.yaml")
    pairs = load_pairs(config, progress=False)
    split = make_run_split(config, pairs)
    split.to_json(folder / "split.json")
    return seen_in_training(pairs.src[split.train], pairs.src[split.test], config.composition_values,
                            config.composition_tables, config.composition_chain, seed=config.data_seed).numpy()


def test_each_model_is_scored_on_seen_and_on_unseen_test_inputs(tmp_path, capsys):
    config = EnergyConfig.from_yaml("configs/composition.yaml").replace(
        synthetic_pairs=3000, composition_chain=3, input_dim=40)
    seen = _study(tmp_path / "s", config)
    assert 0 < seen.mean() < 1  # both kinds are there to score
    (tmp_path / "s" / "baselines" / "seed0").mkdir(parents=True)
    save_pair_scores(tmp_path / "s" / "baselines" / "seed0" / "test_pairs.npz",
                     {"ridge": _scores(np.full(len(seen), 0.25))})
    for seed, unseen in ((0, 0.4), (1, 0.6)):  # a memoriser on the seen inputs, part way on the others
        run = tmp_path / "s" / "deep" / f"seed{seed}"
        run.mkdir(parents=True)
        save_pair_scores(run / "test_pairs.npz", {"energy-flow": _scores(np.where(seen, 1.0, unseen))})
    rows = {r["model"]: r for r in composition_seen.seen_unseen_table(tmp_path / "s")}
    assert rows["ridge"]["seen"]["mean"] == pytest.approx(0.25) and rows["ridge"]["unseen"]["std"] is None
    assert rows["deep"]["seeds"] == [0, 1] and rows["deep"]["seen"]["mean"] == pytest.approx(1.0)
    assert rows["deep"]["unseen"]["mean"] == pytest.approx(0.5)
    assert rows["deep"]["unseen"]["std"] == pytest.approx(np.std([0.4, 0.6], ddof=1))
    assert composition_seen.main([str(tmp_path / "s")]) == 0
    assert "| deep | 0,1 | 1.0000 +- 0.0000 | 0.5000 +- 0.1414 |" in capsys.readouterr().out


def test_a_study_of_other_data_or_other_pairs_is_refused_naming_it(tmp_path, capsys):
    config = EnergyConfig.from_yaml("configs/composition.yaml").replace(synthetic_pairs=3000)
    seen = _study(tmp_path / "s", config)
    run = tmp_path / "s" / "deep" / "seed0"
    run.mkdir(parents=True)
    save_pair_scores(run / "test_pairs.npz", {"energy-flow": _scores(np.ones(len(seen) - 1))})
    assert composition_seen.main([str(tmp_path / "s")]) == 2
    assert "test pairs, the study's split has" in capsys.readouterr().err
    routing = EnergyConfig.from_yaml("configs/routing.yaml").replace(synthetic_pairs=500)
    (tmp_path / "r").mkdir()
    routing.to_yaml(tmp_path / "r" / "study_config.yaml")
    assert composition_seen.main([str(tmp_path / "r")]) == 2
    assert "this split needs dataset: composition" in capsys.readouterr().err
    assert composition_seen.main([str(tmp_path / "nothing")]) == 2
    assert "not a study folder" in capsys.readouterr().err
