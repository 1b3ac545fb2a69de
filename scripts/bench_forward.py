"""Benchmark the engine's forward + backward: sparse scaling and overhead over the carrier alone.

Seven tables, chosen with ``--workload``: ``sweeps`` (the default on CPU) gives tables 1-4, each row
the median of ``--repeats`` timed forward+backward passes after warm-up:

1. *lattice*: a fixed number of flows and steps while the lattice grows from 20x20x10 to
   100x100x50. Only occupied cells cost compute, so time should stay flat.
2. *flows*: a fixed lattice (50x50x20) while flows per sample grow: time should grow ~linearly.
3. *overhead*: at each preset's lattice and flows, the engine against the carrier alone (its
   recurrent call and heads over the same flows and steps, no lattice). The ratio is what the
   lattice (cells, message passing, neuron, injection, readout, bookkeeping) costs on top.
4. *dense*: at each preset's lattice, the sparse engine against ``DenseReferenceProcessor``
   (``scripts/dense_reference.py``), which aggregates into and runs the neuron on every cell of
   the lattice each step (same weights, same outputs). The ratio is what "only occupied cells cost compute" buys. The batch
   is small (``--dense-batch``) so that the dense lattice fits in memory.

To compare like with like, every engine run is pinned to the same number of steps and flows: the
dz head is set so that all flows reach the output face in exactly ``--steps`` steps, the carrier
sets every energy to 1 (nobody dies) and spawning is off. Lateral moves stay as initialised, so flows spread and
share cells as in an untrained model.

The other workloads, one table each:

5. *prior* (``--workload prior``): the prior implementation's workload -- a 28x28x40 lattice,
   batch 4, 784 flows per sample (every input-face cell), GRU 512 x 3, 19 steps per flow
   (59,584 flow-steps) -- run three ways, interleaved repeat by repeat: the engine, the engine
   with ``activation_checkpointing: true``, and the carrier alone. Time, memory, ratios (each
   the median over rounds of the ratio within a round, so that a load that comes and goes on a
   shared machine cancels out).
6. *gpu* (``--workload gpu``; with *prior*, the default on CUDA; runs on CPU too): per preset, engine /
   carrier alone, peak memory, flow-steps per second, dispatcher ops and host syncs per lattice
   step (:class:`efgraph.utils.dispatch_count.count_ops` over one forward+backward, divided by
   the steps), and the share of the device's matmul peak that the carrier's recurrent matmuls
   reach. The peak is a large square matmul timed in the same run: bf16 on CUDA (fp32 too, in the
   JSON), fp32 on CPU. The carrier's FLOPs are counted analytically,
   ``3 x sum over layers of 2 * gates * hidden * (layer input + hidden)`` per flow-step
   (forward, plus backward at twice the forward); ``tests/test_bench_scripts.py`` checks the
   count against ``torch.utils.flop_counter.FlopCounterMode`` on CPU.
7. *compile* (``--workload compile``): per preset, the engine eager and with ``compile: true``
   (the whole step compiled, flows padded to bucket sizes) against the carrier alone, interleaved
   round by round (ratios: the median of within-round ratios), and the kernels per lattice step
   of a forward + backward counted with ``torch.profiler``
   (:func:`efgraph.utils.kernel_count.count_kernels`: compiled kernels count one each), at the
   pinned work and with an untrained model's natural dynamics (flows spawn, die and arrive, so
   the compaction and deposits run); the warm-up column is mostly the compile.

Memory, three measures (MiB in the tables):

- *saved*: the bytes of the distinct tensors autograd saves for backward during the forward
  (``saved_tensors_hooks``, parameters excluded). With ``activation_checkpointing`` this misses
  what checkpointing keeps: ``torch.utils.checkpoint`` (non-reentrant) stores a step's
  non-tensor arguments -- the ``FlowState`` with the flows' hidden states -- by Python
  reference, not through the hooks, so only the tensors saved outside the checkpointed steps
  are counted.
- *held*: what a forward leaves allocated until its backward: the graph's saved tensors, the
  checkpointed steps' inputs and the loss. On CPU, ``torch.profiler`` with ``profile_memory``
  over the forward: the bytes PyTorch's CPU allocator handed out minus those it got back
  (:func:`forward_held_bytes`); on CUDA ``memory_allocated`` after minus before. Without
  checkpointing it agrees with *saved* to within a few MiB; with it, it is the honest number.
  (Until this version the CPU figure was glibc ``mallinfo2``'s live heap after minus before: on
  the debug workload below, 20x20x10, 256 flows, GRU 256 x 3, 5 steps, it read 33.7 MiB against
  the profiler's 33.1 without checkpointing and 5.6 against 5.1 with it; the profiler counts
  tensors only and does not depend on glibc or on the allocator giving memory back at once.)
- *peak* (CUDA only): peak allocated memory over one forward+backward.

Usage::

    python scripts/bench_forward.py                       # CPU: tables 1-4 (hidden 256 x 3)
    python scripts/bench_forward.py --workload prior      # table 5 (about 4 minutes on a 2-core CPU)
    python scripts/bench_forward.py --device cuda --json bench.json   # CUDA: tables 5-6, hidden 1024 x 3
    python scripts/bench_forward.py --workload sweeps gpu prior --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from efgraph import (EnergyConfig, EnergyLattice, FlowProcessor, SimpleNeuron, create_debug_config,
                     create_experiment_config, create_optimized_config)
from efgraph.utils.dispatch_count import count_ops
from efgraph.utils.kernel_count import count_kernels, profile_compiled_kernels
from efgraph.utils.memory import saved_activation_bytes

if str(Path(__file__).resolve().parent) not in sys.path:  # the dense baseline sits next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from dense_reference import DenseReferenceProcessor  # noqa: E402

PRESETS = {"debug": create_debug_config, "experiment": create_experiment_config, "optimized": create_optimized_config}
LATTICES = [(20, 20, 10), (35, 35, 15), (50, 50, 20), (75, 75, 35), (100, 100, 50)]
WORKLOADS = ("sweeps", "prior", "gpu", "compile")
# the prior implementation's workload: lattice, batch, flows per sample, carrier, steps per flow
PRIOR = dict(shape=(28, 28, 40), batch=4, flows=784, hidden=512, layers=3, steps=19)


def dz_fraction_for_steps(depth: int, steps: int) -> float:
    """The constant jump fraction q with which a flow starting at z=0 arrives in exactly ``steps`` steps."""
    if steps > depth - 1:
        raise ValueError(f"steps: at most depth - 1 = {depth - 1}, got {steps}")

    def steps_taken(q: float) -> int:
        z, n = 0.0, 0
        while z < depth - 1:
            left = depth - 1 - z
            z = min(z + 1 + max(left - 1, 0) * q, depth - 1)
            n += 1
        return n

    lo, hi = 0.0, 1.0  # steps_taken is non-increasing in q
    for _ in range(60):
        mid = (lo + hi) / 2
        if steps_taken(mid) > steps:
            lo = mid
        else:
            hi = mid
    assert steps_taken(hi) == steps, (depth, steps, steps_taken(hi))
    return hi


def pin_dynamics(proc: FlowProcessor, steps: int) -> None:
    """Fixed steps, no deaths, no spawns (see the module docstring)."""
    q = dz_fraction_for_steps(proc.config.lattice_depth, steps)
    with torch.no_grad():
        head = proc.carrier.displacement_head
        head.weight[2].zero_()
        head.bias[2] = math.log(q / (1 - q)) if 0 < q < 1 else (30.0 if q >= 1 else -30.0)
        proc.carrier.energy_head.weight.zero_()
        proc.carrier.energy_head.bias.fill_(30.0)
        proc.carrier.spawn_head.weight[0].zero_()
        proc.carrier.spawn_head.bias[0] = -30.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_held_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run the forward ``fn()`` under ``torch.profiler`` with ``profile_memory``: its result and
    the bytes of the tensors it allocated that are still allocated when it returns (every
    allocation minus every free that PyTorch's CPU allocator reported during the call: the graph's
    saved tensors, what checkpoints keep, the output). Tensors only, whatever the malloc."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, int(sum(e.self_cpu_memory_usage for e in prof.key_averages()))


def timings(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` timed ``fn().backward()``."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn().backward()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def memory(fn: Callable[[], torch.Tensor], device: torch.device, params: list[torch.Tensor]) -> dict[str, float | None]:
    """One ``fn().backward()``: saved / held / peak MiB (see the module docstring)."""
    mib = 2**20
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with saved_activation_bytes(params) as counter:
        if device.type == "cuda":
            loss = fn()
        else:
            loss, held_bytes = forward_held_bytes(fn)
    gc.collect()
    if device.type == "cuda":
        held_bytes = torch.cuda.memory_allocated(device) - before
    held = held_bytes / mib
    loss.backward()
    del loss
    peak = torch.cuda.max_memory_allocated(device) / mib if device.type == "cuda" else None
    return {"saved_mb": counter[0] / mib, "held_mb": held, "peak_mb": peak}


def measure(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int, warmup: int,
            params: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Median / min seconds of ``fn().backward()`` and its memory (``memory_mb``: peak on CUDA,
    saved activations on CPU; ``saved_mb``, ``held_mb``, ``peak_mb`` as in :func:`memory`)."""
    timings(fn, device, warmup)
    times = timings(fn, device, repeats)
    mem = memory(fn, device, params or [])
    primary = mem["peak_mb"] if device.type == "cuda" else mem["saved_mb"]
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "memory_mb": primary, **mem}


