"""Benchmark the engine's forward + backward: sparse scaling and overhead over the carrier alone.

Three tables, each row the median of ``--repeats`` timed forward+backward passes after warm-up:

1. *lattice*: a fixed number of flows and steps while the lattice grows from 20x20x10 to
   100x100x50. Only occupied cells cost compute, so time should stay flat.
2. *flows*: a fixed lattice (50x50x20) while flows per sample grow: time should grow ~linearly.
3. *overhead*: at each preset's lattice and flows, the engine against the carrier alone (its
   recurrent call and heads over the same flows and steps, no lattice). The ratio is what the
   lattice (cells, message passing, neuron, injection, readout, bookkeeping) costs on top.
4. *dense*: at each preset's lattice, the sparse engine against :class:`DenseReferenceProcessor`,
   which aggregates into and runs the neuron on every cell of the lattice each step (same
   weights, same outputs). The ratio is what "only occupied cells cost compute" buys. The batch
   is small (``--dense-batch``) so that the dense lattice fits in memory.

To compare like with like, every engine run is pinned to the same number of steps and flows: the
dz head is set so that all flows reach the output face in exactly ``--steps`` steps, the carrier
sets every energy to 1 (nobody dies) and spawning is off. Lateral moves stay as initialised, so flows spread and
share cells as in an untrained model.

Memory: on CUDA the peak allocated memory; on CPU the bytes of the distinct tensors the autograd
graph saves for backward (``saved_tensors_hooks``, parameters excluded): the activation memory
that grows with a forward's size.

Usage::

    python scripts/bench_forward.py                       # CPU defaults (hidden 256 x 3)
    python scripts/bench_forward.py --hidden 1024 --device cuda --json bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from typing import Callable

import torch

from efgraph import (EnergyConfig, EnergyLattice, FlowProcessor, SimpleNeuron, create_debug_config,
                     create_experiment_config, create_optimized_config)
from efgraph.core.dense_reference import DenseReferenceProcessor
from efgraph.utils.memory import saved_activation_bytes

PRESETS = {"debug": create_debug_config, "experiment": create_experiment_config, "optimized": create_optimized_config}
LATTICES = [(20, 20, 10), (35, 35, 15), (50, 50, 20), (75, 75, 35), (100, 100, 50)]


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


def measure(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int, warmup: int,
            params: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Median / min seconds of ``fn().backward()`` and its memory."""
    for _ in range(warmup):
        fn().backward()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn().backward()
        sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn().backward()
        mem = torch.cuda.max_memory_allocated(device)
    else:
        with saved_activation_bytes(params or []) as counter:
            loss = fn()
        loss.backward()
        mem = counter[0]
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "memory_mb": mem / 2**20}


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
        return loss + carrier.value(top).sum()

    return run


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    base = dict(carrier_hidden_dim=args.hidden, carrier_num_layers=args.layers, carrier_type=args.carrier,
                interaction_radius=args.radius)
    results: dict[str, list[dict]] = {"lattice": [], "flows": [], "overhead": [], "dense": []}
    meta = {
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(), "machine": platform.machine(), "args": vars(args),
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)

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
    return {"meta": meta, **results}


def print_tables(res: dict) -> None:
    m = res["meta"]
    print(f"device {m['device']} ({m.get('gpu', m['machine'])}), torch {m['torch']}, threads {m['cpu_threads']}, "
          f"carrier {m['args']['carrier']} {m['args']['hidden']}x{m['args']['layers']}, steps {m['args']['steps']}, "
          f"median of {m['args']['repeats']}")
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=256, help="carrier hidden size (1024 is the design's; 256 fits a CPU)")
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
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    res = run(args)
    print_tables(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
