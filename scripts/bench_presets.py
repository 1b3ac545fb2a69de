"""Train the seed presets at full size on this machine: optimizer steps, flow-steps/s, peak RSS
against the memory plan's estimate.

For each preset (``configs/debug.yaml``, ``experiment.yaml``, ``optimized.yaml``: 768-d input and
output, GRU 1024 x 3, their lattices, flows and batches) on synthetic 768-d teacher pairs
(``dataset: synthetic``), the script builds :class:`~efgraph.training.trainer.EnergyTrainer`
exactly as ``scripts/train.py`` does, lets the memory plan choose (whole batch, activation
checkpointing, micro-batches; :mod:`efgraph.utils.memory`) for this machine's available memory
minus ``--headroom-gib`` for the OS and the runtime, and runs ``--steps`` optimizer steps
(``EnergyTrainer.train_step``; default 20 for debug, 1 for the others). Each preset runs in its own
subprocess, so that its peak RSS (``VmHWM``, the process's high-water mark) is its own.

Per preset it reports:

* the plan: whole batch / checkpointing / micro-batch size, and its worst-case estimate (what
  ``describe()`` prints);
* seconds per optimizer step (the median over the steps after the first when more than one ran),
  seconds per micro-batch (forward + backward of one micro-batch, between the starts of
  consecutive micro-batches);
* flow-steps per optimizer step (from the forward's trace: the sum over its lattice steps of the
  active flows) against the plan's worst case, and flow-steps/s;
* peak RSS, and the RSS before the model was built (the Python / PyTorch runtime and the data);
  ``peak RSS / estimate`` and ``(peak - before) / estimate``. The estimate is a worst case
  (every flow spawns whenever it may, none dies); an untrained model's flows die or arrive early,
  so ALSO reported is the same estimate evaluated at the flows the busiest micro-batch actually
  ran (:func:`efgraph.utils.memory.plan_memory` with its per-step flow bound replaced by the
  measured per-sample counts): ``(peak - before) / estimate at measured flows`` is the ratio that
  checks the estimator.

Time budget: ``--max-seconds-per-preset S`` never starts a step or a micro-batch that the times
measured so far say would end past ``S`` seconds of training; when not even one whole optimizer
step fits, the micro-batches that ran give the time per micro-batch and the step's projection
(micro-batches per step x time per micro-batch, marked as a projection). A micro-batch once started
runs to its end; ``--micro-batch-size N`` (an explicit plan, which the trainer honours) makes them
smaller when the plan's single micro-batch is longer than the budget. ``--kill-after S`` stops a
preset's subprocess outright after S seconds (what it measured until then is kept: it writes its
record after every micro-batch, and its peak RSS every 10 s); inside it, no step or micro-batch
starts that would end past 90 % of S. ``--budget-after-first-step`` starts the budget's clock at the end
of the first step and judges the later steps by themselves (for a first step that compiles).

    python scripts/bench_presets.py --json bench_presets.json --md bench_presets.md
    python scripts/bench_presets.py --presets optimized --max-seconds-per-preset 900
    python scripts/bench_presets.py --presets debug --steps 3 --set carrier_hidden_dim=64   # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from anywhere
    sys.path.insert(0, str(ROOT))

START = time.perf_counter()  # this process's start, for --kill-after's deadline
PRESET_STEPS = {"debug": 20, "experiment": 1, "optimized": 1}
DEFAULT_PRESETS = ("debug", "experiment", "optimized")
MIB = 2**20
GIB = 2**30


class BudgetExceeded(Exception):
    """Raised from the forward pre-hook: the next micro-batch would end past the time budget."""


def code_version() -> str:
    """The commit of the code measured (``git rev-parse HEAD``, or a ``COMMIT`` file beside a
    ``git archive`` snapshot), and whether the working tree had changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        stamp = ROOT / "COMMIT"
        return stamp.read_text().strip() + " (snapshot)" if stamp.exists() else "unknown"