def build(config: EnergyConfig, steps: int, device: torch.device, seed: int = 0,
          cls: type[FlowProcessor] = FlowProcessor) -> FlowProcessor:
    torch.manual_seed(seed)
    proc = cls(EnergyLattice(config), SimpleNeuron(config), config).to(device)
    pin_dynamics(proc, steps)
    return proc


def engine_fn(proc: FlowProcessor, batch: int, device: torch.device) -> Callable[[], torch.Tensor]:
    x = torch.randn(batch, proc.config.input_dim, device=device)
    target = torch.randn(batch, proc.config.output_dim, device=device)
    return lambda: torch.nn.functional.mse_loss(proc(x), target)


def carrier_fn(proc: FlowProcessor, num_flows: int, steps: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """The floor: the carrier's recurrent call and heads over the same flows and steps."""
    carrier = proc.carrier
    inputs = torch.randn(steps, num_flows, carrier.step_input_dim, device=device)
    h0 = torch.randn(carrier.num_layers, num_flows, carrier.hidden_dim, device=device).tanh()
    c0 = torch.zeros_like(h0) if carrier.is_lstm else None

    def run() -> torch.Tensor:
        h, c, loss = h0, c0, 0.0
        for s in range(steps):
            top, h, c = carrier.step(inputs[s], h, c)
            heads = carrier.heads(top)
            loss = loss + heads.dxy.sum() + heads.dz_fraction.sum() + heads.energy_logit.sum() + heads.spawn_score.sum()
        return loss + proc.output_face.value_head(top).sum()

    return run


def recurrent_flops_per_flow_step(config: EnergyConfig) -> float:
    """Matmul FLOPs of the carrier's recurrent cell for one flow-step, forward + backward.

    Forward, per layer: ``2 * gates * hidden * (layer input + hidden)`` (input and hidden
    projections; gates 3 for a GRU, 4 for an LSTM); backward about twice that (the gradients of
    the weights and of the inputs), so x3."""
    gates = 4 if config.carrier_type == "lstm" else 3
    hidden = config.carrier_hidden_dim
    step_input = config.neuron_output_dim + 1 + config.position_encoding_dim
    forward = sum(2 * gates * hidden * ((step_input if layer == 0 else hidden) + hidden)
                  for layer in range(config.carrier_num_layers))
    return 3.0 * forward


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int, iters: int = 10) -> float:
    """TFLOP/s of a square ``size`` x ``size`` matmul in ``dtype``: the device's practical peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2.0 * size**3 * iters / (time.perf_counter() - t0) / 1e12


def interleaved(fns: dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int,
                warmup: int) -> dict[str, list[float]]:
    """Time each function once per round, ``repeats`` rounds, so all see the same machine state."""
    for fn in fns.values():
        timings(fn, device, warmup)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += timings(fn, device, 1)
    return times


def prior_config(args: argparse.Namespace) -> EnergyConfig:
    w, h, d = args.prior_shape
    return create_debug_config(
        lattice_width=w, lattice_height=h, lattice_depth=d, initial_flows_per_sample=args.prior_flows,
        max_active_flows=args.prior_flows, batch_size=args.prior_batch, carrier_hidden_dim=args.prior_hidden,
        carrier_num_layers=args.prior_layers, carrier_type="gru", interaction_radius=args.radius,
    )


def run_prior(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Table 5: the engine, the engine with activation checkpointing, the carrier alone."""
    config = prior_config(args)
    steps, batch = args.prior_steps, args.prior_batch
    flows = args.prior_flows * batch
    engine = build(config, steps, device)
    checkpointed = build(config.replace(activation_checkpointing=True), steps, device)
    fns = {
        "engine": engine_fn(engine, batch, device),
        "engine + activation_checkpointing": engine_fn(checkpointed, batch, device),
        "carrier alone": carrier_fn(engine, flows, steps, device),
    }
    procs = {"engine": engine, "engine + activation_checkpointing": checkpointed, "carrier alone": engine}
    times = interleaved(fns, device, args.prior_repeats, args.prior_warmup)
    for name in ("engine", "engine + activation_checkpointing"):
        assert procs[name].last_trace.num_steps == steps, (name, procs[name].last_trace.num_steps)
    rows = []
    for name, fn in fns.items():
        mem = memory(fn, device, list(procs[name].parameters()))
        rows.append({"variant": name, "median_ms": 1e3 * statistics.median(times[name]),
                     "min_ms": 1e3 * min(times[name]), "times_ms": [1e3 * t for t in times[name]], **mem})
        print(f"  prior {name}: {rows[-1]['median_ms']:.0f} ms", file=sys.stderr)
    carrier_ms, engine_ms = rows[2]["median_ms"], rows[0]["median_ms"]
    for r in rows:
        # ratios: the median over rounds of the ratio within a round (the three runs of a round
        # share the machine's load; on a shared CPU the load moves between rounds)
        paired = {ref: statistics.median(t / u for t, u in zip(r["times_ms"], rows[k]["times_ms"]))
                  for ref, k in (("carrier", 2), ("engine", 0))}
        r.update(vs_carrier=paired["carrier"], vs_engine=paired["engine"],
                 vs_carrier_of_medians=r["median_ms"] / carrier_ms, vs_engine_of_medians=r["median_ms"] / engine_ms,
                 lattice="x".join(map(str, args.prior_shape)), batch=batch, flows=flows, steps=steps,
                 flow_steps=flows * steps, carrier=f"gru {args.prior_hidden}x{args.prior_layers}",
                 # what checkpointing must keep at least: every step's input hidden states, fp32
                 hidden_states_mb=steps * args.prior_layers * flows * args.prior_hidden * 4 / 2**20)
    return rows


