"""Stops that lose nothing: SIGTERM, SIGINT and SIGUSR1 finish the step, save it and exit 128 + the signal.

A run of ``scripts/train.py`` signalled mid-run writes ``last.pt`` at the step it stopped after,
prints the ``--resume`` command and exits with the signal's conventional status; resuming it ends
with the parameters of an uninterrupted run. The uninterrupted run and the resumes run in this
process (``run_training``, what the script calls; the script's own ``--resume`` is the crash
test's): a Python start-up here costs ~4 s, the run itself ~1 s. In process: a second Ctrl-C stops at once, the
handlers exist only while ``train`` runs (a caller's own handlers come back), an ignored signal
stays ignored, and nothing is installed outside the main thread.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_config, train_script_command
from efgraph import EnergyConfig, EnergyTrainer, FlowProcessor
from efgraph.data import make_teacher_pairs
from efgraph.training.run import run_training
from efgraph.training.run_logger import RunLogger
from efgraph.training.signals import StopRequest, TrainingInterrupted

# the crash test's tiny run; checkpoint_every past the end, so that the only last.pt before the
# end is the one the signal makes
SETTINGS = [
    "dataset=synthetic", "synthetic_pairs=400", "input_dim=16", "output_dim=16", "lattice_width=6",
    "lattice_height=6", "lattice_depth=6", "initial_flows_per_sample=4", "max_active_flows=10",
    "carrier_hidden_dim=48", "carrier_num_layers=2", "batch_size=8", "epochs=1", "log_every=1",
    "checkpoint_every=1000", "eval_every=5", "warmup_steps=2",
]
# a 40-step run (the schedule's span) compared at step 30: --stop-at-step skips the test and the
# baselines, which the crash test covers, and keeps each process at its start-up cost
LENGTH = ["--max-steps", "40", "--stop-at-step", "30"]
TOTAL, END = 40, 30
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cmd(run_dir: Path, *extra: str, launcher: list[str] | None = None) -> list[str]:
    return train_script_command(run_dir, SETTINGS, "--wandb-mode", "disabled", "--device", "cpu", *LENGTH, *extra,
                                launcher=launcher)


def _run_here(run_dir: Path, resume: Path | None = None) -> None:
    """``scripts/train.py`` with these settings, in this process, on one thread as the script runs
    under OMP_NUM_THREADS=1 (so that its parameters match bit for bit)."""
    config = EnergyConfig.from_yaml(ROOT / "configs/debug.yaml").with_overrides(SETTINGS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outcome = run_training(config, run_dir, wandb_mode="disabled", device="cpu", resume=resume, progress=False,
                               total_steps=None if resume is not None else TOTAL, stop_at_step=END)
    finally:
        torch.set_num_threads(threads)
    assert outcome.table == ""  # stopped at END, before the test


def _sigint_default() -> None:
    # a child of a shell's background job inherits SIGINT ignored; the test needs Ctrl-C's default
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a line being written
            pass
    return max(steps)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> int:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and _last_logged_step(run_dir) < step:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be signalled"
    return _last_logged_step(run_dir)


def _start(cmd: list[str], out_dir: Path, **kwargs) -> subprocess.Popen:
    """Start ``cmd`` with stdout and stderr in files (a pipe nobody reads while the test waits could fill)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "stdout", "w") as out, open(out_dir / "stderr", "w") as err:
        return subprocess.Popen(cmd, env=ENV, stdout=out, stderr=err, text=True, **kwargs)


def _outputs(out_dir: Path) -> tuple[str, str]:
    return (out_dir / "stdout").read_text(), (out_dir / "stderr").read_text()


