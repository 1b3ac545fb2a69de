"""One training run end to end, as ``scripts/train.py`` runs it.

data -> deterministic split (saved) -> model -> :class:`EnergyTrainer` -> best state -> test metrics
-> baselines on the same split -> table, figures, metrics JSON, exported weights, W&B.

Run folder layout::

    RUN_DIR/config.yaml        resolved config
    RUN_DIR/split.json         the train / validation / test indices
    RUN_DIR/metrics.jsonl      every logged step
    RUN_DIR/checkpoints/       last.pt, best.pt (weights_only-loadable); best_prev.pt while an
                               improvement is newer than last.pt (see efgraph.training.trainer)
    RUN_DIR/results.json       test metrics of the model and the baselines, the validation metrics
                               of the selected state and of the last evaluation, the test dynamics
    RUN_DIR/results.md         the test metrics as a Markdown table
    RUN_DIR/test_pairs.npz     per test pair and model: cosine and R@1 hit (see metrics.save_pair_scores)
    RUN_DIR/flow_paths.png, RUN_DIR/landing.png, RUN_DIR/flow_counts.png, RUN_DIR/channels.png
    RUN_DIR/model/             model.safetensors + config.yaml (see efgraph.load_model)

Resuming (``resume=``): the checkpoint's own folder is continued in place, or with another
``run_dir`` *forked*: the new folder gets the old run's split, its metric rows up to the
checkpoint's step and its best state, and a new W&B run; nothing of the old folder changes. A
resume never rewinds a run in place (a checkpoint older than the folder's ``last.pt``, such as
``best.pt``, must be forked), and a fork never writes into a folder that holds another run.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from efgraph.config import RESUME_MUTABLE_KEYS, EnergyConfig
from efgraph.core.flow_processor import FlowProcessor
from efgraph.core.input_face import token_mask
from efgraph.core.trace import FlowTrace
from efgraph.data import (EmbeddingPairs, Split, load_bible_pairs, load_embedding_pairs, load_text_pairs,
                          make_composition_pairs, make_routing_pairs, make_teacher_pairs)
from efgraph.data.composition import composition_answers, composition_oracle
from efgraph.data.lookup import LookupBenchmark, lookup_benchmark, lookup_pairs
from efgraph.data.routing import routing_oracle
from efgraph.data._atomic import atomic_write, atomic_write_text
from efgraph.data.split import make_split, split_from_labels
from efgraph.data.text import TEXT_GROUP_FIELD, text_file_has_field
from efgraph.model_io import export_model
from efgraph.training.baselines import LearnedBaseline, fit_baselines, format_results_table, start_linear_skip_at_ridge
from efgraph.training.checkpoint import load_checkpoint
from efgraph.training.distributed import DistributedContext, init_distributed, local_device, shutdown_distributed
from efgraph.training.channels import channel_metrics, channels_figure
from efgraph.training.figures import flow_counts_figure, flow_paths_figure, landing_arrays, landing_figure
from efgraph.training.metrics import answer_accuracy, evaluate_predictions, pair_scores, save_pair_scores
from efgraph.training.run_logger import RunLogger, read_metric_rows, resolve_wandb_mode, write_metric_rows
from efgraph.training.signals import TrainingInterrupted
from efgraph.training.trainer import EnergyTrainer
from efgraph.utils.device import get_device
from efgraph.utils.logging import get_logger

logger = get_logger(__name__)


TEST_METRICS = ("cosine", "mse", "r_at_1")
# files whose presence means a folder holds (part of) a run: a fork must not write there
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "split.json", "results.json")
# what a new run must not find: it would append to those metrics, overwrite that checkpoint or
# results (config.yaml and split.json alone, from a run killed before its first checkpoint, are
# rewritten: a study restarts such a run in its folder)
RUN_DATA_FILES = ("checkpoints/last.pt", "metrics.jsonl", "results.json")


class RunInputError(ValueError):
    """What the user asked for cannot be run (config, data file, widths, resume target, folder).

    The message names the flag or field to change; ``scripts/train.py`` prints it as one line and
    exits with status 2. Errors while training are not wrapped: they keep their traceback.
    """


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
    entity: str | None = None  # None: W&B's default (WANDB_ENTITY or the API key's user)


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
    elif config.dataset == "routing":
        pairs = make_routing_pairs(config.synthetic_pairs, config.routing_slots, config.routing_token_dim,
                                   seed=config.data_seed, noise=config.routing_noise)
    elif config.dataset == "composition":
        pairs = make_composition_pairs(config.synthetic_pairs, config.composition_values, config.composition_tables,
                                       config.composition_chain, seed=config.data_seed,
                                       hold_out=config.composition_hold_out, identity=config.composition_identity)
    elif config.dataset == "lookup":
        pairs = lookup_pairs(lookup_data(config))
    elif config.dataset == "bible":
        pairs = load_bible_pairs(config.source_version, config.target_version, max_verses=limit, model=model,
                                 verses_per_book=config.verses_per_book or None, progress=progress)
    elif config.dataset == "pairs":
        pairs = load_embedding_pairs(config.data_path)
    else:
        # group by the file's group column, else by source text: rows that share a source never
        # sit on both sides of the split (see efgraph.data.text)
        has_group = text_file_has_field(config.data_path, TEXT_GROUP_FIELD)
        pairs = load_text_pairs(config.data_path, model=model, progress=progress,
                                group_field=TEXT_GROUP_FIELD if has_group else None, group_by_source=not has_group)
    if limit is not None and len(pairs) > limit:
        pairs = pairs.subset(list(range(limit)))
    if config.input_sequence and pairs.src_seq is None:
        raise ValueError(f"input_sequence: the model reads token sequences, but dataset {config.dataset!r} gives one "
                         f"vector a pair; give a pairs file with a sequence source (src [N, T, d] and mask) or set "
                         f"input_sequence: false")
    source_width = pairs.src_seq.shape[-1] if config.input_sequence else pairs.src_dim
    for key, side, width in (("input_dim", "source", source_width), ("output_dim", "target", pairs.tgt_dim)):
        if width != getattr(config, key):
            raise ValueError(f"{key}: config says {getattr(config, key)} but the {side} embeddings are "
                             f"{width} wide; set {key}: {width}")
    return pairs


@functools.lru_cache(maxsize=4)
def _lookup_data(seed: int, width: int) -> LookupBenchmark:
    return lookup_benchmark(seed=seed, d=width)


def lookup_data(config: EnergyConfig) -> LookupBenchmark:
    """``dataset: lookup``'s benchmark: tables and tokens fixed by ``data_seed``, tokens ``input_dim``
    wide (one per pair set and answer set of a run: made once)."""
    return _lookup_data(config.data_seed, config.input_dim)


def model_inputs(config: EnergyConfig, pairs: EmbeddingPairs) -> torch.Tensor:
    """What the model reads of ``pairs``: the token sequences (zero-padded, ``[N, T, d]``) with
    ``input_sequence``, else the source vectors ``[N, D_in]``."""
    return pairs.src_seq if config.input_sequence else pairs.src


def task_oracle(config: EnergyConfig, src: torch.Tensor) -> torch.Tensor | None:
    """The generator's own function on ``src [N, D_in]`` (the task's ceiling), for the generated
    tasks that have one (routing, composition); ``None`` for any other data."""
    if config.dataset == "routing":
        return routing_oracle(src, config.routing_slots, config.routing_token_dim, config.data_seed)
    if config.dataset == "composition":
        return composition_oracle(src, config.composition_values, config.composition_tables,
                                  config.composition_chain, config.data_seed, config.composition_identity)
    return None


def task_answers(config: EnergyConfig) -> torch.Tensor | None:
    """``[A, D_out]``: the finite set of answers the targets are drawn from (composition: the value
    embeddings), so that predictions are also scored as the nearest answer; ``None`` otherwise."""
    if config.dataset == "composition":
        return composition_answers(config.composition_values, config.composition_tables, config.composition_chain,
                                   config.data_seed)
    if config.dataset == "lookup":
        return lookup_data(config).answers
    return None


def score_predictions(config: EnergyConfig, pred: torch.Tensor, target: torch.Tensor,
                      groups: list[str] | None = None) -> dict[str, float]:
    """:func:`evaluate_predictions` (cosine, MSE, R@1), plus ``answer_accuracy`` on tasks with
    :func:`task_answers`: how every model of a run is scored on the test split. On
    ``dataset: lookup`` with the rows' ``groups`` (their chain lengths, ``"L7"``) also
    ``answer_accuracy_L<n>`` for each length."""
    metrics = {k: v for k, v in evaluate_predictions(pred, target).items() if k in TEST_METRICS}
    answers = task_answers(config)
    if answers is not None:
        metrics["answer_accuracy"] = answer_accuracy(pred, target, answers.to(pred.device))
        if config.dataset == "lookup" and groups is not None:
            for group in sorted(set(groups), key=lambda g: int(g[1:])):
                rows = torch.tensor([g == group for g in groups], device=pred.device)
                metrics[f"answer_accuracy_{group}"] = answer_accuracy(pred[rows], target[rows], answers.to(pred.device))
    return metrics


def make_run_split(config: EnergyConfig, pairs: EmbeddingPairs) -> Split:
    """Deterministic split; the data's own per-row ``split`` column when the pairs carry one (a
    pair file's, :func:`~efgraph.data.split.split_from_labels`), else by group (e.g. Bible book, or
    the source text of a text pair file) when the pairs carry groups (see :func:`describe_split`).

    Fixed by ``config.data_seed``, not ``config.seed``: runs that differ only in their model seed
    are scored on the same test pairs, so their spread is the model's and not the split's.
    """
    # (any rows with len() and groups: scripts/check_near_duplicates.py splits the raw verses so)
    if getattr(pairs, "split", None) is not None:  # the data's own split column wins over a random split
        logger.info("split: from the data's split column (val_fraction, test_fraction and data_seed not used)")
        return split_from_labels(pairs.split)
    fractions = (1.0 - config.val_fraction - config.test_fraction, config.val_fraction, config.test_fraction)
    return make_split(len(pairs), groups=pairs.groups, fractions=fractions, seed=config.data_seed)


def describe_split(config: EnergyConfig, pairs: EmbeddingPairs, split: Split) -> dict[str, Any]:
    """How the split was made, for the log, ``results.json`` and W&B: by group or by pair, the
    grouping, the group count and the data seed."""
    if config.dataset == "text":
        grouping = ("the file's group column" if text_file_has_field(config.data_path, TEXT_GROUP_FIELD)
                    else "source text")
    else:
        grouping = {"bible": "book", "pairs": "group (from the pair file)",
                    "composition": f"held-out {config.composition_hold_out}"}.get(config.dataset)
    info: dict[str, Any] = {"data_seed": config.data_seed, "train": len(split.train),
                            "validation": len(split.validation), "test": len(split.test)}
    if pairs.split is not None:
        info.update(by="the data's split column", groups=None)
    elif pairs.groups is None:
        info.update(by="pair", groups=None)
    else:
        info.update(by=grouping or "group", groups=len(set(pairs.groups)))
    return info


def baseline_options(config: EnergyConfig, num_train: int, num_parameters: int,
                     steps: int | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`~efgraph.training.baselines.fit_baselines` for a model trained
    with ``config`` on ``num_train`` pairs: the learned baselines of ``config.baseline_models``
    (MLP, Transformer) get the model's parameter count, optimizer steps (``steps``, default
    ``epochs`` whole epochs as EnergyTrainer counts them), batch size, learning rate, warm-up +
    cosine schedule, clipping, weight decay, loss and seed."""
    if steps is None:
        steps = config.epochs * math.ceil(num_train / config.batch_size)  # as EnergyTrainer counts them
    return dict(
        target_params=num_parameters, steps=steps, batch_size=config.batch_size, lr=config.learning_rate,
        seed=config.seed, mse_weight=config.mse_weight, cosine_weight=config.cosine_weight,
        weight_decay=config.weight_decay, weight_decay_on=config.weight_decay_on, eval_every=config.eval_every,
        residual=config.residual, warmup_steps=config.warmup_steps, grad_clip=config.grad_clip,
        learned=config.learned_baselines,
        transformer_tokens=config.transformer_tokens, transformer_layers=config.transformer_layers,
        transformer_heads=config.transformer_heads, transformer_width=config.transformer_width,
    )


