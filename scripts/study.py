"""Train variants of one config x seeds on one split, with baselines, and report them side by side.

Each (variant, seed) is a run of scripts/train.py's pipeline in OUT/<variant>/seed<k>/ (its own
W&B run, grouped under the study's name, job type = variant); the baselines are fitted once per
seed in OUT/baselines/seed<k>/. The report is OUT/study.md (tables) and OUT/study.json (every
number). Rerunning the same command continues a stopped study: finished runs are read, a run with
a checkpoint resumes. Compare variants on validation; the test split is read once per final run.

Examples::

    python scripts/study.py --config configs/bible-full.yaml --output-dir runs/study-bible-full \\
        --variant full --variant no-spawn:max_spawn_per_step=0 --variant no-interaction:interaction_radius=0 \\
        --variant one-step:lattice_depth=2 --variant no-residual:residual=false --seeds 0 1 2
    python scripts/study.py --config configs/debug.yaml --set dataset=synthetic --set epochs=1 \\
        --variant full --variant small:carrier_hidden_dim=64 --seeds 0 1 --variant-seeds full=0,1,2
    python scripts/study.py --config configs/composition.yaml --jobs 2 --variant one-step \\
        --variant deep:lattice_depth=5 --seeds 0 1 2

With ``--jobs N`` runs train side by side, N processes of ``cores / N`` threads each (the config's
``num_threads``, when it sets one, is kept): never several runs at PyTorch's default thread count
on one machine, which on 2 cores made each step take 2x as long (scripts/bench_threads.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from efgraph.config import EnergyConfig
from efgraph.training.run_logger import WANDB_MODES
from efgraph.training.study import build_variants, run_study
from efgraph.utils.logging import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/bible-full.yaml",
                   help="base YAML config: the data, the split and the full model (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field for every run, e.g. --set epochs=2 (repeatable)")
    p.add_argument("--variant", dest="variants", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="a named variant with its config overrides, e.g. no-spawn:max_spawn_per_step=0 "
                        "(repeatable; a bare NAME is the base config; default: one variant 'full'). Variants may "
                        "not change the data, the split or the seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                   help="model seeds of every variant (default: 0 1 2); the split stays fixed by data_seed")
    p.add_argument("--variant-seeds", action="append", default=[], metavar="NAME=SEED,SEED,...",
                   help="other seeds for one variant, e.g. full=0,1,2,3,4 (repeatable)")
    p.add_argument("--output-dir", metavar="DIR",
                   help="study folder (default: runs/study-<config name>-<time>); rerun with the same folder "
                        "to continue a stopped study")
    p.add_argument("--name", help="study name and W&B group (default: the output folder's name)")
    p.add_argument("--wandb-mode", choices=WANDB_MODES, default="auto",
                   help="W&B logging of every run: auto = online if an API key is configured, else offline")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs side by side, each in its own process with cores / N CPU threads unless "
                        "the config sets num_threads (default: 1, one run at a time)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the per-run lines stay)")
    p.add_argument("--log-level", default="INFO", help="INFO, DEBUG, ...")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs: must be >= 1, got {args.jobs}")
    try:  # a bad flag: say which, without a traceback (errors while training keep theirs)
        base = EnergyConfig.from_yaml(args.config).with_overrides(args.overrides)
        variants = build_variants(base, args.variants, args.seeds, args.variant_seeds)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    out = Path(args.output_dir or Path("runs") / f"study-{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    runs = sum(len(v.seeds) for v in variants)
    print(f"study {args.name or out.name}: {len(variants)} variant(s), {runs} run(s) -> {out}", flush=True)
    run_study(base, variants, out, name=args.name, config_path=args.config, wandb_mode=args.wandb_mode,
              device=args.device, progress=not args.no_progress, report=lambda line: print(line, flush=True),
              jobs=args.jobs)
    print("\n" + (out / "study.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
