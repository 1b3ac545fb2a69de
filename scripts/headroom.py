"""A task's headroom: identity, ridge, residual ridge, an equal-size MLP and residual MLP, and the
ceiling where one is known, on the config's own split (validation and test cosine).

A benchmark can only tell models apart where there is room between its baselines and its ceiling;
this table says how much there is before any model is trained. The MLPs get the config's model's
parameter count, steps, batch, learning rate and schedule (as scripts/train.py's baselines do).
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
from efgraph.data.routing import routing_oracle
from efgraph.training.baselines import (
    IdentityBaseline, MLPBaseline, ResidualRidgeBaseline, RidgeBaseline,
)
from efgraph.training.metrics import evaluate_predictions
from efgraph.training.run import baseline_options, load_pairs, make_run_split, seed_everything
from efgraph.utils.logging import setup_logging


def headroom(config: EnergyConfig, progress: bool = False) -> dict[str, dict[str, float]]:
    """``{baseline: {"val_cosine", "test_cosine", "test_mse", "test_r_at_1"}}`` on ``config``'s split."""
    seed_everything(config.seed)
    pairs = load_pairs(config, progress=progress)
    split = make_run_split(config, pairs)
    parts = {name: (pairs.src[idx], pairs.tgt[idx])
             for name, idx in (("train", split.train), ("val", split.validation), ("test", split.test))}
    n_params = sum(p.numel() for p in FlowProcessor.from_config(config).parameters())
    options = baseline_options(config, len(split.train), n_params)
    mlp_kw = {k: v for k, v in options.items() if k not in ("target_params", "residual")}
    same_width = config.input_dim == config.output_dim
    models = ([IdentityBaseline()] if same_width else []) + [RidgeBaseline(mse_weight=config.mse_weight, cosine_weight=config.cosine_weight)]
    if same_width:
        models.append(ResidualRidgeBaseline(mse_weight=config.mse_weight, cosine_weight=config.cosine_weight))
    models.append(MLPBaseline(target_params=n_params, residual=False, **mlp_kw))
    if same_width:
        models.append(MLPBaseline(target_params=n_params, residual=True, **mlp_kw))
    rows: dict[str, dict[str, float]] = {}
    for model in models:
        model.fit(*parts["train"], *parts["val"])
        val = evaluate_predictions(model.predict(parts["val"][0]), parts["val"][1])
        test = evaluate_predictions(model.predict(parts["test"][0]), parts["test"][1])
        rows[model.name] = {"val_cosine": val["cosine"], "test_cosine": test["cosine"], "test_mse": test["mse"],
                            "test_r_at_1": test["r_at_1"]}
    if config.dataset == "routing":
        oracle = {name: evaluate_predictions(routing_oracle(src, config.routing_slots, config.routing_token_dim,
                                                            config.data_seed), tgt)
                  for name, (src, tgt) in parts.items() if name != "train"}
        rows["ceiling (the generator's function)"] = {
            "val_cosine": oracle["val"]["cosine"], "test_cosine": oracle["test"]["cosine"],
            "test_mse": oracle["test"]["mse"], "test_r_at_1": oracle["test"]["r_at_1"]}
    rows["_meta"] = {"model_parameters": n_params, "mlp_beats_ridge_on_validation": float(
        rows["mlp"]["val_cosine"] > rows["ridge"]["val_cosine"])}
    return rows


def format_table(name: str, rows: dict[str, dict[str, float]]) -> str:
    meta = rows["_meta"]
    kind = "rewards more than a linear map" if meta["mlp_beats_ridge_on_validation"] else \
        "a \"not worse than\" check (the MLP does not beat ridge on validation)"
    lines = [f"{name}: {kind}; MLPs sized to the model's {int(meta['model_parameters']):,} parameters", "",
             "| baseline | val cosine | test cosine | test MSE | test R@1 |", "|---|---:|---:|---:|---:|"]
    for model, m in rows.items():
        if model != "_meta":
            lines.append(f"| {model} | {m['val_cosine']:.4f} | {m['test_cosine']:.4f} | {m['test_mse']:.4g} | "
                         f"{m['test_r_at_1']:.4f} |")
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
    torch.set_num_threads(max(torch.get_num_threads(), 1))
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
