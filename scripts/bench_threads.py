"""Runs side by side on one machine: each at PyTorch's default thread count, or each with its share.

Starts ``--runs`` copies of ``scripts/train.py`` at once on ``--config`` (different seeds), first
with ``num_threads: 0`` (PyTorch's default: every core, in every process), then with
``num_threads = cores / runs``, and reads each run's ``metrics.jsonl``: the median optimizer step
time after warm-up. The ratio is what oversubscribing the cores costs each run (what
``num_threads`` and ``scripts/study.py --jobs`` avoid).

    python scripts/bench_threads.py --json bench_threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_side_by_side(args: argparse.Namespace, num_threads: int, folder: Path) -> list[float]:
    """Median step time (s) of each of ``args.runs`` runs started together at ``num_threads``."""
    procs = []
    for k in range(args.runs):
        run_dir = folder / f"threads{num_threads}-run{k}"
        cmd = [sys.executable, str(ROOT / "scripts/train.py"), "--config", str(ROOT / args.config), "--output-dir",
               str(run_dir), "--wandb-mode", "disabled", "--device", "cpu", "--no-progress", "--seed", str(k),
               "--stop-at-step", str(args.steps), "--set", f"num_threads={num_threads}", "--set", "log_every=1",
               "--set", f"checkpoint_every={10 * args.steps}", "--set", f"eval_every={10 * args.steps}"]
        for item in args.overrides:
            cmd += ["--set", item]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        procs.append((run_dir, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                                env=env)))
    medians = []
    for run_dir, proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"run {run_dir.name} failed:\n{err[-3000:]}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        times = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r][args.warmup:]
        medians.append(statistics.median(times))
    return medians


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/routing.yaml", help="the runs' config (default: %(default)s)")
    p.add_argument("--runs", type=int, default=2, help="runs started together (default: %(default)s)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the median (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of every run (repeatable)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = p.parse_args(argv)
    if args.runs < 1 or args.steps <= args.warmup:
        raise SystemExit("error: --runs must be >= 1 and --steps > --warmup")
    cores = os.cpu_count() or 1
    share = max(1, cores // args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        default = run_side_by_side(args, 0, Path(tmp))
        shared = run_side_by_side(args, share, Path(tmp))
    rows = [("0 (PyTorch's default)", default), (str(share), shared)]
    print(f"{args.runs} runs of {args.config} side by side on {cores} cores, {args.steps} steps each "
          f"(median step time after {args.warmup} steps)\n")
    print("| num_threads per run | median step time per run (ms) | slower than sharing |")
    print("|---|---:|---:|")
    for label, medians in rows:
        ratio = statistics.median(medians) / statistics.median(shared)
        print(f"| {label} | {', '.join(f'{1e3 * m:.1f}' for m in medians)} | {ratio:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "runs": args.runs, "config": args.config,
                                               "steps": args.steps, "default_step_s": default,
                                               "shared_threads": share, "shared_step_s": shared}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