def run_gpu(args: argparse.Namespace, device: torch.device, base: dict) -> tuple[list[dict], dict]:
    """Table 6: per preset, engine / carrier, memory, flow-steps/s, ops and syncs per step, and
    the carrier's matmul throughput against the device's measured peak."""
    size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    peaks = {"fp32": matmul_peak_tflops(device, torch.float32, size)}
    if device.type == "cuda":
        peaks["bf16"] = matmul_peak_tflops(device, torch.bfloat16, size)
    peak_dtype = "bf16" if device.type == "cuda" else "fp32"
    peak_meta = {"matmul_peak_tflops": peaks, "peak_dtype": peak_dtype, "peak_size": size}
    print(f"  matmul peak ({size}^2): " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peaks.items()), file=sys.stderr)
    rows = []
    for name in args.gpu_presets:
        preset = PRESETS[name]()
        config = preset.replace(**base)
        batch = args.gpu_batch or preset.batch_size
        flows = preset.initial_flows_per_sample * batch
        proc = build(config, args.steps, device)
        engine, floor = engine_fn(proc, batch, device), carrier_fn(proc, flows, args.steps, device)
        times = interleaved({"engine": engine, "carrier": floor}, device, args.repeats, args.warmup)
        params = list(proc.parameters())
        e_mem, c_mem = memory(engine, device, params), memory(floor, device, params)
        with count_ops(cpu_is_device=device.type == "cpu") as counter:
            engine().backward()
        steps = proc.last_trace.num_steps
        assert steps == args.steps, (name, steps)
        e_s, c_s = statistics.median(times["engine"]), statistics.median(times["carrier"])
        flops = recurrent_flops_per_flow_step(config) * flows * steps
        rows.append({
            "preset": name, "lattice": f"{config.lattice_width}x{config.lattice_height}x{config.lattice_depth}",
            "batch": batch, "flows": flows, "steps": steps,
            "carrier": f"{config.carrier_type} {config.carrier_hidden_dim}x{config.carrier_num_layers}",
            "engine_ms": 1e3 * e_s, "carrier_ms": 1e3 * c_s, "ratio": e_s / c_s,
            "engine_memory": e_mem, "carrier_memory": c_mem,
            "flow_steps_per_s": flows * steps / e_s,
            "ops_per_step": counter.count.ops / steps, "syncs_per_step": counter.count.syncs / steps,
            "sync_ops": dict(counter.count.sync_names),
            "carrier_flops": flops, "carrier_tflops": flops / c_s / 1e12, "engine_carrier_tflops": flops / e_s / 1e12,
            "carrier_peak_share": {k: flops / c_s / 1e12 / v for k, v in peaks.items()},
            "engine_peak_share": {k: flops / e_s / 1e12 / v for k, v in peaks.items()},
        })
        print(f"  gpu {name}: {1e3 * e_s:.1f} / {1e3 * c_s:.1f} ms, {counter.count.syncs / steps:.1f} syncs/step",
              file=sys.stderr)
    return rows, peak_meta


