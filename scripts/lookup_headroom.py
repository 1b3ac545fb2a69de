"""Headroom on the compositional table lookup (issue 34): can a model's depth extrapolate?

Trains, on :func:`efgraph.data.lookup.lookup_benchmark` (chains of 1-5 lookups in training, 2-5 in
validation on held-back chains, 6-10 in test), ridge and an MLP on the fixed-width vector encoding
and the sequence peers (:mod:`efgraph.training.sequence_peers`) on the token encoding, each learned
model sized to ``--params`` and trained ``--steps`` steps by the baselines' loop, and prints: the
validation answer accuracy, the test answer accuracy at each length 6-10 (and the means over 6-8
and 9-10), the test cosine and the training seconds, mean +- std over ``--seeds`` (model seeds;
the data are fixed by ``--data-seed``). The ceiling (the generator's function) scores 1; chance
is ``1 / 8``. Validation holds training lengths only, so choosing on it (e.g. the position code)
cannot see extrapolation.

Measured (``--params 100000 --steps 2500 --seeds 0 1 2``, batch 128, lr 3e-3, one thread, mean test
answer accuracy over lengths 6-8 / 9-10; the learned models in the shared training loop, issue
35): ridge 0.122 / 0.137, MLP 0.124 / 0.131, Transformers (3 blocks, width 64) sinusoidal 0.139 /
0.132, rotary 0.138 / 0.138, no code + causal 0.143 / 0.141 (validation 0.20-0.22: they do not
learn even the training lengths at this budget), the GRU 1.000 / 1.000 (validation 1.000). The
looped rotary block (seed 0 only, the former loop) 0.150 / 0.149.

Examples::

    OMP_NUM_THREADS=1 python scripts/lookup_headroom.py --params 100000 --steps 2500 --seeds 0 1 2 --json lookup.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from efgraph.data.lookup import lookup_benchmark, lookup_oracle
from efgraph.training.baselines import MLPBaseline, RidgeBaseline
from efgraph.training.metrics import answer_accuracy, evaluate_predictions
from efgraph.training.sequence_peers import GRUBaseline, SequenceTransformerBaseline

#: name -> (encoding, constructor keyword arguments); "vector" models get (vec), "tokens" (seq, mask).
MODELS = {
    "ridge": ("vector", {}),
    "mlp": ("vector", {}),
    "transformer-sinusoidal-mean": ("tokens", dict(position="sinusoidal", pool="mean")),
    "transformer-rotary-first": ("tokens", dict(position="rotary", pool="first")),
    "transformer-none-causal-last": ("tokens", dict(position="none", causal=True, pool="last")),
    "transformer-rotary-first-looped": ("tokens", dict(position="rotary", pool="first", shared=True)),
    "gru": ("tokens", {}),
}
DEFAULT_MODELS = [m for m in MODELS if m != "transformer-rotary-first-looped"]  # the looped one is ~4x slower


def build(name: str, args: argparse.Namespace, seed: int):
    if name == "ridge":
        return RidgeBaseline()
    training = dict(target_params=args.params, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed,
                    warmup_steps=args.warmup, grad_clip=1.0, eval_every=args.eval_every)
    if name == "mlp":
        return MLPBaseline(**training)
    if name == "gru":
        return GRUBaseline(**training)
    return SequenceTransformerBaseline(layers=args.layers, heads=args.heads, **MODELS[name][1], **training)


def score(predict, bench, encoding: str) -> dict[str, float]:
    """Validation accuracy, test accuracy per length (and means), test cosine."""
    def inputs(split):
        return split.vec if encoding == "vector" else (split.seq, split.mask)
    val, test = bench.validation, bench.test
    row = {"val_accuracy": answer_accuracy(predict(inputs(val)), val.tgt, bench.answers)}
    pred = predict(inputs(test))
    for length in sorted(set(test.lengths.tolist())):
        at = test.lengths == length
        row[f"test_accuracy_L{length}"] = answer_accuracy(pred[at], test.tgt[at], bench.answers)
    for lo, hi in ((6, 8), (9, 10)):
        keys = [f"test_accuracy_L{n}" for n in range(lo, hi + 1) if f"test_accuracy_L{n}" in row]
        if keys:
            row[f"test_accuracy_{lo}-{hi}"] = sum(row[k] for k in keys) / len(keys)
    row["test_cosine"] = evaluate_predictions(pred, test.tgt)["cosine"]
    return row


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    bench = lookup_benchmark(seed=args.data_seed, d=args.d, max_train_length=args.max_train_length,
                             test_chains=args.test_chains)
    train = bench.train
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
                     "data": {name: len(split) for name, split in bench.splits().items()}, "runs": {}}
    oracle = score(lambda s: lookup_oracle(bench, *s), bench, "tokens")
    results["runs"]["ceiling (oracle)"] = [{**oracle, "train_seconds": 0.0}]
    for name in args.models:
        encoding = MODELS[name][0]
        for seed in args.seeds:
            model = build(name, args, seed)
            began = time.perf_counter()
            if encoding == "vector":
                model.fit(train.vec, train.tgt, bench.validation.vec, bench.validation.tgt)
            else:
                model.fit((train.seq, train.mask), train.tgt, (bench.validation.seq, bench.validation.mask),
                          bench.validation.tgt)
            row = {**score(model.predict, bench, encoding), "train_seconds": time.perf_counter() - began,
                   "seed": seed, "num_parameters": model.num_parameters,
                   "shape": model.shape() if hasattr(model, "shape") else {}}
            results["runs"].setdefault(name, []).append(row)
            print(f"{name} seed {seed}: val {row['val_accuracy']:.3f}, test 6-8 {row.get('test_accuracy_6-8', 0):.3f}, "
                  f"9-10 {row.get('test_accuracy_9-10', 0):.3f}, {row['train_seconds']:.0f} s", file=sys.stderr,
                  flush=True)
    return results


def _cell(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def format_table(results: dict) -> str:
    runs = results["runs"]
    lengths = sorted({int(k.removeprefix("test_accuracy_L")) for rows in runs.values() for k in rows[0]
                      if k.startswith("test_accuracy_L")})
    columns = (["val_accuracy"] + [f"test_accuracy_L{n}" for n in lengths]
               + [c for c in ("test_accuracy_6-8", "test_accuracy_9-10") if any(c in r[0] for r in runs.values())]
               + ["test_cosine", "train_seconds"])
    heads = (["val acc"] + [f"L{n}" for n in lengths] + [c.removeprefix("test_accuracy_") for c in columns
                                                         if c.startswith("test_accuracy_") and "L" not in c]
             + ["test cos", "train s"])
    lines = ["| model | params | seeds | " + " | ".join(heads) + " |", "|---|---:|---:|" + "---:|" * len(heads)]
    for name, rows in runs.items():
        params = rows[0].get("num_parameters", "")
        cells = [_cell([r[c] for r in rows], 0 if c == "train_seconds" else 3) for c in columns]
        lines.append(f"| {name} | {params} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=100_000, help="parameters of each learned model")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model seeds")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--d", type=int, default=32, help="token width")
    parser.add_argument("--max-train-length", type=int, default=5)
    parser.add_argument("--test-chains", type=int, default=64, help="chains per test length (x 8 start values)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--layers", type=int, default=3, help="Transformer blocks (not the looped one)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    results = run(args)
    print(f"data: {results['data']} rows; chance 0.125\n")
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
