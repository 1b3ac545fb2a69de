"""A training process killed with SIGKILL resumes from its last checkpoint and ends as if never killed:
same parameters, same evaluations, same selected (best) state, same test results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from conftest import train_script_command

SETTINGS = [
    "dataset=synthetic", "synthetic_pairs=400", "input_dim=16", "output_dim=16", "lattice_width=6",
    "lattice_height=6", "lattice_depth=6", "initial_flows_per_sample=4", "max_active_flows=10",
    "carrier_hidden_dim=48", "carrier_num_layers=2", "batch_size=8", "epochs=1", "log_every=1",
    "checkpoint_every=3", "eval_every=5", "warmup_steps=2",
]


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return train_script_command(run_dir, SETTINGS, "--wandb-mode", "disabled", "--device", "cpu", *extra)


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a line cut by the kill
            pass
    return steps


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(_cmd(tmp_path / "straight", "--max-steps", "20"), capture_output=True, text=True,
                              env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    victim_dir = tmp_path / "victim"
    victim = subprocess.Popen(_cmd(victim_dir, "--max-steps", "20"), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and max(_logged_steps(victim_dir), default=0) < 8:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    killed_at = max(_logged_steps(victim_dir))
    assert 8 <= killed_at < 20, "the kill must land mid-run"
    ckpt = torch.load(victim_dir / "checkpoints/last.pt", weights_only=True)  # the last good one is intact
    assert killed_at - 3 <= ckpt["step"] <= killed_at  # nothing lost beyond one checkpoint interval

    resumed = subprocess.run(_cmd(victim_dir, "--max-steps", "20", "--resume", str(victim_dir)),
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    b = torch.load(victim_dir / "checkpoints/last.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=0, atol=0, msg=f"{name} differs after kill+resume")
    # the run crossed evaluations (5, 10, 15, 20) on both sides of the kill: the same best state is
    # selected, kept in best.pt and tested
    assert a["extra"]["evaluations"] == b["extra"]["evaluations"] and len(a["extra"]["evaluations"]) == 4
    best_a = torch.load(tmp_path / "straight/checkpoints/best.pt", weights_only=True)
    best_b = torch.load(victim_dir / "checkpoints/best.pt", weights_only=True)
    assert best_a["step"] == best_b["step"]
    for name, value in best_a["model"].items():
        torch.testing.assert_close(best_b["model"][name], value, rtol=0, atol=0, msg=f"best {name} differs")
    results_a = json.loads((tmp_path / "straight/results.json").read_text())
    results_b = json.loads((victim_dir / "results.json").read_text())
    assert results_a["best_step"] == results_b["best_step"] == best_a["step"]
    # the same scores (each model's train_seconds is a wall time, no number to reproduce)
    scores = lambda r: {m: {k: v for k, v in d.items() if k != "train_seconds"} for m, d in r["test"].items()}  # noqa: E731
    assert scores(results_a) == scores(results_b)