def preset_path(name: str) -> Path:
    """``debug`` -> ``configs/debug.yaml`` of this project; a path stays a path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return ROOT / "configs" / f"{name}.yaml"


def rss_bytes(peak: bool = False) -> int:
    """This process's resident set size now, or its peak (``VmHWM`` on Linux) with ``peak``
    (:func:`efgraph.utils.device.process_rss_mb`)."""
    from efgraph.utils.device import process_rss_mb

    return int(process_rss_mb(peak) * 2**20)


def peak_rss_bytes() -> int:
    """This process's peak RSS."""
    return rss_bytes(peak=True)


def available_bytes(device: str = "cpu") -> int:
    """Free memory of ``device``: the host's MemAvailable, or CUDA's free memory."""
    import torch

    from efgraph.utils.memory import available_memory_bytes

    return available_memory_bytes(torch.device(device))


def headroom_gib(args: argparse.Namespace) -> float:
    """``--headroom-gib``, by default 4 GiB on the CPU (the OS, the runtime, the data) and none on
    CUDA (the trainer's own plan takes the device's free memory as it is)."""
    if args.headroom_gib is not None:
        return args.headroom_gib
    return 0.0 if args.device.startswith("cuda") else 4.0


def plan_limit(args: argparse.Namespace, available: int) -> int:
    return int(args.limit_gib * GIB) if args.limit_gib else int(available - headroom_gib(args) * GIB)


def device_bytes(device: str, peak: bool) -> int | None:
    """CUDA allocated (or peak allocated) bytes; ``None`` on the CPU."""
    import torch

    if not device.startswith("cuda"):
        return None
    return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)


def estimate_at_flows(config, num_parameters: int, batch: int, micro: int, checkpointing: bool,
                      per_sample_flows: list[float]):
    """:func:`plan_memory` of the same plan with the worst-case flows per step replaced by
    ``per_sample_flows`` (measured flows at the start of each lattice step / rows): the estimator's
    own formula at the flows a forward really ran. (The deposits stay bounded by the worst-case
    number of flows, or by the flow-steps when fewer.)"""
    from efgraph.utils import memory

    with mock.patch.object(memory, "flows_per_step_bound", lambda cfg: list(per_sample_flows)):
        return memory.plan_memory(config, num_parameters, batch, micro, checkpointing)


def pin_worst_case(model) -> None:
    """The plan's worst case (as ``tests/test_memory.py`` pins it): every flow keeps its energy
    (nobody dies), moves one cell in z per step (``lattice_depth - 1`` steps) and wants to spawn at
    every step, so each sample runs :func:`~efgraph.utils.memory.flows_per_step_bound` flows.
    Saturated heads: the optimizer steps barely move them."""
    import torch

    carrier = model.carrier
    with torch.no_grad():
        carrier.displacement_head.weight[2].zero_()
        carrier.displacement_head.bias[2] = -30.0  # dz = 1 cell per step
        carrier.energy_head.weight.zero_()
        carrier.energy_head.bias.fill_(30.0)  # energy ~1: nobody dies
        carrier.spawn_head.weight[0].zero_()
        carrier.spawn_head.bias[0] = 30.0  # every flow wants to spawn


def heartbeat(path: Path, device: str, every_s: float = 10.0) -> None:
    """A daemon thread that writes this process's peak memory so far to ``path`` every ``every_s``."""
    from efgraph.data._atomic import atomic_write_text

    start = time.perf_counter()

    def beat() -> None:
        while True:
            atomic_write_text(path, json.dumps({"peak_rss_bytes": peak_rss_bytes(),
                                                "peak_device_bytes": device_bytes(device, True),
                                                "seconds": time.perf_counter() - start}))
            time.sleep(every_s)

    threading.Thread(target=beat, daemon=True, name="bench_presets heartbeat").start()


# ---- one preset (in its own process) -------------------------------------------------------------