def natural_engine(config: EnergyConfig, batch: int, device: torch.device, seed: int = 0) -> FlowProcessor:
    """An untrained model left to its own dynamics, spawning: flows spawn, die and arrive at
    different steps, so the step's compaction and deposits run (the pinned runs skip them)."""
    torch.manual_seed(seed)
    proc = FlowProcessor.from_config(config).to(device)
    with torch.no_grad():
        proc.carrier.spawn_head.bias[0] = 2.0
    return proc


def run_compile(args: argparse.Namespace, device: torch.device, base: dict) -> list[dict]:
    """Table 7: per preset, the engine eager and with ``compile: true`` (the whole step, flows
    padded to buckets) against the carrier alone, interleaved round by round; and the kernels per
    lattice step, forward + backward (:func:`efgraph.utils.kernel_count.count_kernels`), at the
    pinned work and with natural (spawning, dying) dynamics."""
    rows = []
    for name in args.compile_presets:
        preset = PRESETS[name]()
        batch = preset.batch_size
        flows = preset.initial_flows_per_sample * batch
        row: dict = {"preset": name, "lattice": f"{preset.lattice_width}x{preset.lattice_height}x{preset.lattice_depth}",
                     "flows": flows, "batch": batch, "carrier": f"{args.carrier} {args.hidden}x{args.layers}"}
        procs = {mode: build(preset.replace(**base, compile=mode == "compiled"), args.steps, device)
                 for mode in ("eager", "compiled")}
        procs["compiled"].load_state_dict(procs["eager"].state_dict())
        fns = {mode: engine_fn(proc, batch, device) for mode, proc in procs.items()}
        fns["carrier"] = carrier_fn(procs["eager"], flows, args.steps, device)
        t0 = time.perf_counter()
        with profile_compiled_kernels():  # compile here, with Inductor's kernels visible to the profiler
            for fn in fns.values():
                timings(fn, device, args.warmup)
        row["warmup_s"] = time.perf_counter() - t0
        times = interleaved(fns, device, args.rounds, 0)
        for mode in ("eager", "compiled"):
            assert procs[mode].last_trace.num_steps == args.steps, (name, mode)
            row[f"{mode}_ms"] = 1e3 * statistics.median(times[mode])
            row[f"{mode}_ratio"] = statistics.median(e / c for e, c in zip(times[mode], times["carrier"]))
            count = count_kernels(lambda fn=fns[mode]: fn().backward(), device)
            row[f"{mode}_kernels_per_step"] = count.kernels / args.steps
            row[f"{mode}_ops_per_step"] = count.ops / args.steps
        row["carrier_ms"] = 1e3 * statistics.median(times["carrier"])
        # natural dynamics: kernels per step where flows spawn, die and arrive (compaction runs)
        natural = {mode: natural_engine(preset.replace(**base, compile=mode == "compiled"), batch, device)
                   for mode in ("eager", "compiled")}
        natural["compiled"].load_state_dict(natural["eager"].state_dict())
        for mode, proc in natural.items():
            fn = engine_fn(proc, batch, device)
            with profile_compiled_kernels():
                for _ in range(2):
                    fn().backward()
            count = count_kernels(lambda fn=fn: fn().backward(), device)
            trace = proc.last_trace
            row[f"natural_{mode}_kernels_per_step"] = count.kernels / trace.num_steps
            row["natural_steps"], row["natural_spawned"], row["natural_died"] = (
                trace.num_steps, trace.total_spawned, trace.total_died)
        rows.append(row)
        print(f"  compile {name}: eager {row['eager_ms']:.1f} ms ({row['eager_kernels_per_step']:.0f} kernels/step), "
              f"compiled {row['compiled_ms']:.1f} ms ({row['compiled_kernels_per_step']:.0f}), "
              f"carrier {row['carrier_ms']:.1f} ms", file=sys.stderr)
    return rows


