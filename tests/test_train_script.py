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
from wandb_files import find_run_file, logged_history, logged_keys, logged_metric_summaries

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
    proc = _train(run_dir, "--wandb-mode", "offline", "--set", "num_threads=1", env_key=secret)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU threads: 1 (num_threads 1)" in proc.stderr  # applied and logged
    assert "val step 12/12: loss " in proc.stderr  # the validation metrics on the console when computed
    # the table is printed and written
    for name in ["energy-flow", "identity", "ridge", "mlp", "transformer"]:
        assert f"| {name} |" in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["test"]) == {"energy-flow", "identity", "ridge", "mlp", "transformer"}
    assert results["baselines"]["transformer"]["width"] % results["baselines"]["transformer"]["heads"] == 0
    assert results["cpu_threads"] == 1
    for metrics in results["test"].values():  # every model's scores and its training time
        assert set(metrics) == {"cosine", "mse", "r_at_1", "train_seconds"} and metrics["train_seconds"] >= 0
    assert results["test"]["energy-flow"]["train_seconds"] == results["train_seconds"]
    assert "| train s |" in (run_dir / "results.md").read_text()
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
    # flow_paths.png: two rows (the untrained model of the seed above the trained one), two projections
    import matplotlib.image
    height, width = matplotlib.image.imread(run_dir / "flow_paths.png").shape[:2]
    assert height > 0.6 * width, (height, width)
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
    # the exported model/ (safetensors + config) is the model artifact, split.json the split's
    assert f"artifact:{run_dir.name}-model" in keys and f"artifact:{run_dir.name}-split" in keys
    # the summary holds the best validation values and their step, not the last ones
    for key in ["summary:best/step", "summary:best/val_loss", "summary:baselines/ridge/alpha",
                "summary:baselines/mlp/hidden_dim", "summary:baselines/transformer/width", "summary:run/cpu_threads"]:
        assert key in keys, key
    metrics = logged_metric_summaries(run_file)
    assert metrics["val/loss"] == "min" and metrics["val/cosine"] == "max" and metrics["val/r_at_1"] == "max"
    assert "baselines/mlp/val_curve/_type" in keys
    steps = [row["_step"] for row in logged_history(run_file)]
    assert steps == sorted(steps) and steps[0] == 2
    # the API key is in no file of the run
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_train_script_resumes_a_stopped_run(tmp_path):
    run_dir = tmp_path / "run"
    first = _train(run_dir, "--wandb-mode", "disabled", "--stop-at-step", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"continue with: python scripts/train.py --resume {run_dir}" in first.stdout
    assert not (run_dir / "results.json").exists()
    again = _train(run_dir, "--wandb-mode", "disabled")  # a new run into a folder that holds one
    assert again.returncode == 2 and "--output-dir" in again.stderr and "already holds a run" in again.stderr
    split = (run_dir / "split.json").read_text()
    changed = _train(run_dir, "--wandb-mode", "disabled", "--resume", str(run_dir), "--set", "seed=7")
    assert changed.returncode == 2 and "seed: run has 0, now 7" in changed.stderr
    assert "Traceback" not in changed.stderr
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
    for flag in ["--config", "--set", "--resume", "--wandb-mode", "--device", "--seed", "--data-seed", "--output-dir",
                 "--max-steps", "--stop-at-step", "--print-config", "--wandb-entity", "--wandb-group", "--wandb-tags"]:
        assert flag in proc.stdout


def test_train_script_rejects_a_width_mismatch(tmp_path):
    import torch

    from efgraph.data import EmbeddingPairs, save_embedding_pairs

    data = save_embedding_pairs(EmbeddingPairs(src=torch.randn(50, 12), tgt=torch.randn(50, 9)), tmp_path / "p.pt")
    proc = _train(tmp_path / "run", "--wandb-mode", "disabled", "--set", "dataset=pairs", "--set", f"data_path={data}")
    assert proc.returncode == 2
    assert "output_dim: config says 12 but the target embeddings are 9 wide" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_data_seed_alone_fixes_the_split(tmp_path):
    """Model seeds share one split (and one synthetic teacher); only --data-seed changes them."""
    runs = {"a": [], "b": ["--seed", "1"], "c": ["--seed", "1", "--data-seed", "3"]}
    for name, extra in runs.items():
        proc = _train(tmp_path / name, "--wandb-mode", "disabled", "--stop-at-step", "1", *extra)
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


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (W&B's own folder aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "wandb" not in p.relative_to(folder).parts}


def test_resume_into_another_runs_folder_is_refused_and_touches_neither(tmp_path):
    """--resume A --output-dir B, B another run: today it truncated B's metrics and reused B's split."""
    a, b = tmp_path / "a", tmp_path / "b"
    for run, seed in ((a, "0"), (b, "1")):
        proc = _train(run, "--wandb-mode", "disabled", "--stop-at-step", "5", "--data-seed", seed)
        assert proc.returncode == 0, proc.stderr[-3000:]
    before = {"a": _files(a), "b": _files(b)}
    proc = _train(b, "--wandb-mode", "disabled", "--resume", str(a))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--output-dir" in proc.stderr and "already holds a run" in proc.stderr
    assert {"a": _files(a), "b": _files(b)} == before


def test_resume_into_a_new_folder_forks_the_run_and_leaves_the_original_alone(tmp_path):
    a, fork = tmp_path / "a", tmp_path / "fork"
    first = _train(a, "--wandb-mode", "disabled", "--stop-at-step", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _files(a)
    proc = _train(fork, "--wandb-mode", "disabled", "--resume", str(a / "checkpoints" / "last.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(a) == before  # nothing of the original changed
    assert (fork / "split.json").read_text() == (a / "split.json").read_text()
    results = json.loads((fork / "results.json").read_text())
    assert results["total_steps"] == 12 and results["final_validation"]["step"] == 12
    rows = [json.loads(line) for line in (fork / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 5, 6, 8, 10, 12]  # a's rows up to 5, then its own
    # the tested state is the one in best.pt, and the exported model is it too
    import torch
    from safetensors.torch import load_file

    best = torch.load(fork / "checkpoints/best.pt", weights_only=True)
    assert best["step"] == results["best_step"]
    exported = load_file(str(fork / "model/model.safetensors"))
    for name, value in exported.items():
        torch.testing.assert_close(best["model"][name], value, rtol=0, atol=0)


def test_resuming_best_pt_in_place_is_refused_instead_of_rewinding_the_run(tmp_path):
    run = tmp_path / "run"
    first = _train(run, "--wandb-mode", "disabled", "--stop-at-step", "10")
    assert first.returncode == 0, first.stderr[-3000:]
    import torch

    best_step = torch.load(run / "checkpoints/best.pt", weights_only=True)["step"]
    assert best_step in (4, 8)  # evaluations at 4 and 8: older than last.pt (10)
    before = _files(run)
    proc = _train(run, "--wandb-mode", "disabled", "--resume", str(run / "checkpoints" / "best.pt"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "would rewind the run" in proc.stderr and "--output-dir" in proc.stderr
    assert _files(run) == before


def test_max_steps_is_a_whole_run_with_test_and_baselines(tmp_path):
    run = tmp_path / "run"
    proc = _train(run, "--wandb-mode", "disabled", "--max-steps", "9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| energy-flow |" in proc.stdout and "| mlp |" in proc.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["total_steps"] == 9
    assert results["final_validation"]["step"] == 9  # the last evaluation is at the run's end
    mlp = results["baselines"]["mlp"]
    assert mlp["val_curve"][-1][0] == 9  # the MLP baseline got as many steps as the model
    assert mlp["hidden_dim"] >= 1 and results["baselines"]["ridge"]["alpha"] > 0
    import torch

    last = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert last["step"] == 9 and last["extra"]["total_steps"] == 9
    # the schedule spans 9 steps: cosine decay reaches 0 at the last step
    assert last["scheduler"]["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)
    assert results["split"]["by"] == "pair" and results["split"]["data_seed"] == 0


@pytest.mark.parametrize("args, flag", [
    (["--config", "no/such.yaml"], "--config"),
    (["--set", "epochz=3"], "--set"),
    (["--set", "epochs=-1"], "--set"),
    (["--set", "epochs"], "--set"),
    (["--resume", "no/such/run"], "--resume"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, flag):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), "--wandb-mode", "disabled", *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {flag}" in lines[0]


def test_print_config_resolves_the_default_config_from_any_folder(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), "--print-config", "--set", "epochs=3"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    import yaml

    printed = yaml.safe_load(proc.stdout)
    assert printed["epochs"] == 3 and printed["dataset"] == "bible"
    assert not (tmp_path / "runs").exists()  # nothing was run


def test_wandb_mode_auto_respects_wandb_environment_variables(no_wandb_key, monkeypatch, tmp_path):
    """An exported WANDB_MODE decides under --wandb-mode auto; a key in $NETRC counts as a key."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"  # an explicit flag still wins
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE"):
        resolve_wandb_mode("auto")
    monkeypatch.delenv("WANDB_MODE")
    netrc_file = tmp_path / "elsewhere" / "netrc"
    netrc_file.parent.mkdir()
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert resolve_wandb_mode("auto") == "online"
