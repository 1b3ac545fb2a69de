"""`Trainer`: the one training loop, for the lattice and for the learned baselines.

    trainer = Trainer(model, TrainingConfig(batch_size=64, learning_rate=1e-3))
    trainer.train(inputs, targets, total_steps=1000, val_inputs=vx, val_targets=vy)

Any model that maps a batch of inputs to ``[B, D_out]`` predictions trains here: AdamW (the
weight-decay recipe of :mod:`efgraph.training.optim`), linear warm-up then cosine decay, gradient
clipping, loss = ``mse_weight * MSE + cosine_weight * (1 - cos)``
(:func:`~efgraph.training.metrics.embedding_loss`). With validation data it evaluates every
``eval_every`` steps and at the last one and keeps the best state; with a run folder it writes
``checkpoints/last.pt`` every ``checkpoint_every`` steps and ``checkpoints/best.pt`` on improvement.
:class:`~efgraph.training.trainer.EnergyTrainer` is this loop with the lattice's hooks (memory
plan, flow budget, flow traces, learning diagnostics, dead-run alarm); a learned baseline
(:class:`~efgraph.training.baselines.LearnedBaseline`) runs it as it is.

Inputs are a ``[N, ...]`` tensor or a tuple of row-aligned tensors (a sequence peer's ``(x [N, T, d],
mask [N, T])``), given to the model as ``model(*inputs)``; targets are ``[N, D_out]``.

Resumability: the batch order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so a run
restored from a checkpoint at step ``s`` draws exactly the batches the uninterrupted run would
have drawn, and ends with the same parameters.

Best state across a crash: ``best.pt`` can be written after the last ``last.pt`` (an improvement
between two checkpoints), and a run resumed from ``last.pt`` then needs the best state *that
``last.pt`` knows*, not the newer one. So before ``best.pt`` is overwritten while the latest
``last.pt`` still refers to it, it is moved to ``checkpoints/best_prev.pt``; the next ``last.pt``
makes it obsolete (deleted). :meth:`Trainer.load_checkpoint` picks whichever of the two holds the
checkpoint's ``best_step`` and puts it back as this run's ``best.pt``, so the tested state,
``best.pt`` and the exported model always agree.

A non-finite loss or gradient stops training with ``FloatingPointError`` naming the step and what
went bad first, after writing ``checkpoints/last_good.pt`` (the parameters before that step); with
``skip_nonfinite_steps`` the step's update is dropped instead and counted in ``train/skipped_steps``.

Signals (:mod:`efgraph.training.signals`): SIGTERM, SIGINT and SIGUSR1 received while
:meth:`Trainer.train` runs stop it after the current optimizer step, with ``last.pt`` written at
that step; with several processes the stop is agreed in the step's all-reduce, so every rank stops
after the same step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from efgraph.config import TrainingConfig
from efgraph.data._atomic import atomic_write
from efgraph.data.pairs import check_embedding_pair
from efgraph.training.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from efgraph.training.distributed import SINGLE_PROCESS, DistributedContext
from efgraph.training.metrics import embedding_loss, evaluate_predictions
from efgraph.training.optim import adamw
from efgraph.training.run_logger import RunLogger
from efgraph.training.schedule import warmup_cosine_scheduler
from efgraph.training.signals import STOP_SIGNALS, StopRequest, TrainingInterrupted, signal_name
from efgraph.utils.device import get_device, memory_report
from efgraph.utils.logging import get_logger

logger = get_logger(__name__)

Inputs = Tensor | tuple[Tensor, ...]
"""A batch of model inputs: ``[N, ...]``, or row-aligned tensors given as ``model(*inputs)``."""

# the validation metrics the console shows each time they are computed: (key, name, format)
_CONSOLE_VAL = (("loss", "loss", ".4f"), ("cosine", "cosine", ".4f"), ("mse", "mse", ".4g"), ("r_at_1", "r@1", ".3f"),
                ("flows_arrived_per_sample", "arrived/sample", ".2f"))


def rows(inputs: Inputs, idx: Tensor | slice) -> Inputs:
    """Rows ``idx`` of every tensor of ``inputs``."""
    return tuple(t[idx] for t in inputs) if isinstance(inputs, tuple) else inputs[idx]


def num_rows(inputs: Inputs) -> int:
    return (inputs[0] if isinstance(inputs, tuple) else inputs).size(0)


def _cut(inputs: Inputs, cut: Callable[[Tensor], Sequence[Tensor]]) -> list[Inputs]:
    """``inputs`` in row blocks, each tensor cut by ``cut`` (e.g. ``lambda t: t.split(size)``)."""
    if isinstance(inputs, tuple):
        return list(zip(*(cut(t) for t in inputs)))
    return list(cut(inputs))


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` did."""

    steps: int
    best_step: int | None
    best_val_loss: float | None
    evaluations: list[dict[str, float]] = field(default_factory=list)
    last_train_loss: float | None = None


