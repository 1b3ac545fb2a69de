"""Training throughput of ``scripts/train.py`` with 1 and N gloo processes on this machine's CPU.

Each configuration trains the same model on the synthetic teacher for ``--steps`` steps (global
batch ``--batch``) and reads rank 0's ``metrics.jsonl``: the median over the steps after warm-up
of samples/s and flow-steps/s (flow-steps are summed over ranks). Processes share the cores:
1 process uses all ``--threads``, N processes get ``threads / N`` each.

    python scripts/bench_train.py --json bench_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(nproc: int, args: argparse.Namespace, run_dir: Path) -> dict[str, float]:
    settings = [
        "dataset=synthetic", f"synthetic_pairs={args.batch * (args.steps + 2)}", f"batch_size={args.batch}",
        f"carrier_hidden_dim={args.hidden}", "epochs=1", "log_every=1", f"checkpoint_every={10 * args.steps}",
        "input_dim=384", "output_dim=384", "val_fraction=0.01", "test_fraction=0.01",
    ]
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    cmd = [*launcher, str(ROOT / "scripts/train.py"), "--config", str(ROOT / args.config), "--output-dir",
           str(run_dir), "--wandb-mode", "disabled", "--device", "cpu", "--no-progress", "--stop-at-step", str(args.steps)]
    for item in settings:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(args.threads // nproc, 1))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{nproc} process run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/samples_per_s" in r][args.warmup:]
    return {
        "processes": nproc,
        "samples_per_s": statistics.median(r["perf/samples_per_s"] for r in rows),
        "flow_steps_per_s": statistics.median(r["perf/flow_steps_per_s"] for r in rows),
        "step_ms": 1e3 * statistics.median(r["perf/step_time_s"] for r in rows),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/debug.yaml")
    p.add_argument("--processes", type=int, nargs="*", default=[1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--hidden", type=int, default=256, help="carrier hidden size")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.processes:
            results.append(run_once(n, args, Path(tmp) / f"p{n}"))
            print(f"  {n} process(es): {results[-1]['samples_per_s']:.1f} samples/s", file=sys.stderr)
    print(f"config {args.config}, global batch {args.batch}, carrier hidden {args.hidden}, {args.threads} threads, "
          f"torch {torch.__version__}, median of steps {args.warmup + 1}..{args.steps}\n")
    print("| processes | samples/s | flow-steps/s | step ms |\n|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['processes']} | {r['samples_per_s']:.1f} | {r['flow_steps_per_s']:.0f} | {r['step_ms']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
