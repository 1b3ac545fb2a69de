"""The GPU check: one command, about 8 minutes on one GPU, one JSON + one Markdown file.

    python scripts/gpu_check.py --out gpu_check/                 # on a machine with a CUDA GPU
    python scripts/gpu_check.py --out /tmp/gpu_check_cpu --device cpu --quick   # the same parts on a CPU, small

Three parts, each in its own subprocess with its own time limit (a part, or a training run, that
runs out of time is recorded as such; the check goes on), in this order:

1. *CUDA tests*: the tests that skip without a CUDA device (``-k cuda`` over the test files that
   ask ``torch.cuda.is_available()``), with pass / fail / skip counts (skipped on a CPU).
2. *GPU table*: ``scripts/bench_forward.py --workload gpu`` (its table 6; with ``--table-workloads gpu
   compile`` also table 7, kernels per step eager and compiled): per preset, engine /
   carrier alone, flow-steps/s, dispatcher ops (kernels) and host syncs per lattice step, the
   carrier's share of the measured bf16 matmul peak (fp32 on a CPU), and peak memory; to that
   this script adds the memory plan's estimate for the same workload (the table's pinned flows:
   ``initial_flows_per_sample x batch`` flows for ``--steps`` steps, no optimizer):
   :func:`efgraph.utils.memory.plan_memory` at those flows, its parameters, their gradients and
   the gradients in flight plus the activations, against the CUDA peak (on a CPU the kept
   activations against bench_forward's *held* bytes).
3. *Training*: 50 optimizer steps of each preset (``configs/debug.yaml``, ``experiment.yaml``,
   ``optimized.yaml`` at full size on synthetic pairs, the trainer's own memory plan for the
   device), without and with ``compile`` (``--set compile=true``), each run by
   ``scripts/bench_presets.py`` in its own process: whether it ran, steps done, seconds per step
   (median after the first), the first step (compilation included), flow-steps/s, peak memory
   against the plan's estimate.

The default budget (``--budget-s``, 480 s) is shared out: 60 s for the tests, 100 s for the
table, the rest for the six training runs (a compiled run gets twice an eager one's share; what a
run leaves unused goes to the next); a part never gets more than what is left before the
deadline. A training run starts no step after its first that the steps before it say would end
past 90 % of its share, and is killed at its share (what it measured is kept). ``--quick`` shrinks the sizes (carrier
64 x 1, batch 2, 3 training steps, table at hidden 64) so the whole check runs on a CPU in a
few minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
PRESETS = ("debug", "experiment", "optimized")
PARTS = ("tests", "table", "train")
# shares of the budget: seconds for the tests and the table; the training runs share the rest
TESTS_S, TABLE_S = 60.0, 100.0
QUICK_TABLE = ["--hidden", "64", "--layers", "1", "--steps", "3", "--repeats", "1", "--warmup", "0",
               "--peak-size", "256", "--gpu-batch", "2"]
QUICK_TRAIN = ["carrier_hidden_dim=64", "carrier_num_layers=1", "batch_size=2"]


def load_script(name: str):
    """A module of ``scripts/`` (not a package) by file name."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Clock:
    """The deadline shared by the parts."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget = budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def limit(self, want: float) -> float:
        """``want`` seconds, or what is left before the deadline when less (never below 1 s)."""
        return max(min(want, self.left()), 1.0)


def run_part(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (in the project root) with a time limit: status ``ok``, ``failed (exit N)`` or
    ``timed out after S s``, its seconds, stdout and the tail of stderr."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        status = f"timed out after {timeout:.0f} s"
        stdout = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
    return {"status": status, "seconds": time.perf_counter() - t0, "timeout_s": timeout, "command": cmd,
            "stdout": stdout, "stderr_tail": stderr[-4000:]}


# ---- 1. the CUDA tests -------------------------------------------------------------------------

def cuda_test_files() -> list[str]:
    """The test files with tests that skip without CUDA."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "torch.cuda.is_available()" in p.read_text(encoding="utf-8"))


