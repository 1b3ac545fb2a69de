"""scripts/compare_variants.py: variant-vs-variant differences from study folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from efgraph.training.metrics import save_pair_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import compare_variants  # noqa: E402


def _run(study: Path, variant: str, seed: int, val: float, cosine: np.ndarray) -> None:
    run = study / variant / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"validation": {"cosine": val}}))
    save_pair_scores(run / "test_pairs.npz", {"energy-flow": {"cosine": cosine, "hit": cosine > 0.5},
                                              "ridge": {"cosine": cosine * 0, "hit": cosine < 0}})


def test_differences_and_intervals_from_two_studies(tmp_path, capsys):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 200)
    for seed in (0, 1, 2):
        _run(tmp_path / "a", "good", seed, 0.7 + 0.01 * seed, base + 0.1)
        _run(tmp_path / "b", "worse", seed, 0.5, base)
    (tmp_path / "a" / "baselines" / "seed0").mkdir(parents=True)  # a study's baselines are not a variant
    rows = compare_variants.compare(compare_variants.load_variants([tmp_path / "a", tmp_path / "b"]), "good")
    assert [r["variant"] for r in rows] == ["worse"]
    assert rows[0]["test_diff"] == pytest.approx(0.1)
    assert rows[0]["val_diff"] == pytest.approx(0.21)
    assert rows[0]["pairs_ci"][0] == pytest.approx(0.1) and rows[0]["seeds_and_pairs_ci"][1] == pytest.approx(0.1)
    assert compare_variants.main([str(tmp_path / "a"), "--reference", "missing"]) == 2
    assert "no finished runs of 'missing'" in capsys.readouterr().err
