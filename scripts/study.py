"""Train variants of one config x seeds on one split, with baselines, and report them side by side.

Each (variant, seed) is a run of scripts/train.py's pipeline in OUT/<variant>/seed<k>/ (its own
W&B run, grouped under the study's name, job type = variant); the baselines are fitted once per
seed in OUT/baselines/seed<k>/. The report is OUT/study.md (tables) and OUT/study.json (every
number). Rerunning the same command continues a stopped study: finished runs are read, a run with
a checkpoint resumes. Compare variants on validation; the test split is read once per final run.

A study is best a file, configs/studies/<name>.yaml (the base config, its --set, the variants,
the seeds, --jobs and the output folder: see efgraph.training.study.StudyFile), run by its name;
the README's studies are there. The flags say the same on the command line.

Examples::

    python scripts/study.py routing-final3                      # configs/studies/routing-final3.yaml
    python scripts/study.py my-study.yaml --jobs 1              # a study file elsewhere; one run at a time
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
from efgraph.training.study import StudyFile, build_variants, run_study
from efgraph.utils.logging import setup_logging

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STUDIES = PROJECT_ROOT / "configs" / "studies"
# what a study file says: with a study, these flags are refused (edit the file instead)
STUDY_FLAGS = {"config": "--config", "overrides": "--set", "variants": "--variant", "seeds": "--seeds",
               "variant_seeds": "--variant-seeds"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="?", metavar="STUDY",
                   help="a study file: the name of one in configs/studies/ (e.g. routing-final3) or a path to a "
                        ".yaml; it gives the config, --set, the variants, the seeds, --jobs and --output-dir (the "
                        "last two may be overridden)")
    p.add_argument("--config",
                   help="base YAML config: the data, the split and the full model (default: configs/bible-full.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field for every run, e.g. --set epochs=2 (repeatable)")
    p.add_argument("--variant", dest="variants", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="a named variant with its config overrides, e.g. no-spawn:max_spawn_per_step=0 "
                        "(repeatable; a bare NAME is the base config; default: one variant 'full'). Variants may "
                        "not change the data, the split or the seed")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
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
    p.add_argument("--jobs", type=int, metavar="N",
                   help="train N runs side by side, each in its own process with cores / N CPU threads unless "
                        "the config sets num_threads (default: 1, one run at a time)")
    p.add_argument("--baselines-only", action="store_true",
                   help="fit the baselines of every seed and train no run (re-measures the baselines alone)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the per-run lines stay)")
    p.add_argument("--log-level", default="INFO", help="INFO, DEBUG, ...")
    return p.parse_args(argv)


def study_file_path(study: str) -> Path:
    """A study's name (configs/studies/<name>.yaml) or a path to a study file."""
    path = Path(study)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"{study}: no such study file")
        return path
    named = STUDIES / f"{study}.yaml"
    if not named.is_file():
        known = sorted(p.stem for p in STUDIES.glob("*.yaml"))
        raise ValueError(f"study {study!r}: no file {named}; the studies are: {', '.join(known)}")
    return named


def resolve_study(args: argparse.Namespace) -> tuple[EnergyConfig, list, Path, str, int]:
    """``(base config, variants, output folder, config path, jobs)`` from a study file or the flags.

    Raises:
        ValueError: a bad study file or flag, naming it.
    """
    if args.study:
        given = [flag for key, flag in STUDY_FLAGS.items() if getattr(args, key)]
        if given:
            raise ValueError(f"{', '.join(given)}: the study file {args.study!r} says these; edit it, or run the "
                             "study by flags without a study name")
        spec = StudyFile.read(study_file_path(args.study))
        base = spec.base(PROJECT_ROOT)
        variants = spec.variants(base)
        return base, variants, Path(args.output_dir or spec.output_dir), spec.config, args.jobs or spec.jobs
    config = args.config or "configs/bible-full.yaml"
    base = EnergyConfig.from_yaml(config).with_overrides(args.overrides)
    variants = build_variants(base, args.variants, args.seeds or [0, 1, 2], args.variant_seeds)
    out = Path(args.output_dir or Path("runs") / f"study-{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    return base, variants, out, config, args.jobs or 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"error: --jobs: must be >= 1, got {args.jobs}")
    try:  # a bad flag or study file: say which, without a traceback (errors while training keep theirs)
        base, variants, out, config_path, jobs = resolve_study(args)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    runs = sum(len(v.seeds) for v in variants)
    what = "the baselines alone" if args.baselines_only else f"{len(variants)} variant(s), {runs} run(s)"
    print(f"study {args.name or out.name}: {what} -> {out}", flush=True)
    run_study(base, variants, out, name=args.name, config_path=config_path, wandb_mode=args.wandb_mode,
              device=args.device, progress=not args.no_progress, report=lambda line: print(line, flush=True),
              jobs=jobs, baselines_only=args.baselines_only)
    print("\n" + (out / ("baselines.md" if args.baselines_only else "study.md")).read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
