"""Two gloo processes under torchrun end with the parameters of one process on the same global batches,
also after a resume, and a signal to one rank stops both after the same step."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from conftest import train_script_command
from test_signals import END, _assert_same_parameters, _outputs, _run_here, _start, _wait_for_step
from test_signals import _cmd as _signals_cmd

# 80 training pairs in global batches of 15: ranks get 8 and 7 rows (and 3 and 2 in the last
# batch), so the per-rank loss scaling is exercised, not just equal halves.
SETTINGS = [
    "dataset=synthetic", "synthetic_pairs=100", "input_dim=12", "output_dim=12", "lattice_width=5",
    "lattice_height=5", "lattice_depth=5", "initial_flows_per_sample=3", "max_active_flows=8",
    "carrier_hidden_dim=16", "carrier_num_layers=1", "face_channels=8", "readout_hidden_dim=16",
    "batch_size=15", "epochs=2", "log_every=1", "checkpoint_every=3", "warmup_steps=2", "learning_rate=3e-3",
    "energy_threshold=0.01", "spawn_threshold=0.5", "seed=1",  # seed 1: untrained flows spawn (seed 0 none)
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(run_dir: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}"] if nproc > 1 else None
    extra = extra or ("--stop-at-step", "6")
    cmd = train_script_command(run_dir, SETTINGS, "--wandb-mode", "disabled", "--device", "cpu", *extra,
                               launcher=launcher)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_two_gloo_processes_in_micro_batches_match_one_process(tmp_path):
    # each rank runs its 8 or 7 rows as micro-batches of 3 (3+3+2, 3+3+1) with activation
    # checkpointing; the update must still be the one-process whole-batch one, which a micro-batch
    # loss weighted by anything but its share of the global batch's rows would break
    single = _run(tmp_path / "one", 1, "--stop-at-step", "6")
    assert single.returncode == 0, single.stderr[-3000:]
    double = _run(tmp_path / "two", 2, "--stop-at-step", "6", "--set", "micro_batch_size=3",
                  "--set", "activation_checkpointing=true")
    assert double.returncode == 0, double.stderr[-3000:]
    assert "2 process(es)" in double.stderr
    assert "activation checkpointing on, micro-batches of 3" in double.stderr
    a = torch.load(tmp_path / "one/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "two/checkpoints/last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    # atol 5e-5: summation order differs between the runs, and AdamW divides each entry's step by
    # its gradient's running size, so an entry whose gradient is ~0 can move ~1e-5 apart (measured
    # 1.5e-5 on one entry of 128 with the face injection); a mis-weighted micro-batch moves
    # parameters ~lr = 3e-3 apart
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-5, atol=5e-5, msg=f"{name} differs")
    # the logged (global) losses agree step by step, and training really moved: not two untouched models
    rows_one, rows_two = (
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    )
    losses_one = [r["train/loss"] for r in rows_one if "train/loss" in r]
    losses_two = [r["train/loss"] for r in rows_two if "train/loss" in r]
    assert len(losses_one) == len(losses_two) == 6
    assert losses_two == [pytest.approx(v, abs=1e-5) for v in losses_one]
    assert losses_one[-1] != losses_one[0]
    assert sum(r["flows/spawned"] for r in rows_one if "flows/spawned" in r) > 0  # the spawn path ran


def test_a_distributed_run_resumes_to_the_parameters_of_an_uninterrupted_one(tmp_path):
    single = _run(tmp_path / "one", 1)
    assert single.returncode == 0, single.stderr[-3000:]
    first = _run(tmp_path / "two", 2, "--stop-at-step", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(tmp_path / "two", 2, "--stop-at-step", "6", "--resume", str(tmp_path / "two"))
    assert second.returncode == 0, second.stderr[-3000:]
    a = torch.load(tmp_path / "one/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "two/checkpoints/last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-5, atol=1e-6, msg=f"{name} differs")


def test_a_signal_to_one_rank_of_two_stops_both_after_the_same_step(tmp_path):
    # SIGUSR1 to rank 1 only (torchrun does not forward SIGUSR1: Slurm signals each task): rank 0
    # learns of it in the step's all-reduce, writes last.pt at that step and prints the command
    # (test_signals' tiny 40-step run, compared at step 30; ~2x a one-process case there: two
    # start-ups, and torchrun's)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    run_dir = tmp_path / "two"
    torchrun = _start(_signals_cmd(run_dir, launcher=launcher), tmp_path / "out")
    signalled_at = _wait_for_step(torchrun, run_dir, 2)
    rank1 = next(p for p in psutil.Process(torchrun.pid).children() if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGUSR1)
    torchrun.wait(timeout=120)
    out, err = _outputs(tmp_path / "out")
    # torchrun reports ranks that exit 138 as failed; once one has exited it stops the others, so a
    # rank still shutting down (its files written, its W&B run finished) may be reported as SIGTERM
    assert torchrun.returncode != 0
    assert "exitcode  : 138" in err, err[-3000:]
    said = re.search(rf"Stopped by SIGUSR1 after step (\d+); continue with: torchrun --nproc_per_node=2 "
                     rf"scripts/train\.py --resume {re.escape(str(run_dir))}\n", out)
    assert said, (out, err[-3000:])  # printed by rank 0, which got no signal
    stopped_at = int(said.group(1))
    assert signalled_at <= stopped_at < END
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["step"] == stopped_at
    _run_here(run_dir, resume=run_dir)  # one process continues it (results do not depend on the ranks)
    _run_here(tmp_path / "straight")  # and ends where one uninterrupted process does
    _assert_same_parameters(tmp_path / "straight", run_dir, rtol=1e-5, atol=1e-6)
