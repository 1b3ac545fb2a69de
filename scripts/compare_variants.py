"""Every variant of one or more studies against one reference variant, on the shared test split.

A study (scripts/study.py) compares each variant with the best baseline; this compares variants
with each other: the reference (chosen by the caller, e.g. the variant best on validation) minus
each other variant, with the study's own statistics -- a paired bootstrap over the test pairs and a
two-level bootstrap over seeds, then pairs -- and the validation difference that the choice is
made on. The studies must share the split (same config data and data_seed).

Examples::

    python scripts/compare_variants.py runs/study-routing runs/study-routing-ablations --reference one-step
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from efgraph.training.metrics import load_pair_scores
from efgraph.training.study import mean_std, paired_bootstrap_ci, two_level_bootstrap_ci


def load_variants(study_dirs: list[Path]) -> dict[str, dict[int, dict]]:
    """variant -> seed -> {"val_cosine", "cosine" [N], "hit" [N]} from every finished run."""
    variants: dict[str, dict[int, dict]] = {}
    for study in study_dirs:
        for results in sorted(study.glob("*/seed*/results.json")):
            variant, seed = results.parent.parent.name, int(results.parent.name.removeprefix("seed"))
            if variant == "baselines":
                continue
            record = json.loads(results.read_text())
            scores = load_pair_scores(results.parent / "test_pairs.npz")["energy-flow"]
            variants.setdefault(variant, {})[seed] = {"val_cosine": record["validation"]["cosine"], **scores}
    return variants


def compare(variants: dict[str, dict[int, dict]], reference: str, resamples: int = 1000) -> list[dict]:
    if reference not in variants:
        raise ValueError(f"--reference: no finished runs of {reference!r}; found {sorted(variants)}")
    ref = variants[reference]
    rows = []
    for name, per_seed in variants.items():
        if name == reference:
            continue
        a = np.stack([ref[s]["cosine"] for s in sorted(ref)])
        b = np.stack([per_seed[s]["cosine"] for s in sorted(per_seed)])
        pairs = paired_bootstrap_ci(a.mean(axis=0), b.mean(axis=0), resamples=resamples)
        both = two_level_bootstrap_ci(a, b, resamples=resamples)
        val = (mean_std([r["val_cosine"] for r in ref.values()])["mean"]
               - mean_std([r["val_cosine"] for r in per_seed.values()])["mean"])
        rows.append({"variant": name, "seeds": sorted(per_seed), "val_diff": val, "test_diff": pairs.diff,
                     "pairs_ci": [pairs.low, pairs.high], "seeds_and_pairs_ci": [both.low, both.high]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("studies", nargs="+", type=Path, help="study folders written by scripts/study.py")
    p.add_argument("--reference", required=True, help="the variant the others are compared with")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    try:
        rows = compare(load_variants(args.studies), args.reference)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.reference} minus each variant, test cosine (95% CIs, 1000 resamples)\n")
    print("| variant | seeds | val Δ | test Δ | pairs CI | seeds + pairs CI |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {','.join(map(str, r['seeds']))} | {r['val_diff']:+.4f} | {r['test_diff']:+.4f} | "
              f"[{r['pairs_ci'][0]:+.4f}, {r['pairs_ci'][1]:+.4f}] | "
              f"[{r['seeds_and_pairs_ci'][0]:+.4f}, {r['seeds_and_pairs_ci'][1]:+.4f}] |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