def run_sweeps(args: argparse.Namespace, device: torch.device, base: dict, results: dict) -> None:
    """Tables 1-4."""
    for w, h, d in LATTICES[: args.max_lattices]:
        config = create_debug_config(lattice_width=w, lattice_height=h, lattice_depth=d,
                                     initial_flows_per_sample=args.flows, max_active_flows=max(args.flows, 100), **base)
        proc = build(config, args.steps, device)
        row = measure(engine_fn(proc, args.batch, device), device, args.repeats, args.warmup, list(proc.parameters()))
        assert proc.last_trace.num_steps == args.steps
        results["lattice"].append({"lattice": f"{w}x{h}x{d}", "cells": w * h * d,
                                   "flows": args.flows * args.batch, **row})
        print(f"  lattice {w}x{h}x{d}: {row['median_ms']:.1f} ms", file=sys.stderr)

    for k in args.flow_sweep:
        config = create_experiment_config(initial_flows_per_sample=k, max_active_flows=max(k, 500), **base)
        proc = build(config, args.steps, device)
        row = measure(engine_fn(proc, args.batch, device), device, args.repeats, args.warmup, list(proc.parameters()))
        results["flows"].append({"lattice": "50x50x20", "flows": k * args.batch, **row})
        print(f"  flows {k * args.batch}: {row['median_ms']:.1f} ms", file=sys.stderr)

    for name in args.presets:
        preset = PRESETS[name]()
        config = preset.replace(**base)
        batch = preset.batch_size
        flows = preset.initial_flows_per_sample * batch
        proc = build(config, args.steps, device)
        # interleave engine and carrier repeats so both see the same machine state
        engine, floor = engine_fn(proc, batch, device), carrier_fn(proc, flows, args.steps, device)
        e_rows, c_rows = [], []
        for _ in range(args.rounds):
            e_rows.append(measure(engine, device, args.repeats, args.warmup, list(proc.parameters())))
            c_rows.append(measure(floor, device, args.repeats, args.warmup, list(proc.parameters())))
        e_ms = statistics.median(r["median_ms"] for r in e_rows)
        c_ms = statistics.median(r["median_ms"] for r in c_rows)
        results["overhead"].append({
            "preset": name, "lattice": f"{config.lattice_width}x{config.lattice_height}x{config.lattice_depth}",
            "flows": flows, "engine_ms": e_ms, "carrier_ms": c_ms, "ratio": e_ms / c_ms,
            "engine_memory_mb": e_rows[-1]["memory_mb"], "carrier_memory_mb": c_rows[-1]["memory_mb"],
        })
        print(f"  overhead {name}: {e_ms:.1f} / {c_ms:.1f} ms", file=sys.stderr)

    for name in args.dense_presets:
        config = PRESETS[name]().replace(**base)
        batch = args.dense_batch
        sparse, dense = build(config, args.steps, device), build(config, args.steps, device, cls=DenseReferenceProcessor)
        s_row = measure(engine_fn(sparse, batch, device), device, args.dense_repeats, 1, list(sparse.parameters()))
        d_row = measure(engine_fn(dense, batch, device), device, args.dense_repeats, 1, list(dense.parameters()))
        results["dense"].append({
            "preset": name, "lattice": f"{config.lattice_width}x{config.lattice_height}x{config.lattice_depth}",
            "batch": batch, "flows": config.initial_flows_per_sample * batch, "sparse_ms": s_row["median_ms"],
            "dense_ms": d_row["median_ms"], "speedup": d_row["median_ms"] / s_row["median_ms"],
            "sparse_memory_mb": s_row["memory_mb"], "dense_memory_mb": d_row["memory_mb"],
        })
        print(f"  dense {name}: {d_row['median_ms']:.1f} / {s_row['median_ms']:.1f} ms", file=sys.stderr)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    base = dict(carrier_hidden_dim=args.hidden, carrier_num_layers=args.layers, carrier_type=args.carrier,
                interaction_radius=args.radius)
    results: dict[str, list[dict]] = {"lattice": [], "flows": [], "overhead": [], "dense": [], "prior": [], "gpu": [],
                                      "compile": []}
    meta = {
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(), "machine": platform.machine(), "args": vars(args),
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    if "gpu" in args.workload:
        results["gpu"], peak_meta = run_gpu(args, device, base)
        meta.update(peak_meta)
    if "prior" in args.workload:
        results["prior"] = run_prior(args, device)
    if "compile" in args.workload:
        results["compile"] = run_compile(args, device, base)
    if "sweeps" in args.workload:
        run_sweeps(args, device, base, results)
    return {"meta": meta, **results}


def print_tables(res: dict) -> None:
    m = res["meta"]
    line = f"device {m['device']} ({m.get('gpu', m['machine'])}), torch {m['torch']}, threads {m['cpu_threads']}"
    if any(res[k] for k in ("lattice", "flows", "overhead", "dense", "gpu")):  # table 5 prints its own settings
        line += (f", carrier {m['args']['carrier']} {m['args']['hidden']}x{m['args']['layers']}, "
                 f"steps {m['args']['steps']}, median of {m['args']['repeats']}")
    print(line)
    mem = "peak MiB" if m["device"].startswith("cuda") else "activation MiB"
    if res["lattice"]:
        print(f"\n| lattice | cells | flows | fwd+bwd ms | {mem} |\n|---|---:|---:|---:|---:|")
        for r in res["lattice"]:
            print(f"| {r['lattice']} | {r['cells']:,} | {r['flows']} | {r['median_ms']:.1f} | {r['memory_mb']:.1f} |")
        first, last = res["lattice"][0]["median_ms"], res["lattice"][-1]["median_ms"]
        print(f"\ntime {res['lattice'][-1]['lattice']} / {res['lattice'][0]['lattice']}: {last / first:.2f}x")
    if res["flows"]:
        print(f"\n| lattice | flows | fwd+bwd ms | ms per 100 flows | {mem} |\n|---|---:|---:|---:|---:|")
        for r in res["flows"]:
            print(f"| {r['lattice']} | {r['flows']} | {r['median_ms']:.1f} | {100 * r['median_ms'] / r['flows']:.2f} "
                  f"| {r['memory_mb']:.1f} |")
    if res["overhead"]:
        print("\n| preset | lattice | flows | engine ms | carrier-alone ms | engine / carrier |\n|---|---|---:|---:|---:|---:|")
        for r in res["overhead"]:
            print(f"| {r['preset']} | {r['lattice']} | {r['flows']} | {r['engine_ms']:.1f} | {r['carrier_ms']:.1f} "
                  f"| {r['ratio']:.2f} |")
    if res["dense"]:
        print(f"\n| preset | lattice | batch | flows | sparse ms | dense ms | dense / sparse | sparse {mem} | dense {mem} |"
              "\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in res["dense"]:
            print(f"| {r['preset']} | {r['lattice']} | {r['batch']} | {r['flows']} | {r['sparse_ms']:.1f} "
                  f"| {r['dense_ms']:.1f} | {r['speedup']:.1f} | {r['sparse_memory_mb']:.1f} | {r['dense_memory_mb']:.1f} |")
    if res["prior"]:
        r0 = res["prior"][0]
        cuda = m["device"].startswith("cuda")
        print(f"\nprior workload: lattice {r0['lattice']}, batch {r0['batch']}, {r0['flows']} flows, {r0['carrier']}, "
              f"{r0['steps']} steps per flow ({r0['flow_steps']:,} flow-steps), median of {len(r0['times_ms'])}; "
              f"the hidden states of all steps: {r0['hidden_states_mb']:.0f} MiB")
        print("\n| run | median ms | min ms | / carrier | / engine | saved MiB | held MiB |"
              + (" peak MiB |" if cuda else "") + "\n|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""))
        for r in res["prior"]:
            print(f"| {r['variant']} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['vs_carrier']:.2f} | {r['vs_engine']:.2f} "
                  f"| {_mb(r['saved_mb'])} | {_mb(r['held_mb'])} |" + (f" {_mb(r['peak_mb'])} |" if cuda else ""))
    if res["gpu"]:
        dtype = m["peak_dtype"]
        peak = m["matmul_peak_tflops"][dtype]
        mem = "peak MiB" if m["device"].startswith("cuda") else "held MiB"
        key = "peak_mb" if m["device"].startswith("cuda") else "held_mb"
        print(f"\nmeasured {dtype} matmul peak ({m['peak_size']}^2): {peak:.2f} TFLOP/s")
        print(f"\n| preset | lattice | flows | steps | engine ms | carrier ms | engine / carrier | engine {mem} "
              f"| carrier {mem} | flow-steps/s | ops / step | syncs / step | carrier TFLOP/s | carrier % of {dtype} peak "
              f"| in engine % |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in res["gpu"]:
            print(f"| {r['preset']} | {r['lattice']} | {r['flows']} | {r['steps']} | {r['engine_ms']:.1f} "
                  f"| {r['carrier_ms']:.1f} | {r['ratio']:.2f} | {_mb(r['engine_memory'][key])} "
                  f"| {_mb(r['carrier_memory'][key])} | {r['flow_steps_per_s']:,.0f} | {r['ops_per_step']:.0f} "
                  f"| {r['syncs_per_step']:.1f} | {r['carrier_tflops']:.3g} | {100 * r['carrier_peak_share'][dtype]:.1f} "
                  f"| {100 * r['engine_peak_share'][dtype]:.1f} |")
    if res["compile"]:
        print("\n| preset | lattice | flows | carrier | eager ms | compiled ms | carrier ms | eager / carrier "
              "| compiled / carrier | kernels / step eager | compiled | natural dynamics: eager | compiled | warm-up s |"
              "\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in res["compile"]:
            print(f"| {r['preset']} | {r['lattice']} | {r['flows']} | {r['carrier']} | {r['eager_ms']:.1f} "
                  f"| {r['compiled_ms']:.1f} | {r['carrier_ms']:.1f} | {r['eager_ratio']:.2f} | {r['compiled_ratio']:.2f} "
                  f"| {r['eager_kernels_per_step']:.0f} | {r['compiled_kernels_per_step']:.0f} "
                  f"| {r['natural_eager_kernels_per_step']:.0f} | {r['natural_compiled_kernels_per_step']:.0f} "
                  f"| {r['warmup_s']:.0f} |")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workload", nargs="+", choices=WORKLOADS, default=None,
                   help="tables to run: sweeps (1-4), prior (5), gpu (6); default sweeps on CPU, gpu prior on CUDA")
    p.add_argument("--hidden", type=int, default=None,
                   help="carrier hidden size (default 1024, the design's, on CUDA; 256 on CPU)")
    p.add_argument("--layers", type=int, default=3, help="carrier layers")
    p.add_argument("--carrier", choices=["gru", "lstm"], default="gru")
    p.add_argument("--radius", type=int, default=1,
                   help="interaction_radius of the engine (0 = a cell hears only its own flows)")
    p.add_argument("--steps", type=int, default=5, help="steps every flow takes to the output face (<= 9)")
    p.add_argument("--flows", type=int, default=16, help="flows per sample for the lattice sweep")
    p.add_argument("--batch", type=int, default=16, help="batch size for the lattice and flow sweeps")
    p.add_argument("--flow-sweep", type=int, nargs="*", default=[4, 8, 16, 32, 64], help="flows per sample")
    p.add_argument("--presets", nargs="*", default=["debug", "experiment", "optimized"], choices=list(PRESETS))
    p.add_argument("--dense-presets", nargs="*", default=["debug", "experiment", "optimized"], choices=list(PRESETS))
    p.add_argument("--dense-batch", type=int, default=2, help="batch for the dense comparison (memory grows with B*W*H*D)")
    p.add_argument("--dense-repeats", type=int, default=3)
    p.add_argument("--max-lattices", type=int, default=len(LATTICES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved engine/carrier rounds for the overhead table")
    g = p.add_argument_group("table 5 (prior workload)")
    g.add_argument("--prior-shape", type=int, nargs=3, default=list(PRIOR["shape"]), metavar=("W", "H", "D"))
    g.add_argument("--prior-batch", type=int, default=PRIOR["batch"])
    g.add_argument("--prior-flows", type=int, default=PRIOR["flows"], help="flows per sample")
    g.add_argument("--prior-hidden", type=int, default=PRIOR["hidden"])
    g.add_argument("--prior-layers", type=int, default=PRIOR["layers"])
    g.add_argument("--prior-steps", type=int, default=PRIOR["steps"])
    g.add_argument("--prior-repeats", type=int, default=3)
    g.add_argument("--prior-warmup", type=int, default=1)
    g = p.add_argument_group("table 7 (compile)")
    g.add_argument("--compile-presets", nargs="*", default=["debug", "experiment", "optimized"], choices=list(PRESETS))
    g = p.add_argument_group("table 6 (gpu)")
    g.add_argument("--gpu-presets", nargs="*", default=["debug", "experiment", "optimized"], choices=list(PRESETS))
    g.add_argument("--gpu-batch", type=int, default=0, help="batch (0: the preset's)")
    g.add_argument("--peak-size", type=int, default=0, help="matmul size for the peak (0: 8192 on CUDA, 2048 on CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if args.workload is None:
        args.workload = ["gpu", "prior"] if cuda else ["sweeps"]
    if args.hidden is None:
        args.hidden = 1024 if cuda else 256
    res = run(args)
    print_tables(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
