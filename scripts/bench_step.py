"""A training step of the lattice against the equal-size Transformer and MLP, side by side (issue 36).

For each shipped config, on random inputs of its widths and its batch size, one thread: the median
wall time of a training step (forward, loss, backward, gradient clipping, AdamW) of the lattice,
of the project's ``TokenTransformer`` and of the MLP sized to the lattice's parameter count (as the
run pipeline sizes its baselines), measured in one process, the models taking turns step by step; the ratio
lattice / Transformer; and for the lattice's step the share of its CPU time spent in matrix
products (torch profiler, self time of ``mm``/``addmm``/``bmm``/``baddbmm`` and the recurrent cell's
fused kernels), the kernels it launches (:func:`~efgraph.utils.kernel_count.count_kernels`) and its
host syncs (:class:`~efgraph.utils.dispatch_count.count_ops`).

    python scripts/bench_step.py [--configs routing composition bible] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from efgraph import EnergyConfig, FlowProcessor  # noqa: E402
from efgraph.training.baselines import (TokenTransformer, _MLP, mlp_hidden_for_params,  # noqa: E402
                                        transformer_width_for_params)
from efgraph.training.metrics import embedding_loss  # noqa: E402
from efgraph.training.optim import adamw  # noqa: E402
from efgraph.utils.dispatch_count import count_ops  # noqa: E402
from efgraph.utils.kernel_count import count_kernels  # noqa: E402

# ATen ops that are matrix products (their self time is the product itself)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_thnn_fused_gru_cell",
              "aten::_thnn_fused_lstm_cell", "aten::mkldnn_rnn", "aten::_mkldnn_rnn", "aten::matmul")


def peers(config: EnergyConfig, params: int) -> dict[str, nn.Module]:
    """The Transformer and the MLP the run pipeline would train beside a lattice of ``params``."""
    d_in, d_out = config.input_dim, config.output_dim
    width = config.transformer_width or transformer_width_for_params(
        d_in, d_out, params, tokens=config.transformer_tokens, layers=config.transformer_layers,
        heads=config.transformer_heads)
    return {
        "transformer": TokenTransformer(d_in, d_out, tokens=config.transformer_tokens, width=width,
                                        layers=config.transformer_layers, heads=config.transformer_heads,
                                        residual=config.residual),
        "mlp": _MLP(d_in, mlp_hidden_for_params(d_in, d_out, params), d_out, config.residual),
    }


def training_step(model: nn.Module, config: EnergyConfig, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One step of ``model`` on ``(x, y)`` with the config's optimizer, loss and clipping."""
    optimizer = adamw(model, config.learning_rate, config.weight_decay, config.weight_decay_on)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = embedding_loss(model(x), y, config.mse_weight, config.cosine_weight)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

    return step


def median_ms(steps_of: dict[str, Callable[[], None]], steps: int, warmup: int) -> dict[str, float]:
    """Median ms of each model's step, the models taking turns step by step (a machine that slows
    down or speeds up during the run weighs on every model alike)."""
    times: dict[str, list[float]] = {label: [] for label in steps_of}
    for index in range(warmup + steps):
        for label, step in steps_of.items():
            began = time.perf_counter()
            step()
            if index >= warmup:
                times[label].append(time.perf_counter() - began)
    return {label: 1e3 * statistics.median(t) for label, t in times.items()}


def matmul_share(step: Callable[[], None]) -> float:
    """Fraction of one step's CPU self time spent in matrix products."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    return products / total if total else 0.0


def bench_config(name: str, steps: int, warmup: int) -> dict[str, float | str | int]:
    config = EnergyConfig.from_yaml(ROOT / "configs" / f"{name}.yaml")
    torch.manual_seed(0)
    x, y = torch.randn(config.batch_size, config.input_dim), torch.randn(config.batch_size, config.output_dim)
    lattice = FlowProcessor.from_config(config)
    params = sum(p.numel() for p in lattice.parameters())
    row: dict[str, float | str | int] = {"config": name, "batch": config.batch_size, "parameters": params}
    models = {"lattice": lattice, **peers(config, params)}
    steps_of = {label: training_step(model, config, x, y) for label, model in models.items()}
    for label, ms in median_ms(steps_of, steps, warmup).items():
        row[f"{label}_parameters"] = sum(p.numel() for p in models[label].parameters())
        row[f"{label}_ms"] = ms
    step = steps_of["lattice"]
    row["ratio_transformer"] = row["lattice_ms"] / row["transformer_ms"]
    row["lattice_matmul_share"] = matmul_share(step)
    row["lattice_kernels"] = count_kernels(step, torch.device("cpu")).kernels
    with count_ops() as counted:
        lattice(x)
    row["lattice_steps"] = lattice.last_trace.num_steps
    row["lattice_syncs_per_step"] = counted.count.syncs / max(lattice.last_trace.num_steps, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["routing", "composition", "bible"],
                        help="shipped configs (configs/NAME.yaml)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [bench_config(name, args.steps, args.warmup) for name in args.configs]
    print("| config | parameters | lattice ms | Transformer ms | MLP ms | lattice / Transformer | matmul share "
          "| kernels / training step | lattice steps | syncs / lattice step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['parameters']:,} | {r['lattice_ms']:.1f} | {r['transformer_ms']:.1f} | "
              f"{r['mlp_ms']:.1f} | {r['ratio_transformer']:.2f}x | {r['lattice_matmul_share']:.0%} | "
              f"{r['lattice_kernels']} | {r['lattice_steps']} | {r['lattice_syncs_per_step']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
