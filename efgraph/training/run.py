"""One training run end to end, as ``scripts/train.py`` runs it.

data -> deterministic split (saved) -> model -> :class:`EnergyTrainer` -> best state -> test metrics
-> baselines on the same split -> table, figures, metrics JSON, exported weights, W&B.

Run folder layout::

    RUN_DIR/config.yaml        resolved config
    RUN_DIR/split.json         the train / validation / test indices
    RUN_DIR/metrics.jsonl      every logged step
    RUN_DIR/checkpoints/       last.pt, best.pt (weights_only-loadable)
    RUN_DIR/results.json       test metrics of the model and the baselines, the validation metrics
                               of the selected state and of the last evaluation, the test dynamics
    RUN_DIR/results.md         the test metrics as a Markdown table
    RUN_DIR/test_pairs.npz     per test pair and model: cosine and R@1 hit (see metrics.save_pair_scores)
    RUN_DIR/flow_paths.png, RUN_DIR/landing.png, RUN_DIR/flow_counts.png
    RUN_DIR/model/             model.safetensors + config.yaml (see efgraph.load_model)
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from efgraph.config import RESUME_MUTABLE_KEYS, EnergyConfig
from efgraph.core.flow_processor import FlowProcessor
from efgraph.data import EmbeddingPairs, Split, load_bible_pairs, load_embedding_pairs, load_text_pairs, make_teacher_pairs
from efgraph.data._atomic import atomic_write
from efgraph.data.split import make_split
from efgraph.model_io import export_model
from efgraph.training.baselines import fit_baselines, format_results_table
from efgraph.training.checkpoint import load_checkpoint
from efgraph.training.distributed import DistributedContext, init_distributed, local_device, shutdown_distributed
from efgraph.training.figures import flow_counts_figure, flow_paths_figure, landing_arrays, landing_figure
from efgraph.training.metrics import evaluate_predictions, pair_scores, save_pair_scores
from efgraph.training.run_logger import RunLogger, resolve_wandb_mode
from efgraph.training.trainer import EnergyTrainer
from efgraph.utils.device import get_device
from efgraph.utils.logging import get_logger

logger = get_logger(__name__)


TEST_METRICS = ("cosine", "mse", "r_at_1")


@dataclass
class RunOutcome:
    """What a run produced; empty ``results`` and ``table`` when it stopped before its last step."""

    run_dir: Path
    results: dict[str, dict[str, float]]
    table: str


@dataclass(frozen=True)
class WandbRunInfo:
    """How a run is filed in W&B: display ``name`` (default: the run folder's name), ``group``
    (e.g. a study), ``job_type`` (e.g. a study variant) and ``tags``."""

    name: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: tuple[str, ...] = ()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_pairs(config: EnergyConfig, progress: bool = True) -> EmbeddingPairs:
    """The (source, target) embedding pairs named by ``config.dataset``."""
    limit = config.max_pairs or None
    model = config.embedding_model or None
    if config.dataset == "synthetic":
        # the teacher is part of the data: fixed by data_seed, so model seeds share one data set
        pairs = make_teacher_pairs(config.synthetic_pairs, config.input_dim, config.output_dim, seed=config.data_seed)
    elif config.dataset == "bible":
        pairs = load_bible_pairs(config.source_version, config.target_version, max_verses=limit, model=model,
                                 verses_per_book=config.verses_per_book or None, progress=progress)
    elif config.dataset == "pairs":
        pairs = load_embedding_pairs(config.data_path)
    else:
        pairs = load_text_pairs(config.data_path, model=model, progress=progress)
    if limit is not None and len(pairs) > limit:
        pairs = pairs.subset(list(range(limit)))
    if pairs.src_dim != config.input_dim:
        raise ValueError(f"input_dim: config says {config.input_dim} but the source embeddings are "
                         f"{pairs.src_dim} wide; set input_dim: {pairs.src_dim}")
    if pairs.tgt_dim != config.output_dim:
        raise ValueError(f"output_dim: config says {config.output_dim} but the target embeddings are "
                         f"{pairs.tgt_dim} wide; set output_dim: {pairs.tgt_dim}")
    return pairs


def make_run_split(config: EnergyConfig, pairs: EmbeddingPairs) -> Split:
    """Deterministic split; by group (e.g. Bible book) when the pairs carry groups.

    Fixed by ``config.data_seed``, not ``config.seed``: runs that differ only in their model seed
    are scored on the same test pairs, so their spread is the model's and not the split's.
    """
    fractions = (1.0 - config.val_fraction - config.test_fraction, config.val_fraction, config.test_fraction)
    return make_split(len(pairs), groups=pairs.groups, fractions=fractions, seed=config.data_seed)


def baseline_options(config: EnergyConfig, num_train: int, num_parameters: int) -> dict[str, Any]:
    """Keyword arguments of :func:`~efgraph.training.baselines.fit_baselines` for a model trained
    with ``config`` on ``num_train`` pairs: the MLP gets the model's parameter count, optimizer
    steps, batch size, learning rate, schedule, clipping, loss and seed."""
    steps = config.epochs * math.ceil(num_train / config.batch_size)  # as EnergyTrainer counts them
    return dict(
        target_params=num_parameters, steps=steps, batch_size=config.batch_size, lr=config.learning_rate,
        seed=config.seed, mse_weight=config.mse_weight, cosine_weight=config.cosine_weight,
        weight_decay=config.weight_decay, eval_every=config.eval_every, residual=config.residual,
        warmup_steps=config.warmup_steps, grad_clip=config.grad_clip,
    )


def run_training(
    config: EnergyConfig,
    run_dir: str | Path,
    *,
    wandb_mode: str = "auto",
    device: str | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    pairs: EmbeddingPairs | None = None,
    baselines: bool = True,
    wandb_info: WandbRunInfo = WandbRunInfo(),
) -> RunOutcome:
    """Train, evaluate against baselines on the held-out test split, and write the run folder.

    Args:
        pairs: the data, already loaded (as :func:`load_pairs` would load it for ``config``),
            e.g. by a study that trains many runs on it; ``None`` loads it here.
        baselines: fit and score the baselines on this run's split (a study fits them once per
            seed instead of once per run).
        wandb_info: W&B run name, group, job type and tags.
    """
    run_dir = Path(run_dir)
    dev = get_device(device)
    ctx = init_distributed(dev)
    try:
        return _run(config, run_dir, local_device(dev, ctx), ctx, wandb_mode=wandb_mode, resume=resume,
                    progress=progress, max_steps=max_steps, pairs=pairs, with_baselines=baselines,
                    wandb_info=wandb_info)
    finally:
        shutdown_distributed(ctx)


def _run(config: EnergyConfig, run_dir: Path, dev: torch.device, ctx: DistributedContext, *, wandb_mode: str,
         resume: str | Path | None, progress: bool, max_steps: int | None, pairs: EmbeddingPairs | None,
         with_baselines: bool, wandb_info: WandbRunInfo) -> RunOutcome:
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    resume_path = _resolve_resume(resume) if resume is not None else None

    # rank 0 embeds (and caches) first; the other ranks then read the cache
    if pairs is None and ctx.is_main:
        pairs = load_pairs(config, progress=progress)
    ctx.barrier()
    if pairs is None:
        pairs = load_pairs(config, progress=False)
    resumed = load_checkpoint(resume_path) if resume_path is not None else None  # read once, used below
    if resumed is not None:
        _check_resume_config(resumed["config"], config)
    split_path = run_dir / "split.json"
    if resume_path is not None and split_path.exists():
        split = Split.from_json(split_path)  # a resumed run keeps its split, whatever the seed says
    else:
        split = make_run_split(config, pairs)
        if ctx.is_main:
            split.to_json(split_path)
    train, val, test = split.apply(pairs)
    if val is None or test is None:
        raise ValueError("val_fraction, test_fraction: the split left the validation or test part empty")

    seed_everything(config.seed)
    model = FlowProcessor.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    run_logger = RunLogger(None)
    if ctx.is_main:
        config.to_yaml(run_dir / "config.yaml")
        run_id = (resumed.get("extra") or {}).get("wandb_id") if resumed is not None else None
        mode = resolve_wandb_mode(wandb_mode)
        run_logger = RunLogger.create(
            run_dir, mode=mode, project=config.wandb_project, run_id=run_id, name=wandb_info.name or run_dir.name,
            config={**config.to_dict(), "num_parameters": n_params, "train_pairs": len(train),
                    "val_pairs": len(val), "test_pairs": len(test), "world_size": ctx.world_size},
            group=wandb_info.group, job_type=wandb_info.job_type, tags=wandb_info.tags,
        )
        if resumed is not None:
            run_logger.truncate_after(int(resumed["step"]))
        logger.info("run %s: %d train / %d val / %d test pairs, %s parameters, %d process(es), wandb %s", run_dir,
                    len(train), len(val), len(test), f"{n_params:,}", ctx.world_size, mode)
    try:
        trainer = EnergyTrainer(model, config, device=dev, run_dir=run_dir, run_logger=run_logger,
                                progress=progress, distributed=ctx)
        start = time.perf_counter()
        result = trainer.train(train.src, train.tgt, val_inputs=val.src, val_targets=val.tgt,
                               resume_from=resume_path, max_steps=max_steps)
        train_seconds = time.perf_counter() - start
        total_steps = config.epochs * trainer.steps_per_epoch(len(train))
        if result.steps < total_steps or not ctx.is_main:  # stopped on purpose, or not the reporting rank
            return RunOutcome(run_dir, {}, "")
        trainer.restore_best()
        # the test split is read once, by the selected state; nothing below chooses anything on it
        test_metrics, test_pred = trainer.evaluate_with_predictions(test.src, test.tgt)
        results: dict[str, dict[str, float]] = {"energy-flow": {k: test_metrics[k] for k in TEST_METRICS}}
        per_pair = {"energy-flow": pair_scores(test_pred, test.tgt)}
        if with_baselines:
            for baseline in fit_baselines((train.src, train.tgt), (val.src, val.tgt),
                                          **baseline_options(config, len(train), n_params)):
                pred = baseline.predict(test.src)
                results[baseline.name] = evaluate_predictions(pred, test.tgt)
                per_pair[baseline.name] = pair_scores(pred, test.tgt)
        save_pair_scores(run_dir / "test_pairs.npz", per_pair)
        table = format_results_table(results)
        _figures(trainer, test, config, run_dir, run_logger, result.steps)
        run_logger.log_table("test/results", ["model", "cosine", "mse", "r_at_1"],
                             [[name, r["cosine"], r["mse"], r["r_at_1"]] for name, r in results.items()], result.steps)
        run_logger.log_summary({f"test/{name}/{k}": v for name, r in results.items() for k, v in r.items()})
        export_model(trainer.processor, run_dir / "model")
        best = run_dir / "checkpoints" / "best.pt"
        if best.exists():
            run_logger.log_artifact(best, name=f"{wandb_info.name or run_dir.name}-best", kind="model")
        evaluations = {e["step"]: e for e in result.evaluations}
        # written last: a run folder with results.json is complete (a study skips it on a rerun)
        _write_report(run_dir, config, results, table, n_params, train_seconds, result.best_step, extra={
            # validation metrics of the state the test scores (model selection happens here only);
            # None only for a run resumed from a checkpoint older than the saved validation history
            "validation": evaluations.get(result.best_step),
            # the evaluation at the last step: with flows_arrived_per_sample 0 the run ended dead
            "final_validation": evaluations.get(total_steps),
            "test_dynamics": {k: v for k, v in test_metrics.items() if k.startswith("flows_")},
        })
        return RunOutcome(run_dir, results, table)
    finally:
        run_logger.finish()


def _check_resume_config(saved: dict[str, Any], config: EnergyConfig) -> None:
    """A resumed run must be the same run: only logging-type fields may change."""
    current = config.to_dict()
    changed = [f"{k}: run has {saved.get(k)!r}, now {current[k]!r}" for k in current
               if k not in RESUME_MUTABLE_KEYS and saved.get(k) != current[k]]
    if changed:
        raise ValueError("--resume: the config differs from the run's, so it would not continue the same run "
                         "(resume without --config/--set to use the run's own config): " + "; ".join(changed))


def _resolve_resume(resume: str | Path) -> Path:
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return path


def _write_report(run_dir: Path, config: EnergyConfig, results: dict[str, dict[str, float]], table: str,
                  n_params: int, train_seconds: float, best_step: int | None, extra: dict[str, Any]) -> None:
    payload: dict[str, Any] = {"test": results, "num_parameters": n_params, "train_seconds": train_seconds,
                               "best_step": best_step, "dataset": config.dataset, **extra}
    # atomic: a study takes an existing results.json as a finished run, so it must never be half written
    atomic_write(run_dir / "results.json",
                 lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8"))
    mlp = " (the MLP baseline has as many)" if len(results) > 1 else ""
    header = (f"# Test split: model vs baselines\n\ndataset `{config.dataset}`, {n_params:,} model parameters"
              f"{mlp}, {train_seconds:.0f} s of training, best step {best_step}\n\n")
    (run_dir / "results.md").write_text(header + table + "\n", encoding="utf-8")


def _figures(trainer: EnergyTrainer, test: EmbeddingPairs, config: EnergyConfig, run_dir: Path,
             run_logger: RunLogger, step: int) -> None:
    proc = trainer.processor
    proc.eval()
    proc.record_paths = True
    try:
        with torch.no_grad():
            proc(test.src[: min(len(test), 64)].to(trainer.device))
        trace = proc.last_trace
    finally:
        proc.record_paths = False
    paths = {
        "figures/flow_paths": flow_paths_figure(trace, config, run_dir / "flow_paths.png"),
        "figures/landing": landing_figure(trace, config, run_dir / "landing.png"),
        "figures/flow_counts": flow_counts_figure(trace, run_dir / "flow_counts.png"),
    }
    run_logger.log_images(paths, step)
    run_logger.log_histograms({k: v.numpy() for k, v in landing_arrays(trace).items()}, step)