def _assert_same_parameters(reference: Path, run: Path, rtol: float = 0.0, atol: float = 0.0) -> None:
    a = torch.load(reference / "checkpoints/last.pt", weights_only=True)
    b = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert a["step"] == b["step"] == END
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=rtol, atol=atol,
                                   msg=f"{name} differs after stop + resume")
    assert [e["step"] for e in a["extra"]["evaluations"]] == [e["step"] for e in b["extra"]["evaluations"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, shared by every case."""
    run_dir = tmp_path_factory.mktemp("signals") / "straight"
    _run_here(run_dir)
    return run_dir


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_signal_mid_run_saves_the_step_exits_128_plus_it_and_resumes_exactly(tmp_path, reference, sig):
    victim_dir = tmp_path / "victim"
    victim = _start(_cmd(victim_dir), tmp_path / "out", preexec_fn=_sigint_default)
    signalled_at = _wait_for_step(victim, victim_dir, 2)
    victim.send_signal(sig)
    victim.wait(timeout=120)
    out, err = _outputs(tmp_path / "out")
    assert victim.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert f"{sig.name}: stopping after this step" in err
    said = re.search(rf"Stopped by {sig.name} after step (\d+); continue with: "
                     rf"python scripts/train\.py --resume {re.escape(str(victim_dir))}\n", out)
    assert said, out
    stopped_at = int(said.group(1))
    assert signalled_at <= stopped_at < END, "the stop must land mid-run, after the step under way"
    ckpt = torch.load(victim_dir / "checkpoints/last.pt", weights_only=True)
    assert ckpt["step"] == stopped_at  # the step it stopped after, not an older checkpoint
    assert _last_logged_step(victim_dir) == stopped_at  # its metric rows are all there

    _run_here(victim_dir, resume=victim_dir)
    _assert_same_parameters(reference, victim_dir)


# ---- in process -----------------------------------------------------------------------------------

def _tiny_trainer(run_dir: Path | None, run_logger: RunLogger | None = None):
    config = tiny_config(input_dim=12, output_dim=12, batch_size=16, warmup_steps=2, log_every=1,
                         checkpoint_every=1000, eval_every=1000, carrier_hidden_dim=16)
    pairs = make_teacher_pairs(96, 12, 12, seed=0)
    trainer = EnergyTrainer(FlowProcessor.from_config(config), config, run_dir=run_dir, run_logger=run_logger,
                            progress=False)
    return trainer, pairs.src, pairs.tgt


class _SignalAt(RunLogger):
    """Sends ``signals`` to this process while logging step ``step`` (inside that step's loop body)."""

    def __init__(self, run_dir: Path, step: int, *signals: int) -> None:
        super().__init__(run_dir)
        self.at, self.signals = step, signals

    def log(self, metrics: dict[str, float], step: int) -> None:
        super().log(metrics, step)
        if step == self.at:
            for sig in self.signals:
                os.kill(os.getpid(), sig)


def test_train_in_process_stops_after_the_step_and_gives_the_callers_handlers_back(tmp_path):
    seen = []
    mine = lambda signum, frame: seen.append(signum)  # noqa: E731
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        trainer, x, y = _tiny_trainer(tmp_path, _SignalAt(tmp_path, 3, signal.SIGUSR1))
        with pytest.raises(TrainingInterrupted) as stopped:
            trainer.train(x, y, epochs=2)
        assert (stopped.value.code, stopped.value.step) == (138, 3)
        assert stopped.value.checkpoint == tmp_path / "checkpoints/last.pt"
        assert not isinstance(stopped.value, KeyboardInterrupt)
        assert torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["step"] == trainer.step == 3
        assert seen == []  # the trainer's handler took it, not the caller's
        # afterwards the caller's handlers are back, and a signal reaches them again
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert {sig: signal.getsignal(sig) for sig in before} == before
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_ctrl_c_stop_is_a_keyboard_interrupt_too_and_a_second_one_stops_at_once(tmp_path):
    # the state a foreground Python starts in: a shell starts background jobs (`pytest &`, nohup,
    # schedulers) with SIGINT ignored, and the trainer rightly leaves an ignored signal alone
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        trainer, x, y = _tiny_trainer(tmp_path / "once", _SignalAt(tmp_path / "once", 2, signal.SIGINT))
        with pytest.raises(KeyboardInterrupt) as once:  # what code catching Ctrl-C around training expects
            trainer.train(x, y, epochs=2)
        assert isinstance(once.value, TrainingInterrupted) and (once.value.code, once.value.step) == (130, 2)

        trainer, x, y = _tiny_trainer(tmp_path / "twice",
                                      _SignalAt(tmp_path / "twice", 2, signal.SIGINT, signal.SIGINT))
        with pytest.raises(KeyboardInterrupt) as twice:
            trainer.train(x, y, epochs=2)
        assert not isinstance(twice.value, TrainingInterrupted)  # at once: inside step 2's logging, nothing saved
        assert not (tmp_path / "twice/checkpoints/last.pt").exists()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the trainer put it back
    finally:
        signal.signal(signal.SIGINT, previous)


def test_stop_request_leaves_ignored_signals_and_other_threads_alone():
    term = signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with StopRequest() as request:
            assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN  # a nohup'ed or background job's choice stays
            assert signal.getsignal(signal.SIGTERM) is not term
            os.kill(os.getpid(), signal.SIGUSR1)
            assert request.signum is None
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGUSR1, previous)

    outcome = {}

    def in_a_thread() -> None:
        with StopRequest() as request:
            outcome["installed"] = request.installed

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    assert outcome == {"installed": False}
