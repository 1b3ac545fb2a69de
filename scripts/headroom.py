"""A task's headroom: identity, ridge, residual ridge, an equal-size MLP and Transformer (and their
residual forms), and the ceiling where one is known, on the config's own split (validation and
test cosine; the nearest answer's accuracy on composition).

A benchmark can only tell models apart where there is room between its baselines and its ceiling;
this table says how much there is before any model is trained. The learned baselines get the
config's model's parameter count, steps, batch, learning rate and schedule (as scripts/train.py's
baselines do; ``--set baseline_models=mlp`` skips the Transformer).
A task where the MLP does not beat ridge on validation is labelled a "not worse than" check: on
it a model can show it is not worse than a linear map, never that it computes more.

Examples::

    python scripts/headroom.py --config configs/routing.yaml
    python scripts/headroom.py --config configs/bible.yaml --json headroom-bible.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from efgraph.config import EnergyConfig
from efgraph.core.flow_processor import FlowProcessor
from efgraph.data.composition import memoriser_accuracy
from efgraph.training.baselines import fit_baselines
from efgraph.training.run import (baseline_options, load_pairs, make_run_split, score_predictions, seed_everything,
                                  task_oracle)
from efgraph.utils.device import apply_num_threads
from efgraph.utils.logging import setup_logging


def headroom(config: EnergyConfig, progress: bool = False) -> dict[str, dict[str, float]]:
    """``{baseline: {"val_cosine", "test_cosine", "test_mse", "test_r_at_1"[, "test_answer_accuracy"]}}``
    on ``config``'s split: identity, ridge, the learned baselines of ``config.baseline_models`` and,
    where the widths match, their residual forms; the ceiling where the task has an oracle."""
    seed_everything(config.seed)
    apply_num_threads(config.num_threads)
    pairs = load_pairs(config, progress=progress)
    split = make_run_split(config, pairs)
    parts = {name: (pairs.src[idx], pairs.tgt[idx])
             for name, idx in (("train", split.train), ("val", split.validation), ("test", split.test))}
    n_params = sum(p.numel() for p in FlowProcessor.from_config(config).parameters())
    options = {**baseline_options(config, len(split.train), n_params), "progress": progress}
    models = fit_baselines(parts["train"], parts["val"], **{**options, "residual": False})
    if config.input_dim == config.output_dim:  # the residual forms too (ridge and identity once)
        models += [b for b in fit_baselines(parts["train"], parts["val"], **{**options, "residual": True})
                   if b.name.startswith("residual-")]
    predictors = {model.name: model.predict for model in models}
    oracle = lambda src: task_oracle(config, src)  # noqa: E731
    if oracle(parts["val"][0][:1]) is not None:
        predictors["ceiling (the generator's function)"] = oracle
    rows: dict[str, dict[str, float]] = {}
    for name, predict in predictors.items():
        val = score_predictions(config, predict(parts["val"][0]), parts["val"][1])
        test = score_predictions(config, predict(parts["test"][0]), parts["test"][1])
        rows[name] = {"val_cosine": val["cosine"], **{f"test_{k}": v for k, v in test.items()}}
    rows["_meta"] = {"model_parameters": n_params, "mlp_beats_ridge_on_validation": float(
        rows["mlp"]["val_cosine"] > rows["ridge"]["val_cosine"]) if "mlp" in rows else float("nan")}
    if config.dataset == "composition":  # what memorising the training inputs alone scores
        args = (config.composition_values, config.composition_tables, config.composition_chain, config.data_seed)
        rows["_meta"]["memoriser_test_answer_accuracy"] = memoriser_accuracy(parts["train"][0], parts["test"][0], *args)
    return rows


def format_table(name: str, rows: dict[str, dict[str, float]]) -> str:
    meta = rows["_meta"]
    kind = ("no MLP was trained" if meta["mlp_beats_ridge_on_validation"] != meta["mlp_beats_ridge_on_validation"]
            else "rewards more than a linear map" if meta["mlp_beats_ridge_on_validation"]
            else "a \"not worse than\" check (the MLP does not beat ridge on validation)")
    models = {model: m for model, m in rows.items() if model != "_meta"}
    answers = all("test_answer_accuracy" in m for m in models.values())
    lines = [f"{name}: {kind}; learned baselines sized to the model's {int(meta['model_parameters']):,} parameters",
             "", "| baseline | val cosine | test cosine | test MSE | test R@1 |" + (" test answer acc. |" if answers else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if answers else "")]
    for model, m in models.items():
        lines.append(f"| {model} | {m['val_cosine']:.4f} | {m['test_cosine']:.4f} | {m['test_mse']:.4g} | "
                     f"{m['test_r_at_1']:.4f} |" + (f" {m['test_answer_accuracy']:.4f} |" if answers else ""))
    if "memoriser_test_answer_accuracy" in meta:
        lines += ["", f"A perfect memoriser of the training inputs (right on the test inputs seen in training, chance "
                      f"on the rest) scores test answer accuracy {meta['memoriser_test_answer_accuracy']:.4f}: a model "
                      "above it composes lookups."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config: data, split and the model whose size the MLPs match")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = p.parse_args(argv)
    setup_logging("WARNING")
    try:
        config = EnergyConfig.from_yaml(args.config).with_overrides(args.overrides)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = headroom(config)
    print(format_table(Path(args.config).stem, rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
