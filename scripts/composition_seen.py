"""A composition study's test cosine, split by whether the test input was also a training input.

The default composition split holds out (input, target) pairs (``composition_hold_out: pairs``), so
a test input -- its start value and chain -- may also be a training input, and on those a model
that memorised its training set is right (:func:`efgraph.data.composition.memoriser_accuracy`).
Only the other test inputs ask a model to compose its lookups: a model whose cosine there stays at
ridge's level (no linear map can do a lookup) composes nothing, whatever its score on the rest.

Reads a study folder of a composition config (scripts/study.py): its ``study_config.yaml``,
``split.json`` and every run's and baseline's ``test_pairs.npz``; trains nothing.

Examples::

    python scripts/composition_seen.py runs/study-composition-L3-proj
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from efgraph.config import EnergyConfig
from efgraph.data import Split
from efgraph.data.composition import seen_in_training
from efgraph.training.metrics import load_pair_scores
from efgraph.training.run import load_pairs
from efgraph.training.study import BASELINES_DIR, mean_std


def seen_mask(study: Path) -> np.ndarray:
    """``[N_test]`` bool in the order of the study's test pairs: the input is also a training input."""
    config_path = study / "study_config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{study}: not a study folder (no study_config.yaml)")
    config = EnergyConfig.from_saved_yaml(config_path)
    if config.dataset != "composition":
        raise ValueError(f"{config_path}: dataset is {config.dataset!r}; this split needs dataset: composition")
    pairs = load_pairs(config, progress=False)
    split = Split.from_json(study / "split.json")
    return seen_in_training(pairs.src[split.train], pairs.src[split.test], config.composition_values,
                            config.composition_tables, config.composition_chain, seed=config.data_seed).numpy()


def seen_unseen_table(study: Path) -> list[dict]:
    """One row per model (each variant, each baseline): its seeds and the mean +- std over them of
    the mean test cosine on seen and on unseen test inputs."""
    seen = seen_mask(study)
    per_model: dict[str, list[tuple[float, float]]] = {}
    seeds: dict[str, list[int]] = {}
    for path in sorted(study.glob("*/seed*/test_pairs.npz")):
        group, seed = path.parent.parent.name, int(path.parent.name.removeprefix("seed"))
        for model, scores in load_pair_scores(path).items():
            name = model if group == BASELINES_DIR else group  # a run's own model is its variant
            if len(scores["cosine"]) != len(seen):
                raise ValueError(f"{path}: {len(scores['cosine'])} test pairs, the study's split has {len(seen)}")
            cos = scores["cosine"]
            per_model.setdefault(name, []).append((float(cos[seen].mean()) if seen.any() else float("nan"),
                                                   float(cos[~seen].mean()) if (~seen).any() else float("nan")))
            seeds.setdefault(name, []).append(seed)
    return [{"model": name, "seeds": seeds[name], "seen_fraction": float(seen.mean()),
             "seen": mean_std([s for s, _ in values]), "unseen": mean_std([u for _, u in values])}
            for name, values in per_model.items()]


def _fmt(stat: dict) -> str:
    return f"{stat['mean']:.4f}" + ("" if stat["std"] is None else f" +- {stat['std']:.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", type=Path, help="a study folder of a composition config (scripts/study.py)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    try:
        rows = seen_unseen_table(args.study)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {args.study}: no test_pairs.npz of a finished run or baseline", file=sys.stderr)
        return 2
    print(f"test cosine on inputs seen in training ({rows[0]['seen_fraction']:.1%} of the test pairs) and on the "
          "others, mean +- std over seeds\n")
    print("| model | seeds | seen inputs | unseen inputs |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {','.join(map(str, r['seeds']))} | {_fmt(r['seen'])} | {_fmt(r['unseen'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