class Trainer:
    """Trains ``model`` on (input, target embedding) pairs; see the module docstring.

    Args:
        model: maps a batch of inputs to ``[B, D_out]``.
        training: optimizer, schedule, batches, loss weights, intervals.
        device: where to train (default: CUDA when available).
        run_dir: folder for ``checkpoints/`` and ``metrics.jsonl`` (``None``: keep nothing on disk).
        run_logger: where metrics go (default: a :class:`RunLogger` on ``run_dir``).
        progress: show a progress bar with the loss.
        distributed: the rank and world size under ``torchrun`` (see
            :mod:`efgraph.training.distributed`); only rank 0 logs, evaluates and writes files.
        micro_batch_size: rows per forward + backward on this process (default: its whole share
            of a batch); the gradients of a batch's micro-batches add up to the batch's.
        eval_batch_size: rows per forward when evaluating (default ``max(batch_size, 64)``).
        name: what the progress bar calls the run.
    """

    def __init__(self, model: nn.Module, training: TrainingConfig, *, device: str | torch.device | None = None,
                 run_dir: str | Path | None = None, run_logger: RunLogger | None = None, progress: bool = True,
                 distributed: DistributedContext = SINGLE_PROCESS, micro_batch_size: int | None = None,
                 eval_batch_size: int | None = None, name: str = "train") -> None:
        self.training = training
        self.dist = distributed
        if distributed.enabled and training.skip_nonfinite_steps:
            # a skipped step would leave DDP's gradient reduction half done on the healthy ranks
            raise ValueError("skip_nonfinite_steps: not supported with several processes; a non-finite "
                             "step stops all ranks (after rank 0 writes last_good.pt)")
        self.device = device if isinstance(device, torch.device) else get_device(device)
        self.micro_batch_size = micro_batch_size or math.ceil(training.batch_size / distributed.world_size)
        self.eval_batch_size = eval_batch_size or max(training.batch_size, 64)
        self.name = name
        self.module = model.to(self.device)  # the model itself; `model` is what runs it (DDP or itself)
        self.model: nn.Module = self.module
        if distributed.enabled:
            # find_unused_parameters: a lattice step without spawns (or arrivals) leaves some heads unused
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.optimizer = adamw(self.module, training.learning_rate, training.weight_decay, training.weight_decay_on)
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.run_dir = Path(run_dir) if run_dir is not None and distributed.is_main else None
        if self.run_dir is not None:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.run_logger = run_logger if run_logger is not None else RunLogger(self.run_dir)
        self.progress = progress and distributed.is_main
        self.step = 0
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self._best_state: dict[str, Tensor] | None = None
        self._best_settings: dict[str, Any] = {}  # what the model ran under when its best state was evaluated
        self.evaluations: list[dict[str, float]] = []
        self._steps_per_epoch = 0
        self.skipped_steps = 0
        self.total_steps: int | None = None  # the run's length (the schedule's span), set by train()
        # best.pt bookkeeping (see the module docstring): the step of the state in best.pt, and
        # the best_step recorded in the latest last.pt
        self._best_file_step: int | None = None
        self._last_ckpt_best_step: int | None = None

    # ---- hooks: what a model that needs more than a forward adds (EnergyTrainer) -----------------
    def _check_pairs(self, inputs: Inputs, targets: Tensor, what: str) -> None:
        """Inputs and targets are finite pairs: ``[N, D_in]`` and ``[N, D_out]`` (a tuple of
        inputs: row-aligned with the targets; its owner checks the rest)."""
        if isinstance(inputs, tuple):
            if any(t.size(0) != targets.size(0) for t in inputs):
                raise ValueError(f"{what} inputs: every tensor needs the targets' {targets.size(0)} rows")
            return
        check_embedding_pair(inputs, targets, (f"{what} inputs", f"{what} targets"))

    def _forward(self, model: nn.Module, inputs: Inputs) -> Tensor:
        """``model``'s prediction ``[B, D_out]`` for a batch."""
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)

    def _on_train_start(self, inputs: Inputs) -> None:
        """Before the first step of :meth:`train`."""

    def _begin_batch(self, log: bool) -> None:
        """Before the forwards of a training step (``log``: its metrics are logged)."""

    def _forward_done(self) -> None:
        """After each successful training forward (one per micro-batch)."""

    def _end_forwards(self) -> None:
        """After the forwards of a training step, whatever happened in them."""

    def _batch_counts(self) -> list[float]:
        """Host numbers of this rank's batch to sum over the ranks."""
        return []

    def _after_batch(self, counts: list[float], bad: str | None, complete: bool, global_batch: int) -> None:
        """After the backward, before the update: ``counts`` summed over the ranks, ``bad`` what
        went non-finite (``None``: nothing), ``complete`` whether every forward of this rank ran."""

    def _after_update(self) -> None:
        """After the optimizer's step."""

    def _step_metrics(self, log: bool, bad: str | None, counts: list[float], elapsed: float,
                      global_batch: int) -> dict[str, float]:
        """The model's own metrics of a training step."""
        return {}

    def _after_step(self, metrics: dict[str, float]) -> None:
        """After a step is counted, before it is logged (may add to ``metrics``)."""

    def _progress(self, metrics: dict[str, float]) -> dict[str, str]:
        """The progress bar's fields."""
        return {"loss": f"{metrics['train/loss']:.4f}"}

    def _eval_batch_summary(self, model: nn.Module) -> Any:
        """What an evaluation keeps of a batch's forward, for :meth:`_eval_metrics`."""
        return None

    def _eval_metrics(self, summaries: list[Any], sizes: list[int]) -> dict[str, float]:
        """An evaluation's own metrics from its batches' summaries and sizes."""
        return {}

    def _settings(self) -> dict[str, Any]:
        """How the model runs beyond its parameters (kept with the best state and in checkpoints)."""
        return {}

    def _apply_settings(self, settings: dict[str, Any]) -> None:
        """Run the model under ``settings`` (from :meth:`_settings`)."""

    def _config_dict(self) -> dict[str, Any]:
        """The config a checkpoint keeps."""
        return dataclasses.asdict(self.training)

    def _optimizer_state_of(self, ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
        """A checkpoint's optimizer state, after checking it belongs to this run."""
        return ckpt["optimizer"]

    def _load_run_state(self, extra: dict[str, Any]) -> None:
        """The model's own part of a checkpoint's run state."""

    # ---- batches ---------------------------------------------------------------------------------
    def steps_per_epoch(self, num_pairs: int) -> int:
        return math.ceil(num_pairs / self.training.batch_size)

    def batch_order(self, num_pairs: int, epoch: int) -> Tensor:
        """The permutation of epoch ``epoch``: a function of (seed, epoch) only, so resumable."""
        gen = torch.Generator().manual_seed(self.training.seed * 1_000_003 + epoch)
        return torch.randperm(num_pairs, generator=gen)

    # ---- training --------------------------------------------------------------------------------
    def train(self, input_embeddings: Inputs, target_embeddings: Tensor, epochs: int | None = None, *,
              val_inputs: Inputs | None = None, val_targets: Tensor | None = None,
              resume_from: str | Path | None = None, max_steps: int | None = None,
              total_steps: int | None = None) -> TrainResult:
        """Train until the end of epoch ``epochs`` (default ``training.epochs``) over the pairs.

        The step count is the trainer's: a second call with a larger ``epochs`` continues the
        same run where the first one stopped.

        Args:
            input_embeddings: ``[N, ...]`` inputs; target_embeddings: ``[N, D_out]``.
            val_inputs, val_targets: validation pairs for evaluation and best-state selection.
            resume_from: a checkpoint of this run to continue from (same step count, same batches).
            max_steps: stop after this global step (the schedule still spans all epochs), e.g.
                to time-box a run and resume it later.
            total_steps: the run's length in optimizer steps, instead of ``epochs`` whole epochs
                (the schedule spans it and the last evaluation happens at it; batches continue
                the epoch order, so it may end mid-epoch or run past ``epochs``).
        """
        self._check_pairs(input_embeddings, target_embeddings, "train")
        has_val = val_inputs is not None or val_targets is not None
        if has_val:
            if val_inputs is None or val_targets is None:
                raise ValueError("val_inputs, val_targets: give both or neither")
            self._check_pairs(val_inputs, val_targets, "validation")
        cfg = self.training
        epochs = cfg.epochs if epochs is None else epochs
        if epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {epochs}")
        n = num_rows(input_embeddings)
        world, bs = self.dist.world_size, cfg.batch_size
        if world > 1 and (bs < world or 0 < n % bs < world):
            raise ValueError(f"batch_size: every batch must give each of the {world} ranks a sample; "
                             f"batch_size {bs} with {n} pairs leaves a last batch of {n % bs or bs}")
        per_epoch = self._steps_per_epoch = self.steps_per_epoch(n)
        total = epochs * per_epoch if total_steps is None else total_steps
        if total < 1:
            raise ValueError(f"total_steps: must be >= 1, got {total}")
        self.total_steps = total
        # A later call on the same trainer continues its run (same step count, schedule stretched
        # to the new total); a resumed run takes step and schedule from the checkpoint.
        self.scheduler = warmup_cosine_scheduler(self.optimizer, cfg.warmup_steps, total,
                                                 current_step=0 if resume_from is not None else self.step)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        stop = total if max_steps is None else min(total, max_steps)
        if self.step >= stop:
            logger.warning("train: already at step %d of %d (epochs=%d); nothing to do", self.step, stop, epochs)
        self._on_train_start(input_embeddings)
        bar = tqdm(total=stop, initial=self.step, disable=not self.progress, desc=self.name, dynamic_ncols=True)
        last_loss: float | None = None
        # train/loss is logged as the mean over the steps since the previous log row, not the
        # noisy loss of the one step that happens to land on the log grid
        loss_sum, loss_count = 0.0, 0
        # SIGTERM / SIGINT / SIGUSR1 ask for a stop after the current step (efgraph.training.signals);
        # the handlers are installed for this loop only and restored in the finally below
        self._stop_request, self._step_stop_signal, saved_at = StopRequest().__enter__(), None, None
        try:
            order_epoch, order = -1, None
            while self.step < stop:
                epoch, within = divmod(self.step, per_epoch)
                if epoch != order_epoch:
                    order_epoch, order = epoch, self.batch_order(n, epoch)
                idx = order[within * bs : (within + 1) * bs]
                logs = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == stop
                metrics = self.train_step(rows(input_embeddings, idx), target_embeddings[idx], log=logs)
                self.step += 1
                self._after_step(metrics)
                last_loss = metrics["train/loss"]
                if math.isfinite(last_loss):  # a skipped non-finite step is counted in train/skipped_steps
                    loss_sum, loss_count = loss_sum + last_loss, loss_count + 1
                bar.update(1)
                bar.set_postfix(self._progress(metrics))
                if self.step % cfg.log_every == 0 or self.step == stop:
                    metrics["train/loss_last"] = last_loss
                    metrics["train/loss"] = loss_sum / loss_count if loss_count else float("nan")
                    loss_sum, loss_count = 0.0, 0
                    self.run_logger.log({**metrics, "train/epoch": epoch + (within + 1) / per_epoch}, self.step)
                # evaluate on the eval grid and at the very end; not at a --max-steps stop, so that a
                # stopped-and-resumed run selects its best state from the same evaluations
                if has_val and self.dist.is_main and (self.step % cfg.eval_every == 0 or self.step == total):
                    self._evaluate_and_keep_best(val_inputs, val_targets)
                if self.run_dir is not None and (self.step % cfg.checkpoint_every == 0 or self.step == stop):
                    self._save_last()
                    saved_at = self.step
                if self._stop_signal(after_loop=False) is not None:
                    break
            signum = self._stop_signal(after_loop=True)
            if signum is not None:
                self._stop_on_signal(signum, saved=saved_at == self.step)
        finally:
            self._stop_request.restore()
            self._stop_request = None
            bar.close()
        return TrainResult(self.step, self.best_step, self.best_val_loss, list(self.evaluations), last_loss)

    def train_step(self, inputs: Inputs, targets: Tensor, *, log: bool = True) -> dict[str, float]:
        """One optimisation step on a (global) batch; returns its metrics.

        The batch runs in micro-batches of :attr:`micro_batch_size` rows, each forward followed by
        its backward, so that only one micro-batch's activations are alive; each micro-batch's
        loss is weighted by its share of the batch's rows, so the accumulated gradient is the
        whole batch's (the loss is a mean over rows), and the optimizer steps once. ``log``: the
        step's metrics are logged (the model's hooks may summarise more then).
        """
        self.model.train()
        start = time.perf_counter()
        global_batch = targets.size(0)
        world = self.dist.world_size
        if self.dist.enabled:  # this rank's slice; the loss is scaled so DDP's mean is the global mean
            inputs = _cut(inputs, lambda t: t.tensor_split(world))[self.dist.rank]
            targets = targets.tensor_split(world)[self.dist.rank]
        inputs, targets = self._to_device(inputs), self._to_device(targets)
        size = self.micro_batch_size
        chunks = list(zip(_cut(inputs, lambda t: t.split(size)), targets.split(size)))
        bad: str | None = None
        preds: list[Tensor] = []  # detached, for naming a non-finite output
        loss_sum: Tensor | None = None  # sum of the weighted micro-batch losses (the batch's loss, x world)
        counts: list[float] = []
        grad_norm = float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        self._begin_batch(log)
        try:
            for i, (x, y) in enumerate(chunks):
                last = i == len(chunks) - 1
                # DDP: gradients are reduced across ranks once, in the last micro-batch's backward
                accumulate = self.model.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
                with accumulate:
                    loss: Tensor | None = None
                    if bad is None:
                        try:
                            with self._autocast():
                                pred = self._forward(self.model, x).float()
                        except FloatingPointError as err:  # NaN/inf inside the forward: handled like a NaN loss
                            bad = str(err)
                        else:
                            preds.append(pred.detach())
                            self._forward_done()
                            # embedding_loss is a mean over rows: weighted by the rows' share of the global batch
                            weight = y.size(0) * world / global_batch
                            loss = embedding_loss(pred, y, self.training.mse_weight,
                                                  self.training.cosine_weight) * weight
                            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
                    if last:
                        counts = self._batch_counts()
                        if self.dist.enabled:
                            bad, counts = self._agree_across_ranks(bad, loss_sum, counts)
                            if bad is None and not math.isfinite(self._loss_value):
                                bad = f"loss is {self._loss_value}"
                    if loss is not None and bad is None:
                        loss.backward()
        finally:
            self._end_forwards()
        if self.dist.enabled:
            loss_value = self._loss_value
        else:
            loss_value = loss_sum.item() if loss_sum is not None else float("nan")
            if bad is None and not math.isfinite(loss_value):
                bad = f"loss is {loss_value}"
        self._after_batch(counts, bad, len(preds) == len(chunks), global_batch)
        if bad is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.training.grad_clip))
            if not math.isfinite(grad_norm):
                bad = f"gradient norm is {grad_norm}"
        if bad is not None and not self.training.skip_nonfinite_steps:
            self._stop_on_nonfinite(bad, torch.cat(preds) if len(preds) == len(chunks) else None)
        lr = self.optimizer.param_groups[0]["lr"]
        if bad is None:
            self.optimizer.step()
            self._after_update()
        else:  # skip_nonfinite_steps: drop this update, keep the schedule in step with the step count
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            logger.warning("step %d: %s; skipped (%d skipped so far)", self.step + 1, bad, self.skipped_steps)
        assert self.scheduler is not None, "train_step needs the scheduler that train() builds"
        self.scheduler.step()
        elapsed = time.perf_counter() - start
        metrics = {
            "train/loss": loss_value,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/skipped_steps": float(self.skipped_steps),
            "perf/step_time_s": elapsed,
            "perf/samples_per_s": global_batch / elapsed,
        }
        metrics.update(self._step_metrics(log, bad, counts, elapsed, global_batch))
        if log:
            metrics.update({f"memory/{k}": v for k, v in memory_report(self.device).items()})
        return metrics

    def _agree_across_ranks(self, bad: str | None, loss_sum: Tensor | None,
                            counts: list[float]) -> tuple[str | None, list[float]]:
        """One all-reduce before the last backward (the one that reduces gradients): every rank gets
        the global loss, the batch's counts and whether any rank's forward failed, so that all
        ranks take the same branch (or collectives hang). Sets ``_loss_value`` and
        ``_step_stop_signal`` (a stop signal on any rank, see :meth:`_stop_signal`); returns this
        step's failure, if any, and the counts summed over the ranks."""
        zero = torch.zeros((), device=self.device)
        totals = torch.stack([loss_sum if loss_sum is not None and bad is None else zero, zero + (bad is not None),
                              *(zero + c for c in counts), *(zero + f for f in self._stop_flags())])
        torch.distributed.all_reduce(totals)
        values = totals.tolist()
        self._loss_value = values[0] / self.dist.world_size
        summed = values[2 : 2 + len(counts)]
        # a stop signal on any rank stops every rank after this step (see _stop_signal)
        self._step_stop_signal = _first_signal(values[2 + len(counts):])
        if bad is None and values[1] > 0:
            bad = f"forward failed on {int(values[1])} other rank(s) with non-finite values"
        return bad, summed

    def _to_device(self, t: Inputs) -> Inputs:
        """Host -> device; through pinned memory on CUDA so the copy does not block the host."""
        if isinstance(t, tuple):
            return tuple(self._to_device(x) for x in t)
        if self.device.type == "cuda" and t.device.type == "cpu":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _autocast(self) -> torch.autocast:
        """bf16 autocast when ``precision == "bf16"`` (a no-op context otherwise)."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.training.precision == "bf16")

    def _stop_on_nonfinite(self, what: str, pred: Tensor | None) -> None:
        """Write the last good state, then raise naming the step and the first bad tensor."""
        step = self.step + 1
        culprit = _first_nonfinite(self.module, pred)
        where = ""
        if self.run_dir is not None:
            path = self.save_checkpoint(self.run_dir / "checkpoints" / "last_good.pt")
            where = f"; the state before this step is saved in {path}"
        raise FloatingPointError(f"step {step}: {what} (first non-finite: {culprit}){where}")

    # ---- signals ---------------------------------------------------------------------------------
    # the stop asked for by a signal while train() runs, and (several processes) the one this step's
    # all-reduce agreed on
    _stop_request: StopRequest | None = None
    _step_stop_signal: int | None = None

    def _stop_signal(self, *, after_loop: bool) -> int | None:
        """The signal that stops training now, the same on every rank (``None``: go on).

        One process: the signal received, if any. Several: the one agreed in this step's
        all-reduce (:meth:`_agree_across_ranks`), so all ranks stop after the same step, whichever
        of them got the signal; after the loop, a signal that came after the last step's all-reduce
        is agreed on with one more all-reduce (a flag per signal), so no rank goes on to the test alone.
        """
        if not self.dist.enabled:
            return self._stop_request.signum if self._stop_request is not None else None
        if not after_loop or self._step_stop_signal is not None:
            return self._step_stop_signal
        flags = torch.tensor(self._stop_flags(), device=self.device)
        torch.distributed.all_reduce(flags)
        return _first_signal(flags.tolist())

    def _stop_flags(self) -> list[float]:
        """1.0 for the signal this rank received (in :data:`STOP_SIGNALS` order), else 0.0."""
        signum = self._stop_request.signum if self._stop_request is not None else None
        return [float(signum == sig) for sig in STOP_SIGNALS]

    def _stop_on_signal(self, signum: int, *, saved: bool) -> None:
        """Write ``last.pt`` at this step (rank 0; unless written at this step already), let every
        rank leave together, and raise :class:`TrainingInterrupted` (exit status 128 + ``signum``)."""
        path = None
        if self.run_dir is not None:
            path = self.run_dir / "checkpoints" / "last.pt"
            if not saved:
                self._save_last()
        self.dist.barrier()  # no rank exits (and has torchrun stop the others) before last.pt is written
        if self.dist.is_main:
            logger.warning("%s: stopped after step %d of %s; %s", signal_name(signum), self.step, self.total_steps,
                           f"state saved in {path}" if path is not None else "no run folder: nothing saved")
        raise TrainingInterrupted(signum, self.step, path)

    # ---- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, inputs: Inputs, targets: Tensor, batch_size: int | None = None) -> dict[str, float]:
        """Loss, cosine, MSE and R@1 on held-out pairs (see :meth:`evaluate_with_predictions`)."""
        return self.evaluate_with_predictions(inputs, targets, batch_size)[0]

    @torch.no_grad()
    def evaluate_with_predictions(self, inputs: Inputs, targets: Tensor, batch_size: int | None = None,
                                  model: nn.Module | None = None) -> tuple[dict[str, float], Tensor]:
        """Metrics on held-out pairs and the predictions they were computed from.

        Args:
            inputs: ``[N, ...]``; targets: ``[N, D_out]``.
            model: the model that reads them (default: the trained one).

        Returns:
            ``(metrics, predictions [N, D_out] on the CPU)``. ``metrics``: ``loss``, ``cosine``,
            ``mse``, ``r_at_1`` and the model's own (:meth:`_eval_metrics`).
        """
        model = model if model is not None else self.module
        model.eval()
        bs = batch_size or self.eval_batch_size
        preds: list[Tensor] = []
        summaries: list[Any] = []
        for i in range(0, targets.size(0), bs):
            with self._autocast():
                preds.append(self._forward(model, self._to_device(rows(inputs, slice(i, i + bs)))).float().cpu())
            summaries.append(self._eval_batch_summary(model))
        pred = torch.cat(preds)
        metrics = evaluate_predictions(pred, targets)
        metrics["loss"] = float(embedding_loss(pred, targets, self.training.mse_weight, self.training.cosine_weight))
        metrics.update(self._eval_metrics(summaries, [p.size(0) for p in preds]))
        return metrics, pred

    def _evaluate_and_keep_best(self, val_inputs: Inputs, val_targets: Tensor) -> None:
        metrics = self.evaluate(val_inputs, val_targets)
        self.evaluations.append({"step": self.step, **metrics})
        self.run_logger.log({f"val/{k}": v for k, v in metrics.items()}, self.step)
        best = self.best_val_loss is None or metrics["loss"] < self.best_val_loss
        shown = [f"{name} {metrics[key]:{fmt}}" for key, name, fmt in _CONSOLE_VAL if key in metrics]
        logger.info("%sval step %d/%s: %s%s", "" if self.name == "train" else f"{self.name}: ", self.step,
                    self.total_steps, " ".join(shown), " (best)" if best else "")
        if best:
            self.best_val_loss, self.best_step = metrics["loss"], self.step
            self._best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.module.state_dict().items()})
            self._best_settings = self._settings()
            if self.run_dir is not None:
                folder = self.run_dir / "checkpoints"
                if (self._best_file_step is not None and self._best_file_step == self._last_ckpt_best_step
                        and (folder / "best.pt").exists()):
                    # the latest last.pt still refers to this best.pt: keep it for a resume from there
                    os.replace(folder / "best.pt", folder / "best_prev.pt")
                self.save_checkpoint(folder / "best.pt")
                self._best_file_step = self.step

    def _save_last(self) -> None:
        """Write ``checkpoints/last.pt``; a ``best_prev.pt`` that it no longer refers to goes."""
        assert self.run_dir is not None
        folder = self.run_dir / "checkpoints"
        self.save_checkpoint(folder / "last.pt")
        self._last_ckpt_best_step = self.best_step
        if self.best_step == self._best_file_step:
            (folder / "best_prev.pt").unlink(missing_ok=True)

    def restore_best(self) -> bool:
        """Load the best validation state into the model (False when there is none)."""
        if self._best_state is None:
            return False
        self.module.load_state_dict(self._best_state)
        self._apply_settings(self._best_settings)  # what it was evaluated under computes the same function
        return True

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        run_state = {
            "best_val_loss": self.best_val_loss, "best_step": self.best_step,
            "wandb_id": self.run_logger.wandb_id, "skipped_steps": self.skipped_steps,
            "total_steps": self.total_steps, **self._settings(),
            # the validation history, so a resumed run still knows its earlier (and final) evaluations
            "evaluations": self.evaluations, **(extra or {}),
        }
        return save_checkpoint(
            path, model=self.module, optimizer=self.optimizer, scheduler=self.scheduler, step=self.step,
            epoch=self.step // self._steps_per_epoch if self._steps_per_epoch else 0,
            config=self._config_dict(), extra=run_state,
        )

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Restore model, optimizer, scheduler, step, RNG and best-so-far from a checkpoint."""
        ckpt = load_checkpoint(path, map_location=self.device)
        optimizer_state = self._optimizer_state_of(ckpt, Path(path))
        self.module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(optimizer_state)
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        restore_rng_state(ckpt)
        extra = ckpt.get("extra") or {}
        self.best_val_loss, self.best_step = extra.get("best_val_loss"), extra.get("best_step")
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        # checkpoints written before the history was saved have none; past this step it is not this run's
        self.evaluations = [dict(e) for e in extra.get("evaluations", []) if e["step"] <= self.step]
        self._load_run_state(extra)
        self._restore_best_of(Path(path))
        return ckpt

    def _restore_best_of(self, path: Path) -> None:
        """Load the checkpoint's best state (its ``best_step``) from ``best.pt`` or ``best_prev.pt``
        beside it and make it this run's ``best.pt`` (see the module docstring). Without either,
        model selection starts again (warned) rather than test the last state under that name."""
        self._best_state, self._best_settings = None, {}
        self._best_file_step = self._last_ckpt_best_step = None
        if self.best_step is None:
            return
        found = None
        for candidate in (path.with_name("best.pt"), path.with_name("best_prev.pt")):
            if candidate.exists():
                best = load_checkpoint(candidate)
                if best["step"] == self.best_step:
                    found, self._best_state = candidate, best["model"]
                    saved = best.get("extra") or {}
                    self._best_settings = {k: saved[k] for k in self._settings() if saved.get(k) is not None}
                    break
        if found is None:
            logger.warning("resume: the best state of step %s (validation loss %s) is not in %s; model selection "
                           "starts again from the evaluations after step %d", self.best_step, self.best_val_loss,
                           path.parent, self.step)
            self.best_step = self.best_val_loss = None
            return
        if self.run_dir is not None:
            target = self.run_dir / "checkpoints" / "best.pt"
            if found.resolve() != target.resolve():
                atomic_write(target, lambda tmp: shutil.copyfile(found, tmp))
            self._best_file_step = self._last_ckpt_best_step = self.best_step


def _first_signal(counts: Sequence[float]) -> int | None:
    """The first of :data:`STOP_SIGNALS` that some rank received, from the all-reduced flags."""
    return next((int(sig) for sig, count in zip(STOP_SIGNALS, counts) if count > 0), None)


def _first_nonfinite(model: nn.Module, pred: Tensor | None) -> str:
    """Name of the first parameter, gradient or output holding NaN/inf."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return f"parameter {name}"
    if pred is None:
        return "values inside the forward (parameters were finite: an activation overflowed)"
    if not torch.isfinite(pred).all():
        return "model output"
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"gradient of {name}"
    return "the loss itself (inputs and outputs were finite)"