def score_baselines(config: EnergyConfig, train: EmbeddingPairs, val: EmbeddingPairs, test: EmbeddingPairs,
                    num_parameters: int, *, steps: int | None = None, progress: bool = False,
                    ) -> tuple[list[Any], dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """Fit the baselines of ``config`` (:func:`baseline_options`) on ``train``, selecting on ``val``,
    and score them on ``test``: ``(baselines, {name: score_predictions}, {name: pair_scores})``."""
    baselines = fit_baselines((train.src, train.tgt), (val.src, val.tgt),
                              **baseline_options(config, len(train), num_parameters, steps=steps), progress=progress)
    results, per_pair = {}, {}
    for baseline in baselines:
        pred = baseline.predict(test.src)
        results[baseline.name] = {**score_predictions(config, pred, test.tgt, test.groups),
                                  "train_seconds": baseline.train_seconds_}
        per_pair[baseline.name] = pair_scores(pred, test.tgt)
    return baselines, results, per_pair


def run_training(config: EnergyConfig, run_dir: str | Path, *, wandb_mode: str = "auto", device: str | None = None,
                 resume: str | Path | None = None, progress: bool = True, total_steps: int | None = None,
                 stop_at_step: int | None = None, pairs: EmbeddingPairs | None = None, baselines: bool = True,
                 wandb_info: WandbRunInfo = WandbRunInfo()) -> RunOutcome:
    """Train, evaluate against baselines on the held-out test split, and write the run folder.

    Args:
        resume: a run folder (its ``checkpoints/last.pt``) or a checkpoint file to continue from;
            ``run_dir`` is its own folder (continue in place) or a new one (fork; see the module
            docstring).
        total_steps: the run's length in optimizer steps (default: ``config.epochs`` epochs; a
            resumed run keeps the length it was started with). The schedule spans it, the MLP
            baseline gets as many steps, and the run ends with the test and the baselines.
        stop_at_step: stop after this global step without testing (the schedule still spans the
            whole run), to continue later with ``resume``.
        pairs: the data, already loaded (as :func:`load_pairs` would load it for ``config``),
            e.g. by a study that trains many runs on it; ``None`` loads it here.
        baselines: fit and score the baselines on this run's split (a study fits them once per
            seed instead of once per run).
        wandb_info: W&B run name, group, job type, tags and entity.

    Raises:
        RunInputError: the config, the data, the resume target or ``run_dir`` cannot be run as
            asked (before any file of ``run_dir`` is written).
        TrainingInterrupted: SIGTERM, SIGINT or SIGUSR1 stopped training after a whole step, with
            ``checkpoints/last.pt`` written at it (see :mod:`efgraph.training.signals`); continue
            with ``resume=run_dir``.
    """
    run_dir = Path(run_dir)
    dev = get_device(device)
    ctx = init_distributed(dev)
    try:
        return _run(config, run_dir, local_device(dev, ctx), ctx, wandb_mode=wandb_mode, resume=resume,
                    progress=progress, total_steps=total_steps, stop_at_step=stop_at_step, pairs=pairs,
                    with_baselines=baselines, wandb_info=wandb_info)
    except TrainingInterrupted:
        # stopped by a signal (last.pt written): rank 0 has also finished its W&B run by now; no
        # rank exits (and has torchrun stop the others) before that
        ctx.barrier()
        raise
    finally:
        shutdown_distributed(ctx)


@dataclass(frozen=True)
class ResumePlan:
    """Where a resumed run comes from and what it writes to.

    ``checkpoint``: the file read; ``source_dir``: the run folder it belongs to; ``fork``: the run
    continues into another folder (nothing of ``source_dir`` is written); ``step``: its step.
    """

    checkpoint: Path
    source_dir: Path
    fork: bool
    step: int
    saved: dict[str, Any]


def checkpoint_run_dir(path: str | Path) -> Path:
    """The run folder of a checkpoint file (``RUN/checkpoints/x.pt`` -> ``RUN``), or the folder itself."""
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def plan_resume(resume: str | Path, run_dir: Path) -> ResumePlan:
    """Check that resuming ``resume`` into ``run_dir`` loses nothing, and say how it will be done.

    Raises:
        RunInputError: no checkpoint there; in place, a checkpoint older than the folder's
            ``last.pt`` (resuming it would rewind the run: truncate its metrics and overwrite
            ``last.pt``); as a fork, a ``run_dir`` that already holds files of a run.
    """
    path = _resolve_resume(resume)
    source = checkpoint_run_dir(path)
    try:
        saved = load_checkpoint(path)
        # a config saved by an older efgraph, read with the values that version computed with
        saved["config"] = EnergyConfig.from_saved(saved["config"], str(path)).to_dict()
    except ValueError as err:
        raise RunInputError(f"--resume: {err}") from None
    step = int(saved["step"])
    fork = run_dir.resolve() != source.resolve()
    if not fork:
        last = source / "checkpoints" / "last.pt"
        if last.exists() and last.resolve() != path.resolve():
            last_step = int(load_checkpoint(last)["step"])
            if step < last_step:
                raise RunInputError(
                    f"--resume: {path} is at step {step} but the run's last.pt is at step {last_step}; resuming it "
                    f"in place would rewind the run (drop its metrics after step {step}, overwrite last.pt). Fork it "
                    f"into a new folder instead: --resume {path} --output-dir NEW_FOLDER")
    else:
        taken = [name for name in RUN_FILES if (run_dir / name).exists()]
        if taken:
            raise RunInputError(
                f"--output-dir: {run_dir} already holds a run ({', '.join(taken)}); --resume {path} --output-dir DIR "
                f"continues that checkpoint into a new folder DIR and never writes into another run: choose a new or "
                f"empty folder, or leave out --output-dir to continue {source} in place")
    return ResumePlan(path, source, fork, step, saved)


def _fork_run_folder(plan: ResumePlan, run_dir: Path) -> None:
    """Start ``run_dir`` as the continuation of ``plan.source_dir`` at ``plan.step``: its split and
    its metric rows up to that step are copied (read only there); the trainer copies the best state."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if (plan.source_dir / "split.json").exists():
        atomic_write(run_dir / "split.json", lambda tmp: shutil.copyfile(plan.source_dir / "split.json", tmp))
    source_metrics = plan.source_dir / "metrics.jsonl"
    write_metric_rows(run_dir / "metrics.jsonl", read_metric_rows(source_metrics, plan.step)
                      if source_metrics.exists() else [])
    logger.info("fork: %s continues %s from step %d (split, metrics up to that step and the best state copied; "
                "a new W&B run)", run_dir, plan.checkpoint, plan.step)


def _run(config: EnergyConfig, run_dir: Path, dev: torch.device, ctx: DistributedContext, *, wandb_mode: str,
         resume: str | Path | None, progress: bool, total_steps: int | None, stop_at_step: int | None,
         pairs: EmbeddingPairs | None, with_baselines: bool, wandb_info: WandbRunInfo) -> RunOutcome:
    if total_steps is not None and total_steps < 1:
        raise RunInputError(f"--max-steps: must be >= 1, got {total_steps}")
    if stop_at_step is not None and stop_at_step < 1:
        raise RunInputError(f"--stop-at-step: must be >= 1, got {stop_at_step}")
    # every check of the user's input comes before the first write into run_dir
    plan = plan_resume(resume, run_dir) if resume is not None else None
    if plan is not None:
        _check_resume_config(plan.saved["config"], config)
        saved_total = (plan.saved.get("extra") or {}).get("total_steps")
        if total_steps is not None and saved_total is not None and total_steps != saved_total:
            raise RunInputError(f"--max-steps: the run was started with {saved_total} steps, its schedule spans "
                                f"them; resume without --max-steps (or with --max-steps {saved_total})")
        total_steps = total_steps if total_steps is not None else saved_total
    elif ctx.is_main:
        # a new run into a folder with files of another run would mix their metrics.jsonl rows
        taken = [name for name in RUN_DATA_FILES if (run_dir / name).exists()]
        if taken:
            raise RunInputError(f"--output-dir: {run_dir} already holds a run ({', '.join(taken)}); continue it with "
                                f"--resume {run_dir}, or choose another folder")

    pairs = _load_pairs_ranked(config, ctx, progress) if pairs is None else pairs
    split_path = (plan.source_dir if plan is not None else run_dir) / "split.json"
    if plan is not None and split_path.exists():
        split = Split.from_json(split_path)  # a resumed run keeps its split, whatever the seed says
    else:
        split = make_run_split(config, pairs)
    try:
        train, val, test = split.apply(pairs)
    except ValueError as err:
        raise RunInputError(f"--resume: the run's split.json does not fit the data: {err}") from None
    if val is None or test is None:
        raise RunInputError("val_fraction, test_fraction: the split left the validation or test part empty")
    split_info = describe_split(config, pairs, split)
    total = total_steps if total_steps is not None else config.epochs * math.ceil(len(train) / config.batch_size)

    if ctx.is_main:
        if plan is not None and plan.fork:
            _fork_run_folder(plan, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if plan is None or not (run_dir / "split.json").exists():  # a new run replaces a stale one
            split.to_json(run_dir / "split.json")
    seed_everything(config.seed)
    model = FlowProcessor.from_config(config)
    if config.linear_skip_init == "ridge" and plan is None:  # a resumed run loads its W instead
        start_linear_skip_at_ridge(model, config, train.src, train.tgt, val.src, val.tgt)
    n_params = sum(p.numel() for p in model.parameters())
    run_logger = RunLogger(None)
    mode = "disabled"
    if ctx.is_main:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        # a fork is a new W&B run: resuming the source's run id would log into the other run
        run_id = (plan.saved.get("extra") or {}).get("wandb_id") if plan is not None and not plan.fork else None
        mode = resolve_wandb_mode(wandb_mode)
        tags = tuple(wandb_info.tags) + (("fork",) if plan is not None and plan.fork else ())
        run_logger = RunLogger.create(
            run_dir, mode=mode, project=config.wandb_project, run_id=run_id, name=wandb_info.name or run_dir.name,
            config={**config.to_dict(), "num_parameters": n_params, "train_pairs": len(train),
                    "val_pairs": len(val), "test_pairs": len(test), "world_size": ctx.world_size,
                    "total_steps": total, "split": split_info,
                    **({"forked_from": str(plan.checkpoint)} if plan is not None and plan.fork else {})},
            group=wandb_info.group, job_type=wandb_info.job_type, tags=tags, entity=wandb_info.entity,
        )
        if plan is not None and not plan.fork:
            run_logger.truncate_after(plan.step)
        logger.info("run %s: %d train / %d val / %d test pairs, split %s, %s parameters, %d steps, %d process(es), "
                    "wandb %s", run_dir, len(train), len(val), len(test), _say_split(split_info), f"{n_params:,}",
                    total, ctx.world_size, mode)
    try:
        trainer = EnergyTrainer(model, config, device=dev, run_dir=run_dir, run_logger=run_logger,
                                progress=progress, distributed=ctx)
        start = time.perf_counter()
        result = trainer.train(model_inputs(config, train), train.tgt, val_inputs=model_inputs(config, val),
                               val_targets=val.tgt,
                               resume_from=plan.checkpoint if plan is not None else None,
                               max_steps=stop_at_step, total_steps=total)
        train_seconds = time.perf_counter() - start
        if result.steps < total or not ctx.is_main:  # stopped on purpose, or not the reporting rank
            return RunOutcome(run_dir, {}, "")
        # the state selected on validation; it is in best.pt too (the trainer keeps them in step)
        if result.best_step is not None and not trainer.restore_best():
            raise RuntimeError(f"internal: best step {result.best_step} has no saved state; refusing to test "
                               "the last state under its name")
        # the test split is read once, by the selected state; nothing below chooses anything on it
        # at test_depth: the same parameters at a deeper lattice (the test asks for more steps)
        tested = trainer.processor.at_depth(config.test_depth) if config.test_depth else trainer.processor
        test_metrics, test_pred = trainer.evaluate_with_predictions(model_inputs(config, test), test.tgt, model=tested)
        results: dict[str, dict[str, float]] = {"energy-flow": {
            **score_predictions(config, test_pred, test.tgt, test.groups), "train_seconds": train_seconds}}
        per_pair = {"energy-flow": pair_scores(test_pred, test.tgt)}
        fitted: dict[str, Any] = {}
        if with_baselines:
            logger.info("baselines: identity, ridge (alpha chosen on validation) and %s with %s parameters "
                        "trained for %d steps", ", ".join(config.learned_baselines) or "no learned one",
                        f"{n_params:,}", total)
            baselines, baseline_results, baseline_pairs = score_baselines(config, train, val, test, n_params,
                                                                          steps=total, progress=progress)
            results.update(baseline_results)
            per_pair.update(baseline_pairs)
            fitted = {baseline.name: baseline_record(baseline) for baseline in baselines}
        save_pair_scores(run_dir / "test_pairs.npz", per_pair)
        table = format_results_table(results)
        channels = _figures(tested, trainer.device, test, config, run_dir, run_logger, result.steps)
        run_logger.log_table("test/results", ["model", "cosine", "mse", "r_at_1"],
                             [[name, r["cosine"], r["mse"], r["r_at_1"]] for name, r in results.items()], result.steps)
        for name, record in fitted.items():
            if record.get("val_curve"):
                run_logger.log_table(f"baselines/{name}/val_curve", ["step", "val_loss"], record["val_curve"],
                                     result.steps)
        evaluations = {e["step"]: e for e in result.evaluations}
        selected = evaluations.get(result.best_step) if result.best_step is not None else None
        run_logger.log_summary({
            **{f"test/{name}/{k}": v for name, r in results.items() for k, v in r.items()},
            "best/step": result.best_step,
            "run/cpu_threads": trainer.num_threads,
            **({f"best/val_{k}": v for k, v in selected.items() if k != "step"} if selected else {}),
            **{f"baselines/{name}/{k}": v for name, record in fitted.items() for k, v in record.items()
               if k != "val_curve" and v is not None},
        })
        export_model(trainer.processor, run_dir / "model")
        artifact_name = wandb_info.name or run_dir.name
        run_logger.log_artifact(run_dir / "model", name=f"{artifact_name}-model", kind="model",
                                metadata={"best_step": result.best_step, "num_parameters": n_params,
                                          **{f"test_{k}": v for k, v in results["energy-flow"].items()}})
        run_logger.log_artifact(run_dir / "split.json", name=f"{artifact_name}-split", kind="split",
                                metadata=split_info)
        # written last: a run folder with results.json is complete (a study skips it on a rerun)
        _write_report(run_dir, config, results, table, n_params, train_seconds, result.best_step, extra={
            # validation metrics of the state the test scores (model selection happens here only);
            # None only for a run resumed from a checkpoint older than the saved validation history
            "validation": selected,
            # the evaluation at the last step: with flows_arrived_per_sample 0 the run ended dead
            "final_validation": evaluations.get(total),
            "test_dynamics": {**{k: v for k, v in test_metrics.items() if k.startswith("flows_")},
                              **{k.replace("/", "_"): v for k, v in channels.items()}},
            "total_steps": total,
            "cpu_threads": trainer.num_threads,  # torch threads the run trained with (config num_threads)
            "split": split_info,
            # how each baseline was fitted: ridge alpha and its validation losses, MLP width and curve
            "baselines": fitted,
        })
        return RunOutcome(run_dir, results, table)
    finally:
        run_logger.finish()
        if ctx.is_main and mode == "offline":
            logger.info("W&B run saved offline in %s; upload it with: wandb sync %s", run_dir / "wandb",
                        " ".join(str(p) for p in sorted((run_dir / "wandb").glob("offline-run-*"))[-1:]) or run_dir)


def _say_split(info: dict[str, Any]) -> str:
    how = ("by pair" if info["by"] == "pair" else f"by {info['by']}" if info["groups"] is None
           else f"by {info['by']} ({info['groups']} groups)")
    return f"{how}, data_seed {info['data_seed']}"


def baseline_record(baseline: Any) -> dict[str, Any]:
    """What was chosen while fitting a baseline: ridge ``alpha`` (and the validation loss of each
    alpha tried); for a learned one its sizes (MLP ``hidden_dim``; Transformer ``tokens``,
    ``width``, ``layers``, ``heads``), ``num_parameters``, ``best_step`` and ``val_curve``
    (``[[step, validation loss], ...]``)."""
    record: dict[str, Any] = {}
    if hasattr(baseline, "alpha_"):
        record["alpha"] = baseline.alpha_
        record["alpha_val_losses"] = {str(a): v for a, v in getattr(baseline, "val_losses_", {}).items()}
    if isinstance(baseline, LearnedBaseline):
        record.update(baseline.shape())
        record["num_parameters"] = baseline.num_parameters
        record["best_step"] = baseline.best_step_
        record["val_curve"] = [[int(step), float(loss)] for step, loss in baseline.history_]
    return record


def _load_pairs_ranked(config: EnergyConfig, ctx: DistributedContext, progress: bool) -> EmbeddingPairs:
    """Load the pairs on every rank, embedding each text set once where the cache allows.

    Rank 0 embeds (with all cores, see efgraph.data.embed) and fills the cache; then the first
    rank of each other node (a cache that is not shared across nodes misses there); then the
    others read their node's cache. With ``EFGRAPH_CACHE_DIR`` on a filesystem every node sees,
    only rank 0 embeds.
    """
    def load(show: bool) -> EmbeddingPairs:
        try:
            return load_pairs(config, progress=show)
        except (ValueError, FileNotFoundError) as err:  # a bad data file or width: the user's to fix
            raise RunInputError(str(err)) from None

    pairs = load(progress) if ctx.is_main else None
    ctx.barrier()
    if pairs is None and ctx.local_rank == 0:
        pairs = load(False)
    ctx.barrier()
    return pairs if pairs is not None else load(False)


def config_changes(saved: dict[str, Any], config: EnergyConfig, saved_as: str, now_as: str) -> list[str]:
    """``"key: <saved_as> <saved value>, <now_as> <value>"`` for every field of ``config`` outside
    ``RESUME_MUTABLE_KEYS`` (the logging-type fields a continued run may change) that differs."""
    return [f"{k}: {saved_as} {saved.get(k)!r}, {now_as} {v!r}" for k, v in config.to_dict().items()
            if k not in RESUME_MUTABLE_KEYS and saved.get(k) != v]


def _check_resume_config(saved: dict[str, Any], config: EnergyConfig) -> None:
    """A resumed run must be the same run: only logging-type fields may change."""
    changed = config_changes(saved, config, "run has", "now")
    if changed:
        raise RunInputError("--resume: the config differs from the run's, so it would not continue the same run "
                         "(resume without --config/--set to use the run's own config): " + "; ".join(changed))


def _resolve_resume(resume: str | Path) -> Path:
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.exists():
        raise RunInputError(f"--resume: no checkpoint at {path}")
    return path


def _write_report(run_dir: Path, config: EnergyConfig, results: dict[str, dict[str, float]], table: str,
                  n_params: int, train_seconds: float, best_step: int | None, extra: dict[str, Any]) -> None:
    payload: dict[str, Any] = {"test": results, "num_parameters": n_params, "train_seconds": train_seconds,
                               "best_step": best_step, "dataset": config.dataset, **extra}
    # atomic: a study takes an existing results.json as a finished run, so it must never be half written
    atomic_write_text(run_dir / "results.json", json.dumps(payload, indent=2) + "\n")
    mlp = " (each learned baseline has as many)" if config.learned_baselines and len(results) > 1 else ""
    header = (f"# Test split: model vs baselines\n\ndataset `{config.dataset}`, {n_params:,} model parameters"
              f"{mlp}, {train_seconds:.0f} s of training, best step {best_step}\n\n")
    atomic_write_text(run_dir / "results.md", header + table + "\n")


def _traced(proc: FlowProcessor, x: torch.Tensor) -> FlowTrace:
    """The trace, with every flow's path, of an evaluation forward of ``proc`` on ``x`` (a zero-padded
    token sequence with ``input_sequence``)."""
    proc.eval()
    proc.record_paths = True
    try:
        with torch.no_grad():
            proc(x, token_mask(x)) if proc.config.input_sequence else proc(x)
        return proc.last_trace
    finally:
        proc.record_paths = False


def _figures(model: FlowProcessor, device: torch.device, test: EmbeddingPairs, config: EnergyConfig, run_dir: Path,
             run_logger: RunLogger, step: int) -> dict[str, float]:
    """The run's figures from one traced forward of the tested ``model`` over (up to 64) test pairs
    (and, for the flow paths, the same forward of the untrained model of ``config.seed``); returns
    the channel metrics of the trained forward (:mod:`efgraph.training.channels`)."""
    x = model_inputs(config, test)[: min(len(test), 64)].to(device)
    trace = _traced(model, x)
    seed, config = config.seed, model.config  # at test_depth: the figures draw the lattice that was tested
    with torch.random.fork_rng(devices=[]):  # the untrained model of this seed, beside the trained one
        torch.manual_seed(seed)
        untrained = FlowProcessor.from_config(config).to(device)
    rows = {f"untrained (seed {seed})": _traced(untrained, x), "trained (the selected state)": trace}
    paths = {
        "figures/flow_paths": flow_paths_figure(rows, config, run_dir / "flow_paths.png"),
        "figures/landing": landing_figure(trace, config, run_dir / "landing.png"),
        "figures/flow_counts": flow_counts_figure(trace, run_dir / "flow_counts.png"),
    }
    channels: dict[str, float] = {}
    if trace.total_arrived:  # a dead lattice has no channels to draw
        paths["figures/channels"] = channels_figure(trace, config, run_dir / "channels.png")
        channels = channel_metrics(trace, config)
        run_logger.log_summary({f"test/{k}": v for k, v in channels.items()})
    run_logger.log_images(paths, step)
    run_logger.log_histograms({k: v.numpy() for k, v in landing_arrays(trace).items()}, step)
    return channels
