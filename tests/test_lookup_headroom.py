"""scripts/lookup_headroom.py runs end to end on a tiny setting and writes sane JSON."""

from __future__ import annotations

import importlib.util
import json

from conftest import ROOT


def _load():
    spec = importlib.util.spec_from_file_location("lookup_headroom", ROOT / "scripts/lookup_headroom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lookup_headroom_runs_tiny_and_writes_json(tmp_path, capsys):
    out = tmp_path / "lookup.json"
    script = _load()
    script.main(["--params", "3000", "--steps", "3", "--seeds", "0", "1", "--max-train-length", "3",
                 "--test-chains", "2", "--eval-every", "2", "--heads", "2", "--layers", "1", "--json", str(out),
                 "--models", "ridge", "mlp", "gru", "transformer-none-causal-last", "transformer-rotary-first-looped"])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["data"] == {"train": 720, "validation": 256, "test": 80}
    assert list(res["runs"]) == ["ceiling (oracle)", "ridge", "mlp", "gru", "transformer-none-causal-last",
                                 "transformer-rotary-first-looped"]
    assert all(v == 1.0 for k, v in res["runs"]["ceiling (oracle)"][0].items() if "accuracy" in k)
    for name, rows in res["runs"].items():
        if name.startswith("ceiling"):
            continue
        assert [r["seed"] for r in rows] == [0, 1]
        for row in rows:
            assert {f"test_accuracy_L{n}" for n in range(6, 11)} <= set(row)
            assert 0 <= row["test_accuracy_6-8"] <= 1 and row["train_seconds"] >= 0
    assert "| model | params | seeds | val acc | L6 | L7 | L8 | L9 | L10 | 6-8 | 9-10 | test cos | train s |" in printed
