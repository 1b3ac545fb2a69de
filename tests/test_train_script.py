"""scripts/train.py end to end on the synthetic teacher, with W&B offline, read back from its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, train_script_command
from efgraph.training.metrics import load_pair_scores
from efgraph.training.run_logger import resolve_wandb_mode
from efgraph.utils.wandb_files import find_run_file, logged_history, logged_keys

TINY = [
    "dataset=synthetic", "synthetic_pairs=120", "input_dim=12", "output_dim=12", "lattice_width=5",
    "lattice_height=5", "lattice_depth=5", "initial_flows_per_sample=3", "max_active_flows=8",
    "carrier_hidden_dim=16", "carrier_num_layers=1", "face_channels=8", "readout_hidden_dim=16",
    "batch_size=16", "epochs=2", "eval_every=4", "log_every=2", "checkpoint_every=4", "warmup_steps=2",
]


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc either
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))


def test_wandb_mode_is_decided_by_the_api_key(no_wandb_key, monkeypatch):
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("online") == "offline"
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    with pytest.raises(ValueError, match="wandb mode"):
        resolve_wandb_mode("sometimes")


def _train(run_dir: Path, *extra: str, env_key: str | None = None) -> subprocess.CompletedProcess:
    cmd = train_script_command(run_dir, TINY, *extra)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env["HOME"] = str(run_dir.parent / "home")
    if env_key:
        env["WANDB_API_KEY"] = env_key
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=run_dir.parent)


def test_train_script_writes_the_run_folder_and_offline_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    secret = "efgraphtestkey" + "0" * 26
    proc = _train(run_dir, "--wandb-mode", "offline", env_key=secret)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the table is printed and written
    for name in ["energy-flow", "identity", "ridge", "mlp"]:
        assert f"| {name} |" in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["test"]) == {"energy-flow", "identity", "ridge", "mlp"}
    for metrics in results["test"].values():
        assert set(metrics) == {"cosine", "mse", "r_at_1"}
    # the selected state's validation metrics, the last evaluation (96 pairs / 16 x 2 epochs), the test dynamics
    assert results["validation"]["step"] == results["best_step"]
    assert results["final_validation"]["step"] == 12
    assert results["test_dynamics"]["flows_arrived_per_sample"] >= 0
    assert set(results["test_dynamics"]) >= {"flows_energy_arrived_fraction", "flows_spawned_per_sample", "flows_steps"}
    per_pair = load_pair_scores(run_dir / "test_pairs.npz")  # the per-pair scores behind the table
    assert set(per_pair) == set(results["test"])
    for name, scores in per_pair.items():
        assert scores["cosine"].mean() == pytest.approx(results["test"][name]["cosine"], abs=1e-5)
        assert scores["hit"].mean() == pytest.approx(results["test"][name]["r_at_1"])
    for name in ["config.yaml", "split.json", "metrics.jsonl", "results.md", "flow_paths.png", "landing.png", "flow_counts.png",
                 "checkpoints/best.pt", "checkpoints/last.pt", "model/model.safetensors", "model/config.yaml"]:
        assert (run_dir / name).exists(), name
    # what W&B recorded, read back from the offline run file
    run_file = find_run_file(run_dir)
    keys = logged_keys(run_file)
    for key in ["train/loss", "train/lr", "train/grad_norm", "perf/flow_steps_per_s", "memory/rss_mb",
                "flows/mean_active_flows", "flows/active_step_1", "flows/mean_occupied_cells", "flows/spawned", "flows/died",
                "flows/energy_arrived_fraction", "flows/mean_initial_energy", "flows/spawned_per_sample",
                "flows/neighbourhood_flows", "flows/energy_created_fraction", "flows/spawned_step_1",
                "flows/neighbourhood_step_1", "val/loss", "val/cosine",
                "val/r_at_1", "landing/x/_type", "landing/energy/_type", "figures/flow_paths/_type",
                "figures/flow_counts/_type", "test/results/_type", "summary:test/mlp/r_at_1", "summary:test/energy-flow/cosine"]:
        assert key in keys, key
    assert any(k.startswith("artifact:") and k.endswith("-best") for k in keys)
    steps = [row["_step"] for row in logged_history(run_file)]
    assert steps == sorted(steps) and steps[0] == 2
    # the API key is in no file of the run
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_train_script_resumes_a_stopped_run(tmp_path):
    run_dir = tmp_path / "run"
    first = _train(run_dir, "--wandb-mode", "disabled", "--max-steps", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"continue with: python scripts/train.py --resume {run_dir}" in first.stdout
    assert not (run_dir / "results.json").exists()
    again = _train(run_dir, "--wandb-mode", "disabled")  # a new run into a folder that holds one
    assert again.returncode != 0 and "already holds a run" in again.stderr
    split = (run_dir / "split.json").read_text()
    changed = _train(run_dir, "--wandb-mode", "disabled", "--resume", str(run_dir), "--set", "seed=7")
    assert changed.returncode != 0 and "seed: run has 0, now 7" in changed.stderr
    # the printed hint alone (no --config, no --set) continues the run with its own config
    second = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), "--resume", str(run_dir),
                             "--wandb-mode", "disabled", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (run_dir / "split.json").read_text() == split
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    # 96 training pairs / batch 16 = 6 steps per epoch, 2 epochs; logged every 2 steps plus the stop at 5
    assert train_steps == [2, 4, 5, 6, 8, 10, 12]
    assert (run_dir / "results.json").exists()


def test_train_script_help_documents_every_flag():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ["--config", "--set", "--resume", "--wandb-mode", "--device", "--seed", "--data-seed", "--output-dir", "--max-steps"]:
        assert flag in proc.stdout


def test_train_script_rejects_a_width_mismatch(tmp_path):
    import torch

    from efgraph.data import EmbeddingPairs, save_embedding_pairs

    data = save_embedding_pairs(EmbeddingPairs(src=torch.randn(50, 12), tgt=torch.randn(50, 9)), tmp_path / "p.pt")
    proc = _train(tmp_path / "run", "--wandb-mode", "disabled", "--set", "dataset=pairs", "--set", f"data_path={data}")
    assert proc.returncode != 0
    assert "output_dim: config says 12 but the target embeddings are 9 wide" in proc.stderr


def test_data_seed_alone_fixes_the_split(tmp_path):
    """Model seeds share one split (and one synthetic teacher); only --data-seed changes them."""
    runs = {"a": [], "b": ["--seed", "1"], "c": ["--seed", "1", "--data-seed", "3"]}
    for name, extra in runs.items():
        proc = _train(tmp_path / name, "--wandb-mode", "disabled", "--max-steps", "1", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    split = {name: (tmp_path / name / "split.json").read_text() for name in runs}
    assert split["a"] == split["b"]
    assert split["c"] != split["a"]
    import yaml

    saved = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())
    assert (saved["seed"], saved["data_seed"]) == (1, 3)


def test_synthetic_pairs_follow_the_data_seed_not_the_model_seed():
    import torch

    from efgraph.config import EnergyConfig
    from efgraph.training.run import load_pairs

    base = EnergyConfig(dataset="synthetic", synthetic_pairs=20, input_dim=6, output_dim=6)
    same = load_pairs(base.replace(seed=5), progress=False)
    assert torch.equal(load_pairs(base, progress=False).tgt, same.tgt)
    assert not torch.equal(load_pairs(base.replace(data_seed=1), progress=False).tgt, same.tgt)
