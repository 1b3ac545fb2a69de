"""Train an energy-flow model and compare it with baselines on held-out data.

Examples::

    python scripts/train.py --config configs/bible.yaml
    python scripts/train.py --config configs/debug.yaml --set dataset=synthetic --set epochs=2
    python scripts/train.py --config configs/debug.yaml --max-steps 500      # a whole run of 500 steps
    python scripts/train.py --stop-at-step 1000                              # time-box, then:
    python scripts/train.py --resume runs/bible-20261125-120000             # continue in place
    python scripts/train.py --resume runs/a/checkpoints/best.pt --output-dir runs/a-fork   # fork
    python scripts/train.py --config configs/debug.yaml --print-config

Exit status: 0 done (or stopped at --stop-at-step), 2 a usage error (one line naming the flag or
config field), 1 a failure while training (with its traceback), 128 + the signal number when
SIGTERM (143), SIGINT / Ctrl-C (130) or SIGUSR1 (138) stopped it: the current step is finished,
checkpoints/last.pt written and the --resume command printed; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from efgraph.config import EnergyConfig
from efgraph.training.run import RunInputError, WandbRunInfo, checkpoint_run_dir, run_training
from efgraph.training.run_logger import WANDB_MODES
from efgraph.training.signals import TrainingInterrupted
from efgraph.utils.logging import setup_logging

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "bible.yaml"  # found from the project, not the current folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (flat; unknown keys are errors); default configs/bible.yaml of "
                                    "this project, or with --resume the run's own config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set epochs=3 (repeatable; values parsed as YAML)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--resume", metavar="PATH",
                   help="continue a run from its folder (uses checkpoints/last.pt) or from a checkpoint file; with "
                        "--output-dir NEW, fork it into NEW (the original is not touched)")
    p.add_argument("--output-dir", metavar="DIR",
                   help="run folder (default: runs/<config name>-<time>; with --resume, the resumed run's folder)")
    p.add_argument("--wandb-mode", choices=WANDB_MODES, default="auto",
                   help="W&B logging: auto = an exported WANDB_MODE, else online if an API key is configured "
                        "(WANDB_API_KEY, $NETRC or ~/.netrc), else offline (default); online falls back to "
                        "offline without a key")
    p.add_argument("--wandb-entity", help="W&B entity (team or user; default: WANDB_ENTITY or the key's user)")
    p.add_argument("--wandb-group", help="W&B group, e.g. an experiment name (default: WANDB_RUN_GROUP)")
    p.add_argument("--wandb-tags", default="", help="comma-separated W&B tags")
    p.add_argument("--wandb-name", help="W&B run name (default: the run folder's name)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, help="model seed: initialisation and batch order (overrides the config's seed)")
    p.add_argument("--data-seed", type=int,
                   help="data seed: the train/validation/test split and the synthetic teacher (overrides the "
                        "config's data_seed); keep it fixed to compare model seeds on one test set")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="the run's length: N optimizer steps instead of `epochs` epochs; the schedule spans N, the "
                        "run ends with the test and the baselines (whose MLP trains N steps too)")
    p.add_argument("--stop-at-step", type=int, metavar="N",
                   help="stop after global step N without testing (the schedule still spans the whole run); "
                        "continue later with --resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-level", default="INFO",
                   help="INFO, DEBUG, DEBUG_ENERGY, DEBUG_SPAWN, DEBUG_CONVERGENCE (arrivals per forward)")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace, run_dir: Path | None) -> EnergyConfig:
    """The config file (given, the resumed run's, or the project's default), ``--set``, seeds.

    Raises:
        RunInputError: naming ``--config``, ``--set``, ``--seed`` or ``--data-seed``.
    """
    if args.config:
        path = Path(args.config)
    elif args.resume:
        path = checkpoint_run_dir(args.resume) / "config.yaml"
    else:
        path = DEFAULT_CONFIG
    runs_own = bool(args.resume and not args.config)  # the resumed run's config.yaml, not a user's file
    flag = "--resume" if runs_own else "--config"
    if not path.is_file():
        raise RunInputError(f"{flag}: no config file at {path}")
    try:
        # a run's own config may come from an older efgraph: read with the values that version ran
        config = EnergyConfig.from_saved_yaml(path) if runs_own else EnergyConfig.from_yaml(path)
    except (ValueError, yaml.YAMLError) as err:
        raise RunInputError(f"{flag}: {str(err).splitlines()[0] if str(err) else err}") from None
    known = set(config.to_dict())
    for item in args.overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            raise RunInputError(f"--set {item}: expected KEY=VALUE")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see --print-config for the fields"
            raise RunInputError(f"--set {item}: {key!r} is not a config field{hint}")
    try:
        config = config.with_overrides(args.overrides)
    except ValueError as err:
        raise RunInputError(f"--set: {err}") from None
    for flag, field, value in (("--seed", "seed", args.seed), ("--data-seed", "data_seed", args.data_seed)):
        if value is not None:
            try:
                config = config.replace(**{field: value})
            except ValueError as err:
                raise RunInputError(f"{flag}: {err}") from None
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        setup_logging(args.log_level)
    except ValueError as err:
        return _usage_error(f"--log-level: {err}")
    try:
        config = resolve_config(args, None)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        if args.output_dir:
            run_dir = Path(args.output_dir)
        elif args.resume:
            run_dir = checkpoint_run_dir(args.resume)
        else:
            name = Path(args.config).stem if args.config else DEFAULT_CONFIG.stem
            run_dir = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        info = WandbRunInfo(name=args.wandb_name, group=args.wandb_group, entity=args.wandb_entity,
                            tags=tuple(t.strip() for t in args.wandb_tags.split(",") if t.strip()))
        outcome = run_training(config, run_dir, wandb_mode=args.wandb_mode, device=args.device, resume=args.resume,
                               progress=not args.no_progress, total_steps=args.max_steps,
                               stop_at_step=args.stop_at_step, wandb_info=info)
    except RunInputError as err:
        if logging.getLogger("efgraph").isEnabledFor(logging.DEBUG):
            raise  # --log-level DEBUG: the traceback too
        return _usage_error(str(err))
    except TrainingInterrupted as stopped:  # a signal: the step finished and last.pt written, on every rank
        if os.environ.get("RANK", "0") == "0":
            world, local = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("LOCAL_WORLD_SIZE", "1")
            launcher = ("python" if world == 1 else f"torchrun --nproc_per_node={local}" if str(world) == local
                        else "torchrun <the same torchrun options on every node>")
            print(f"\nStopped by {stopped.signal_name} after step {stopped.step}; continue with: "
                  f"{launcher} scripts/train.py --resume {run_dir}", flush=True)
        return int(stopped.code)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    if outcome.table:
        print(f"\nTest split ({run_dir}):\n\n{outcome.table}")
    else:
        print(f"\nStopped at --stop-at-step; continue with: python scripts/train.py --resume {run_dir}")
    return 0


def _usage_error(message: str) -> int:
    """One line on stderr, exit status 2 (argparse's convention for usage errors)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
