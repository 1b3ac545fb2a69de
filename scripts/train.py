"""Train an energy-flow model and compare it with baselines on held-out data.

Examples::

    python scripts/train.py --config configs/bible.yaml
    python scripts/train.py --config configs/debug.yaml --set dataset=synthetic --set epochs=2
    python scripts/train.py --resume runs/bible-20261125-120000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from efgraph.config import EnergyConfig
from efgraph.training.run import run_training
from efgraph.training.run_logger import WANDB_MODES
from efgraph.utils.logging import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (flat; unknown keys are errors); default configs/bible.yaml, "
                                    "or with --resume the run's own config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set epochs=3 (repeatable; values parsed as YAML)")
    p.add_argument("--resume", metavar="PATH",
                   help="continue a run from its folder (uses checkpoints/last.pt) or from a checkpoint file")
    p.add_argument("--output-dir", metavar="DIR",
                   help="run folder (default: runs/<config name>-<time>; with --resume, the resumed run's folder)")
    p.add_argument("--wandb-mode", choices=WANDB_MODES, default="auto",
                   help="W&B logging: online needs an API key and falls back to offline without one; "
                        "auto = online if a key is configured, else offline (default)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, help="model seed: initialisation and batch order (overrides the config's seed)")
    p.add_argument("--data-seed", type=int,
                   help="data seed: the train/validation/test split and the synthetic teacher (overrides the "
                        "config's data_seed); keep it fixed to compare model seeds on one test set")
    p.add_argument("--max-steps", type=int, help="stop after this global step; resume later with --resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="INFO", help="INFO, DEBUG, DEBUG_ENERGY, DEBUG_SPAWN, DEBUG_CONVERGENCE")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    if args.output_dir:
        run_dir = Path(args.output_dir)
    elif args.resume:
        resume = Path(args.resume)
        run_dir = resume if resume.is_dir() else resume.parent.parent
    else:
        run_dir = Path("runs") / f"{Path(args.config or 'bible').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    config_path = args.config or (run_dir / "config.yaml" if args.resume else "configs/bible.yaml")
    config = EnergyConfig.from_yaml(config_path).with_overrides(args.overrides)
    if args.seed is not None:
        config = config.replace(seed=args.seed)
    if args.data_seed is not None:
        config = config.replace(data_seed=args.data_seed)
    if not args.resume and (run_dir / "checkpoints").exists():
        raise SystemExit(f"--output-dir: {run_dir} already holds a run; continue it with --resume {run_dir} "
                         "or choose another folder")
    outcome = run_training(config, run_dir, wandb_mode=args.wandb_mode, device=args.device, resume=args.resume,
                           progress=not args.no_progress, max_steps=args.max_steps)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    if outcome.table:
        print(f"\nTest split ({run_dir}):\n\n{outcome.table}")
    else:
        print(f"\nStopped at --max-steps; continue with: python scripts/train.py --resume {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