def junit_counts(path: Path) -> dict[str, Any]:
    """Pass / fail / error / skip counts and each test's outcome from a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0)})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "total": len(cases), "cases": cases}


def run_tests(out: Path, clock: Clock) -> dict[str, Any]:
    files = cuda_test_files()
    xml = out / "cuda_tests.xml"
    if xml.exists():
        xml.unlink()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k", "cuda", *files,
           f"--junitxml={xml}"]
    res = run_part(cmd, clock.limit(TESTS_S))
    res["files"] = files
    if xml.exists():
        res.update(junit_counts(xml))
        if res["status"] == "failed (exit 5)":  # pytest: no tests collected
            res["status"] = "no CUDA tests collected"
        elif res["total"] and res["skipped"] == res["total"]:
            res["status"] = "skipped (no CUDA device)"
    res["stdout"] = res["stdout"][-4000:]
    return res


# ---- 2. the GPU table --------------------------------------------------------------------------

def plan_for_table_row(row: dict[str, Any], bench_args: dict[str, Any]) -> dict[str, Any]:
    """The memory plan's estimate of one bench_forward GPU-table row's workload: its preset with
    the table's carrier and radius, ``row['flows']`` flows (``initial x batch``, pinned: none dies
    or spawns) for ``row['steps']`` steps, no checkpointing."""
    import torch

    bench = load_script("bench_forward")
    presets = load_script("bench_presets")
    from efgraph.core.flow_processor import FlowProcessor

    config = bench.PRESETS[row["preset"]]().replace(
        carrier_hidden_dim=bench_args["hidden"], carrier_num_layers=bench_args["layers"],
        carrier_type=bench_args["carrier"], interaction_radius=bench_args["radius"],
        max_spawn_per_step=0)  # pinned: nothing spawns, so the flows that end are the injected ones
    with torch.device("meta"):
        n_params = sum(p.numel() for p in FlowProcessor.from_config(config).parameters())
    batch = row["batch"]
    per_sample = [row["flows"] / batch] * row["steps"]
    est = presets.estimate_at_flows(config, n_params, batch, batch, False, per_sample)
    # fwd + bwd without an optimizer: parameters, their gradients, the gradients in flight, activations
    no_adamw = est.parameter_bytes + est.optimizer_bytes // 3 + est.gradient_buffer_bytes + est.activation_bytes
    return {"parameters": n_params, "estimate_bytes": no_adamw, "activation_bytes": est.activation_bytes,
            "kept_activation_bytes": est.kept_activation_bytes, "flow_steps": est.flow_steps}


def run_table(out: Path, clock: Clock, args: argparse.Namespace) -> dict[str, Any]:
    json_path = out / "gpu_table.json"
    cmd = [sys.executable, str(ROOT / "scripts/bench_forward.py"), "--device", args.device,
           "--workload", *args.table_workloads, "--json", str(json_path), *(QUICK_TABLE if args.quick else []),
           *args.table_args]
    res = run_part(cmd, clock.limit(TABLE_S * (2 if "compile" in args.table_workloads else 1)))
    res["markdown"] = res.pop("stdout")
    if res["status"] == "ok" and json_path.exists():
        data = json.loads(json_path.read_text())
        res["meta"], res["rows"], res["compile_rows"] = data["meta"], data["gpu"], data.get("compile", [])
        cuda = args.device.startswith("cuda")
        for row in res["rows"]:
            plan = plan_for_table_row(row, data["meta"]["args"])
            measured_mb = row["engine_memory"]["peak_mb" if cuda else "held_mb"]
            planned = plan["estimate_bytes"] if cuda else plan["kept_activation_bytes"]
            row["plan"] = {**plan, "measured_mb": measured_mb, "measured_kind": "peak" if cuda else "held",
                           "planned_mb": planned / 2**20,
                           "measured_over_plan": measured_mb * 2**20 / planned if measured_mb is not None else None}
    return res


def table_markdown(res: dict[str, Any]) -> str:
    lines = [res.get("markdown", "").strip()]
    rows = res.get("rows") or []
    if rows:
        kind = rows[0]["plan"]["measured_kind"]
        what = ("CUDA peak over forward + backward against the plan's parameters + gradients + activations"
                if kind == "peak" else "held bytes after the forward against the plan's kept activations")
        lines += ["", f"Memory against the plan ({what}, at the table's flows):", "",
                  f"| preset | flows x steps | measured {kind} MiB | plan MiB | measured / plan |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            p = r["plan"]
            ratio = "-" if p["measured_over_plan"] is None else f"{p['measured_over_plan']:.2f}"
            measured = "-" if p["measured_mb"] is None else f"{p['measured_mb']:.0f}"
            lines.append(f"| {r['preset']} | {r['flows']} x {r['steps']} | {measured} | {p['planned_mb']:.0f} | {ratio} |")
    return "\n".join(lines)


# ---- 3. training steps -------------------------------------------------------------------------

def run_training(out: Path, clock: Clock, args: argparse.Namespace) -> dict[str, Any]:
    presets = load_script("bench_presets")
    runs = [(name, compiled) for compiled in args.compile for name in args.presets]
    weights = [2.0 if compiled else 1.0 for _, compiled in runs]
    records = []
    t0 = time.perf_counter()
    for i, (name, compiled) in enumerate(runs):
        # this run's share of what is left
        share = clock.left() * weights[i] / sum(weights[i:])
        kill = max(share, 1.0)
        # no step starts that would end past 90 % of the share (bench_presets' deadline), judged by
        # the steps after the first (which compiles, with compile on)
        argv = ["--presets", name, "--device", args.device, "--steps", str(args.train_steps),
                "--budget-after-first-step", "--kill-after", f"{kill:.0f}",
                "--threads", str(args.threads)]
        for item in [*(QUICK_TRAIN if args.quick else []), *args.set, *(["compile=true"] if compiled else [])]:
            argv += ["--set", item]
        bp_args = presets.build_parser().parse_args(argv)
        start = time.perf_counter()
        if clock.left() < 5:
            rec = {"preset": name, "status": "not run: no time left", "compile": compiled}
        else:
            rec = presets.run_isolated(name, bp_args)
        rec["compile"] = compiled
        rec["wall_seconds"] = time.perf_counter() - start
        rec["kill_after_s"] = kill
        records.append(rec)
        print(f"  train {name}{' + compile' if compiled else ''}: {rec.get('status')}, "
              f"{rec.get('steps_done')} step(s) in {rec['wall_seconds']:.0f} s", file=sys.stderr)
    return {"seconds": time.perf_counter() - t0, "steps_asked": args.train_steps, "records": records,
            "table": presets.table(records)}


def training_summary(res: dict[str, Any]) -> str:
    lines = ["| preset | compile | ran | optimizer steps | s / step (median after the first) | first step s "
             "| flow-steps / s | peak / plan's estimate | wall s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["records"]:
        ran = "yes" if r.get("steps_done") else "no"
        status = r.get("status", "")
        if status != "done" or r.get("stop_reason", "done") != "done":
            ran += f" ({status}{'; ' + r['stop_reason'] if r.get('stop_reason') not in (None, 'done') else ''})"
        fps = r.get("flow_steps_per_s")
        ratio = r.get("peak_over_estimate")
        lines.append(f"| {r['preset']} | {'on' if r['compile'] else 'off'} | {ran} "
                     f"| {r.get('steps_done', 0)} of {res['steps_asked']} | {_s(r.get('seconds_per_step'))} "
                     f"| {_s(r.get('first_step_seconds'))} | {'-' if fps is None else f'{fps:,.0f}'} "
                     f"| {'-' if ratio is None else f'{ratio:.2f}'} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 1 else f"{v:.2f}"


# ---- the report --------------------------------------------------------------------------------

def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    out = [f"# GPU check ({m['device']}: {m['device_name']})", "",
           f"torch {m['torch']}, python {m['python']}, code {m['code']}, {m['started']}; budget {m['budget_s']:.0f} s, "
           f"took {m['seconds']:.0f} s{', --quick (small sizes)' if m['quick'] else ''}"]
    parts = report["parts"]
    if "tests" in parts:
        t = parts["tests"]
        counts = ", ".join(f"{k} {t[k]}" for k in ("passed", "failed", "error", "skipped") if k in t)
        out += ["", "## CUDA tests", "", f"`pytest -k cuda {' '.join(t['files'])}`: **{t['status']}** "
                f"({counts or 'no counts'}; {t['seconds']:.0f} s of {t['timeout_s']:.0f})"]
        failed = [c["test"] for c in t.get("cases", []) if c["outcome"] in ("failed", "error")]
        if failed:
            out += ["", "Failed: " + ", ".join(f"`{name}`" for name in failed)]
    if "table" in parts:
        t = parts["table"]
        workloads = " ".join(m["args"]["table_workloads"])
        out += ["", f"## Engine / carrier (scripts/bench_forward.py --workload {workloads})", "",
                f"status **{t['status']}** ({t['seconds']:.0f} s of {t['timeout_s']:.0f})", "", table_markdown(t)]
        if t["status"] != "ok":
            out += ["", "```", t["stderr_tail"][-1500:], "```"]
    if "train" in parts:
        t = parts["train"]
        out += ["", f"## Training: {t['steps_asked']} optimizer steps per preset, compile off and on", "",
                training_summary(t), "", "Details (scripts/bench_presets.py's table):", "", t["table"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (for a CPU): carrier 64 x 1, batch 2, 3 steps")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole check's time limit (default 8 minutes)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS), help="presets to train")
    p.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--train-steps", type=int, default=None, help="optimizer steps per training run (default 50; 3 with --quick)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for the training runs")
    p.add_argument("--table-workloads", nargs="+", choices=["gpu", "compile"], default=["gpu"],
                   help="bench_forward tables: gpu (table 6); add compile for table 7 (kernels per step eager and "
                        "compiled; its budget share doubles)")
    p.add_argument("--table-args", nargs=argparse.REMAINDER, default=[],
                   help="more arguments for bench_forward.py (last on the line)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of the training runs")
    args = p.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.compile = [c == "on" for c in args.compile]
    if args.train_steps is None:
        args.train_steps = 3 if args.quick else 50
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget_s)
    presets = load_script("bench_presets")
    meta = {"device": args.device, "torch": torch.__version__, "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
            else f"CPU {platform.machine()}, {os.cpu_count()} cores", "code": presets.code_version(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget_s, "quick": args.quick,
            "args": {k: v for k, v in vars(args).items()}}
    report: dict[str, Any] = {"meta": meta, "parts": {}}
    for part in PARTS:
        if part not in args.parts:
            continue
        print(f"gpu_check: {part} ({clock.left():.0f} s left)", file=sys.stderr)
        if part == "tests":
            report["parts"]["tests"] = run_tests(out, clock)
        elif part == "table":
            report["parts"]["table"] = run_table(out, clock, args)
        else:
            report["parts"]["train"] = run_training(out, clock, args)
        meta["seconds"] = time.perf_counter() - clock.start
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))  # what ran so far
    meta["seconds"] = time.perf_counter() - clock.start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