def run_preset(name: str, args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Build the trainer for preset ``name`` and run its steps; returns (and, after every
    micro-batch, writes to ``out``) the record."""
    import torch

    torch.set_num_threads(args.threads)
    from efgraph.config import EnergyConfig
    from efgraph.core.flow_processor import FlowProcessor
    from efgraph.training.run import load_pairs, seed_everything
    from efgraph.training.schedule import warmup_cosine_scheduler
    from efgraph.training.trainer import EnergyTrainer
    from efgraph.utils import memory

    path = preset_path(name)
    rec: dict[str, Any] = {"preset": Path(name).stem if path.suffix else name, "config": str(path), "status": "starting",
                           "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    rec["rss_start_bytes"] = rss_bytes()  # after importing torch and efgraph
    if out is not None:  # the peak so far, every few seconds: a run killed inside a long micro-batch keeps it
        heartbeat(out.with_suffix(".heartbeat.json"), args.device)

    def save() -> None:
        rec["peak_rss_bytes"] = peak_rss_bytes()
        rec["peak_device_bytes"] = device_bytes(args.device, peak=True)
        if out is not None:
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec, indent=2, default=str))
            tmp.replace(out)

    overrides = ["dataset=synthetic", *args.set]
    if args.micro_batch_size:
        overrides.append(f"micro_batch_size={args.micro_batch_size}")
    config = EnergyConfig.from_yaml(path).with_overrides(overrides)
    steps = steps_for(rec["preset"], args.steps)
    batch = config.batch_size
    # only the rows the steps draw, at most the preset's (the teacher is the same whatever their number)
    config = config.replace(synthetic_pairs=max(min(batch * steps, config.synthetic_pairs), batch, 2))
    pairs = load_pairs(config, progress=False)
    rec.update(lattice=f"{config.lattice_width}x{config.lattice_height}x{config.lattice_depth}", batch=batch,
               carrier=f"{config.carrier_type} {config.carrier_hidden_dim}x{config.carrier_num_layers}",
               widths=f"{config.input_dim} -> {config.output_dim}", initial_flows=config.initial_flows_per_sample,
               max_active_flows=config.max_active_flows, max_spawn_per_step=config.max_spawn_per_step,
               steps_requested=steps, overrides=overrides)
    seed_everything(config.seed)
    model = FlowProcessor.from_config(config)
    rec["dynamics"] = args.dynamics
    if args.dynamics == "worst-case":
        pin_worst_case(model)
    n_params = sum(p.numel() for p in model.parameters())
    rec["parameters"] = n_params
    rec["rss_before_model_bytes"] = rss_bytes()  # runtime + data, before the model and its state
    rec["device"] = args.device
    rec["device_before_model_bytes"] = device_bytes(args.device, peak=False)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)
        rec["device_name"] = torch.cuda.get_device_name(args.device)

    available = available_bytes(args.device)
    limit = plan_limit(args, available)
    rec.update(available_bytes=available, limit_bytes=limit, compile=config.compile)
    with mock.patch.object(memory, "available_memory_bytes", lambda device: limit):
        trainer = EnergyTrainer(model, config, device=args.device, progress=False)
    plan = trainer.memory_plan
    assert plan is not None, "memory_check is off: no plan to compare with"
    rec["plan"] = {"activation_checkpointing": plan.activation_checkpointing, "micro_batch_size": plan.micro_batch_size,
                   "num_micro_batches": plan.num_micro_batches, "total_bytes": plan.total_bytes,
                   "activation_bytes": plan.activation_bytes, "flow_steps_per_micro_batch": plan.flow_steps,
                   "components_gib": plan.components_gib(), "describe": plan.describe()}
    # the worst case of a whole step: every micro-batch at the bound
    rec["worst_case_flow_steps_per_step"] = batch * sum(memory.flows_per_step_bound(config))
    rec["worst_case_max_flows_per_sample"] = max(memory.flows_per_step_bound(config))
    trainer.scheduler = warmup_cosine_scheduler(trainer.optimizer, config.warmup_steps, steps)

    budget = args.max_seconds_per_preset or None
    # every finished micro-batch (forward + backward; the step's last one with the optimizer step)
    micro: list[dict[str, Any]] = []
    # the budget's clock: from the first step, or (--budget-after-first-step) from its end, for runs
    # whose first step is a warm-up (compilation) that would misjudge the steps after it
    state: dict[str, Any] = {"train_start": None, "budget_start": None, "starts": [], "trace": None}

    def out_of_time(now: float, expected: float) -> str | None:
        """Why work expected to take ``expected`` s must not start now: past the budget, or past
        90 % of --kill-after since this process started (a kill would cut a step in two)."""
        if budget is not None and now - state["budget_start"] + expected > budget:
            return f"budget: {now - state['budget_start']:.0f} s + ~{expected:.0f} s > {budget:.0f} s"
        if args.kill_after and args.child and now - START + expected > 0.9 * args.kill_after:
            return f"deadline: {now - START:.0f} s + ~{expected:.0f} s > 90 % of --kill-after {args.kill_after:.0f} s"
        return None

    def micro_batch_done(now: float, step: int) -> None:
        trace = state["trace"]
        micro.append({"step": step, "seconds": now - state["starts"][-1], "rows": trace.batch_size,
                      "flow_steps": sum(trace.active), "active": list(trace.active)})

    def pre_hook(module, inputs):
        if not (module.training and torch.is_grad_enabled()):
            return
        now = time.perf_counter()
        if state["starts"]:  # the previous micro-batch of this step has ended (its backward too)
            micro_batch_done(now, len(step_rows) + 1)
            save()
            timed = [m["seconds"] for m in micro if m["step"] > 1] if args.budget_after_first_step else []
            if state["budget_start"] is not None and out_of_time(now, statistics.median(timed or [m["seconds"] for m in micro])):
                raise BudgetExceeded
        state["starts"].append(now)

    def post_hook(module, inputs, output):
        if module.training and torch.is_grad_enabled():
            state["trace"] = module.last_trace

    trainer.processor.register_forward_pre_hook(pre_hook)
    trainer.processor.register_forward_hook(post_hook)
    order = trainer.batch_order(len(pairs), 0)
    step_rows: list[dict[str, Any]] = []
    rec.update(status="running", steps=step_rows, micro_batches=micro)
    save()
    state["train_start"] = time.perf_counter()
    if not args.budget_after_first_step:
        state["budget_start"] = state["train_start"]
    stop_reason = "done"
    for s in range(steps):
        if state["budget_start"] is not None and step_rows:
            later = step_rows[1:] if args.budget_after_first_step else step_rows
            # after a warm-up first step alone, the second step runs: it is the first measure
            reason = out_of_time(time.perf_counter(), statistics.median(r["seconds"] for r in later)) if later else None
            if reason is not None:
                stop_reason = f"{reason} (before step {s + 1})"
                break
        idx = order[(s * batch) % len(pairs):][:batch]
        state["starts"] = []
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            metrics = trainer.train_step(pairs.src[idx], pairs.tgt[idx], log=False)
        except BudgetExceeded:
            stop_reason = (f"out of time: step {s + 1} stopped after {len(state['starts'])} of "
                           f"{plan.num_micro_batches} micro-batches")
            break
        now = time.perf_counter()
        seconds, cpu_seconds = now - t0, time.process_time() - cpu0
        micro_batch_done(now, s + 1)
        trace = trainer.processor.last_trace  # the step's merged trace
        step_rows.append({"step": s + 1, "seconds": seconds, "cpu_seconds": cpu_seconds, "flow_steps": sum(trace.active),
                          "micro_batches": len(state["starts"]), "loss": metrics["train/loss"],
                          "arrived": trace.total_arrived, "spawned": trace.total_spawned, "died": trace.total_died,
                          "lattice_steps": trace.num_steps})
        if state["budget_start"] is None:
            state["budget_start"] = now
        save()
    rec["stop_reason"] = stop_reason
    rec["training_seconds"] = time.perf_counter() - state["train_start"]
    rec["loadavg_end"] = os.getloadavg()
    rec["status"] = "done"
    save()
    summarise(rec)
    save()
    return rec


def summarise(rec: dict[str, Any]) -> None:
    """Times, flow-steps and memory ratios from a preset's record (also of a run killed on the way:
    what it had saved)."""
    from efgraph.config import EnergyConfig

    step_rows, micro, plan = rec.get("steps", []), rec.get("micro_batches", []), rec["plan"]
    timed = step_rows[1:] if len(step_rows) > 1 else step_rows
    rec["steps_done"] = len(step_rows)
    rec["micro_batches_done"] = len(micro)
    rec["seconds_per_step"] = statistics.median(r["seconds"] for r in timed) if timed else None
    rec["first_step_seconds"] = step_rows[0]["seconds"] if step_rows else None
    # CPU seconds of the process (all its threads): less sensitive than wall time to other processes
    # on the cores, though threads that spin while waiting for a core count too
    rec["cpu_seconds_per_step"] = statistics.median(r["cpu_seconds"] for r in timed) if timed else None
    # micro-batches after the first step's when there are more (the first carries the warm-up)
    later = [m["seconds"] for m in micro if m["step"] > 1] or [m["seconds"] for m in micro]
    rec["seconds_per_micro_batch"] = statistics.median(later) if later else None
    rec["projected"] = not step_rows and bool(micro)
    if rec["projected"]:
        rec["seconds_per_step"] = plan["num_micro_batches"] * rec["seconds_per_micro_batch"]
    rec["flow_steps_run"] = sum(m["flow_steps"] for m in micro)
    if timed:
        rec["flow_steps_per_step"] = statistics.mean(r["flow_steps"] for r in timed)
        rec["flow_steps_per_s"] = sum(r["flow_steps"] for r in timed) / sum(r["seconds"] for r in timed)
    elif micro:  # projected from the micro-batches that ran
        rec["flow_steps_per_step"] = rec["flow_steps_run"] / sum(m["rows"] for m in micro) * rec["batch"]
        rec["flow_steps_per_s"] = rec["flow_steps_run"] / sum(m["seconds"] for m in micro)
    else:
        rec["flow_steps_per_step"] = rec["flow_steps_per_s"] = None
    # the peak compared with the plan: RSS on the CPU, CUDA's peak allocated bytes on a GPU
    cuda = rec.get("peak_device_bytes") is not None
    rec["peak_kind"] = "CUDA peak allocated" if cuda else "peak RSS"
    peak = rec["peak_device_bytes"] if cuda else rec["peak_rss_bytes"]
    before = rec["device_before_model_bytes"] if cuda else rec["rss_before_model_bytes"]
    rec["peak_bytes"], rec["before_model_bytes"] = peak, before
    rec["peak_increase_bytes"] = peak - before
    rec["peak_over_estimate"] = peak / plan["total_bytes"]
    rec["increase_over_estimate"] = (peak - before) / plan["total_bytes"]
    rec["estimate_at_measured_flows_bytes"] = rec["increase_over_estimate_at_measured"] = None
    if micro:  # the busiest micro-batch: the plan's formula at the flows it ran
        busiest = max(micro, key=lambda m: m["flow_steps"])
        config = EnergyConfig.from_yaml(rec["config"]).with_overrides(rec["overrides"])
        measured = estimate_at_flows(config, rec["parameters"], rec["batch"], plan["micro_batch_size"],
                                     plan["activation_checkpointing"], [a / busiest["rows"] for a in busiest["active"]])
        rec["busiest_micro_batch"] = {k: busiest[k] for k in ("rows", "flow_steps", "active")}
        rec["max_active_per_sample"] = max(max(m["active"]) / m["rows"] for m in micro)
        rec["estimate_at_measured_flows_bytes"] = measured.total_bytes
        rec["estimate_at_measured_flows_gib"] = measured.components_gib()
        rec["increase_over_estimate_at_measured"] = (peak - before) / measured.total_bytes


# ---- driver ---------------------------------------------------------------------------------------

def steps_for(preset: str, items: list[str] | None) -> int:
    """The optimizer steps of ``preset`` from ``--steps`` items (``N`` for all, ``NAME=N`` for one),
    else :data:`PRESET_STEPS`, else 1."""
    steps = dict(PRESET_STEPS)
    default = 1
    for item in items or []:
        name, _, value = item.rpartition("=")
        if int(value) < 1:
            raise ValueError(f"--steps {item}: must be >= 1")
        if name:
            steps[name] = int(value)
        else:
            default = int(value)
            steps = {}
    return steps.get(preset, default)


def child_command(name: str, args: argparse.Namespace, out: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-out", str(out),
           "--threads", str(args.threads), "--device", args.device,
           "--max-seconds-per-preset", str(args.max_seconds_per_preset), "--dynamics", args.dynamics,
           "--kill-after", str(args.kill_after)]
    if args.budget_after_first_step:
        cmd.append("--budget-after-first-step")
    if args.limit_gib:
        cmd += ["--limit-gib", str(args.limit_gib)]
    if args.headroom_gib is not None:
        cmd += ["--headroom-gib", str(args.headroom_gib)]
    if args.steps:
        cmd += ["--steps", *args.steps]
    if args.micro_batch_size:
        cmd += ["--micro-batch-size", str(args.micro_batch_size)]
    for item in args.set:
        cmd += ["--set", item]
    return cmd


def run_isolated(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One preset in its own Python process (its own peak RSS); a killed or failed run keeps what
    it had written."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "preset.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
        status, tail = "done", ""
        try:
            proc = subprocess.run(child_command(name, args, out), capture_output=True, text=True, env=env,
                                  timeout=args.kill_after or None)
            if proc.returncode != 0:
                status, tail = f"failed (exit {proc.returncode})", proc.stderr[-3000:]
        except subprocess.TimeoutExpired:
            status = f"killed after --kill-after {args.kill_after} s"
        rec = json.loads(out.read_text()) if out.exists() else {"preset": name, "status": "no record"}
        if status != "done":
            rec["status"] = status
            rec["stderr_tail"] = tail
            print(f"  {name}: {status}\n{tail}", file=sys.stderr)
            beat = out.with_suffix(".heartbeat.json")
            if beat.exists():  # the peak until it stopped (a micro-batch may have been under way)
                last = json.loads(beat.read_text())
                rec["peak_rss_bytes"] = max(rec.get("peak_rss_bytes") or 0, last["peak_rss_bytes"])
                if last["peak_device_bytes"] is not None:
                    rec["peak_device_bytes"] = max(rec.get("peak_device_bytes") or 0, last["peak_device_bytes"])
                rec["heartbeat"] = last
            if "plan" in rec and "steps_done" not in rec:  # what it measured before it stopped
                summarise(rec)
    return rec


def fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def fmt_gib(v: float | None) -> str:
    return "-" if v is None else f"{v / GIB:.2f}"


def plan_text(rec: dict[str, Any]) -> str:
    p = rec.get("plan")
    if not p:
        return "-"
    what = "whole batch" if p["num_micro_batches"] == 1 else f"{p['num_micro_batches']} x {p['micro_batch_size']} rows"
    return what + (", checkpointing" if p["activation_checkpointing"] else "")


def table(results: list[dict[str, Any]]) -> str:
    kind = next((r["peak_kind"] for r in results if "peak_kind" in r), "peak RSS")
    lines = ["| preset | lattice, batch, flows (init / max) | plan | optimizer steps run | s / step (CPU s) | s / micro-batch "
             f"| flow-steps / step (measured / worst case) | flow-steps / s | {kind} GiB (before model) "
             "| plan's estimate GiB | peak / estimate | estimate at measured flows GiB | (peak - before) / that |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "steps_done" not in r:  # failed or killed before its summary
            lines.append(f"| {r['preset']} | {r.get('status')} |" + " - |" * 11)
            continue
        steps = f"{r['steps_done']} of {r['steps_requested']}"
        if r.get("projected"):
            steps += f" ({r['micro_batches_done']} micro-batches)"
        s_step = fmt_s(r["seconds_per_step"]) + (" (projected)" if r.get("projected") else "")
        if r.get("cpu_seconds_per_step") is not None:
            s_step += f" ({fmt_s(r['cpu_seconds_per_step'])})"
        fs = r["flow_steps_per_step"]
        measured_fs = "-" if fs is None else f"{fs:,.0f}"
        ratio2 = r.get("increase_over_estimate_at_measured")
        fps = "-" if r["flow_steps_per_s"] is None else f"{r['flow_steps_per_s']:,.0f}"
        name = r["preset"] + (" + compile" if r.get("compile") else "")
        lines.append(
            f"| {name} | {r['lattice']}, {r['batch']}, {r['initial_flows']} / {r['max_active_flows']} "
            f"| {plan_text(r)} | {steps} | {s_step} | {fmt_s(r['seconds_per_micro_batch'])} "
            f"| {measured_fs} / {r['worst_case_flow_steps_per_step']:,} "
            f"| {fps} "
            f"| {fmt_gib(r.get('peak_bytes', r.get('peak_rss_bytes')))} "
            f"({fmt_gib(r.get('before_model_bytes', r.get('rss_before_model_bytes')))}) "
            f"| {fmt_gib(r['plan']['total_bytes'])} | {r['peak_over_estimate']:.2f} "
            f"| {fmt_gib(r.get('estimate_at_measured_flows_bytes'))} | {'-' if ratio2 is None else f'{ratio2:.2f}'} |")
    return "\n".join(lines)


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    device = meta.get("device_name") or f"CPU {meta['machine']} ({meta['cpus']} cores), {meta['threads']} threads"
    head = (f"dynamics: {meta['args']['dynamics']}; {device}, torch {meta['torch']}, "
            f"memory limit for the plan {fmt_gib(meta.get('limit_bytes'))} GiB (available "
            f"{fmt_gib(meta['available_bytes'])} GiB minus {meta['headroom_gib']} GiB headroom), load average at "
            f"start {meta['loadavg_start'][0]:.2f}")
    return head + f", code {meta.get('code', 'unknown')}\n\n" + table(results)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS),
                   help="preset names (configs/NAME.yaml) or config files")
    p.add_argument("--steps", nargs="+", default=None, metavar="[NAME=]N",
                   help=f"optimizer steps: N for every preset, NAME=N for one (default: {PRESET_STEPS}, else 1)")
    p.add_argument("--max-seconds-per-preset", type=float, default=0.0,
                   help="training-time budget per preset (0: none); see the module docstring")
    p.add_argument("--budget-after-first-step", action="store_true",
                   help="the budget counts from the end of the first step and judges later steps by the steps "
                        "after it (a first step that compiles says nothing of the others)")
    p.add_argument("--kill-after", type=float, default=0.0, help="kill a preset's process after S seconds (0: never)")
    p.add_argument("--micro-batch-size", type=int, default=0,
                   help="an explicit micro-batch size (the trainer honours it; 0: the plan chooses)")
    p.add_argument("--headroom-gib", type=float, default=None,
                   help="the plan's limit is the available memory minus this (default 4 on the CPU: the OS, the "
                        "runtime, the data; 0 on CUDA)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--limit-gib", type=float, default=0.0, help="the plan's limit outright (0: available - headroom)")
    p.add_argument("--dynamics", choices=["as-initialised", "worst-case"], default="as-initialised",
                   help="the model as initialised (an untrained model's flows die or arrive early), or pinned to "
                        "the plan's worst case (nobody dies, one cell per step, spawning whenever allowed)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--in-process", action="store_true",
                   help="run the presets in this process (their peak RSS then mixes; for tests)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--md", metavar="PATH", help="write the printed table as Markdown")
    p.add_argument("--render", metavar="JSON", help="print the table of a saved --json file and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = build_parser().parse_args(argv)
    if args.child:
        run_preset(args.child, args, Path(args.child_out))
        return None
    if args.render:
        res = json.loads(Path(args.render).read_text())
        print(report(res["results"], res["meta"]))
        return res
    for name in args.presets:
        steps_for(Path(name).stem, args.steps)  # a bad --steps fails now, not in a subprocess
    import torch

    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "python": platform.python_version(), "available_bytes": available_bytes(args.device), "headroom_gib": headroom_gib(args),
            "loadavg_start": os.getloadavg(), "args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "code": code_version()}
    meta["limit_bytes"] = plan_limit(args, meta["available_bytes"])
    meta["device"] = args.device
    if args.device.startswith("cuda"):
        meta["device_name"] = torch.cuda.get_device_name(args.device)
    results = []
    for name in args.presets:
        t0 = time.perf_counter()
        rec = run_preset(name, args) if args.in_process else run_isolated(name, args)
        rec["wall_seconds"] = time.perf_counter() - t0
        results.append(rec)
        print(f"  {name}: {rec.get('status')}, {rec.get('steps_done')} step(s), "
              f"{fmt_s(rec.get('seconds_per_step'))} s/step, {rec['wall_seconds']:.0f} s wall", file=sys.stderr)
    meta["loadavg_end"] = os.getloadavg()
    text = report(results, meta)
    print(text)
    res = {"meta": meta, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    if args.md:
        Path(args.md).write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
