"""`EnergyTrainer`: the training loop behind ``scripts/train.py``, usable on its own.

    trainer = EnergyTrainer(processor, config)
    trainer.train(input_embeddings, target_embeddings, epochs=5)

AdamW, linear warm-up then cosine decay, gradient clipping, loss = ``mse_weight * MSE +
cosine_weight * (1 - cos)``. With validation data it evaluates every ``eval_every`` steps and
keeps the best state; with a run folder it writes ``checkpoints/last.pt`` every
``checkpoint_every`` steps and ``checkpoints/best.pt`` on improvement.

Best state across a crash: ``best.pt`` can be written after the last ``last.pt`` (an improvement
between two checkpoints), and a run resumed from ``last.pt`` then needs the best state *that
``last.pt`` knows*, not the newer one. So before ``best.pt`` is overwritten while the latest
``last.pt`` still refers to it, it is moved to ``checkpoints/best_prev.pt``; the next ``last.pt``
makes it obsolete (deleted). :meth:`EnergyTrainer.load_checkpoint` picks whichever of the two
holds the checkpoint's ``best_step`` and puts it back as this run's ``best.pt``, so the tested
state, ``best.pt`` and the exported model always agree.

Resumability: the batch order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so a run
restored from a checkpoint at step ``s`` draws exactly the batches the uninterrupted run would
have drawn, and ends with the same parameters.

A non-finite loss or gradient stops training with ``FloatingPointError`` naming the step and what
went bad first, after writing ``checkpoints/last_good.pt`` (the parameters before that step); with
``config.skip_nonfinite_steps`` the step's update is dropped instead and counted in
``train/skipped_steps``.

Signals (:mod:`efgraph.training.signals`): SIGTERM, SIGINT and SIGUSR1 received while
:meth:`EnergyTrainer.train` runs stop it after the current optimizer step, with ``last.pt`` written
at that step; with several processes the stop is agreed in the step's all-reduce, so every rank
stops after the same step.

Memory plan: with ``memory_check`` the trainer follows the cheapest plan of
:func:`efgraph.utils.memory.check_training_fits` whose worst case fits the device (activation
checkpointing, micro-batches: :meth:`EnergyTrainer.train_step`), logged at start.

Flow budget (:mod:`efgraph.training.flow_budget`): ``processor.active_flow_budget`` is set before
every training forward and logged as ``flows/budget``: ``max_active_flows``, or with ``flow_budget:
adaptive`` the controller's budget under the plan's cap (``flows/budget_cap``). Checkpoints save it
and the best state keeps its own.

Learning diagnostics (``learning_diagnostics``, on by default; :mod:`efgraph.core.diagnostics`):
on the logged steps only, the forwards record per-step gradient hooks, output shares and landings
and the trainer logs them as ``diag/...`` with the start-cell churn of a probe batch (the first
64 training inputs of :meth:`EnergyTrainer.train`); every other step runs exactly as without them.
They work with micro-batches (the records add up) and activation checkpointing; with ``compile:
true`` the logged steps run the lattice step eagerly (said once in the log).

Dead-run alarm: ``flows/zero_arrival_steps`` counts the consecutive training steps whose forward
had no flow reach the output face. When it reaches ``eval_every`` the run is most likely dead --
every flow dies before the output face, so the lattice contributes nothing to the prediction --
and the trainer logs a warning and raises a W&B alert (:meth:`RunLogger.alert`), once until
arrivals come back.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from efgraph.config import ARCHITECTURE_KEYS, EnergyConfig
from efgraph.core.diagnostics import PROBE_SIZE, ForwardDiagnostics, StartCellProbe, diagnostics_metrics
from efgraph.core.flow_processor import FlowProcessor, rename_legacy_keys
from efgraph.core.input_face import token_mask
from efgraph.core.trace import FlowTrace
from efgraph.data._atomic import atomic_write
from efgraph.data.pairs import check_embedding_pair
from efgraph.training.checkpoint import (check_compatible, load_checkpoint, optimizer_state_for, restore_rng_state,
                                         save_checkpoint)
from efgraph.training.distributed import SINGLE_PROCESS, DistributedContext
from efgraph.training.flow_budget import (AdaptiveFlowBudget, held_memory_bytes, memory_for_run,
                                          plan_adaptive_budget)
from efgraph.training.metrics import embedding_loss, evaluate_predictions
from efgraph.training.optim import adamw
from efgraph.training.run_logger import RunLogger
from efgraph.training.schedule import warmup_cosine_scheduler
from efgraph.training.signals import STOP_SIGNALS, StopRequest, TrainingInterrupted, signal_name
from efgraph.utils import memory
from efgraph.utils.device import apply_num_threads, get_device, memory_report
from efgraph.utils.logging import DEBUG_CONVERGENCE, get_logger
from efgraph.utils.memory import MemoryEstimate, check_training_fits

logger = get_logger(__name__)
# the validation metrics the console shows each time they are computed: (key, name, format)
_CONSOLE_VAL = (("loss", "loss", ".4f"), ("cosine", "cosine", ".4f"), ("mse", "mse", ".4g"), ("r_at_1", "r@1", ".3f"),
                ("flows_arrived_per_sample", "arrived/sample", ".2f"))


@dataclass
class TrainResult:
    """What :meth:`EnergyTrainer.train` did."""

    steps: int
    best_step: int | None
    best_val_loss: float | None
    evaluations: list[dict[str, float]] = field(default_factory=list)
    last_train_loss: float | None = None


class EnergyTrainer:
    """Trains a :class:`FlowProcessor` on (input embedding, target embedding) pairs.

    Args:
        processor: the model.
        config: learning rate, schedule, batch size, loss weights, intervals.
        device: where to train (default: CUDA when available).
        run_dir: folder for ``checkpoints/`` and ``metrics.jsonl`` (``None``: keep nothing on disk).
        run_logger: where metrics go (default: a :class:`RunLogger` on ``run_dir``).
        progress: show a progress bar with the loss and active flows.
        distributed: the rank and world size under ``torchrun`` (see
            :mod:`efgraph.training.distributed`); only rank 0 logs, evaluates and writes files.
    """

    def __init__(self, processor: FlowProcessor, config: EnergyConfig, *, device: str | torch.device | None = None,
                 run_dir: str | Path | None = None, run_logger: RunLogger | None = None, progress: bool = True,
                 distributed: DistributedContext = SINGLE_PROCESS) -> None:
        self.config = config
        self.dist = distributed
        if distributed.enabled and config.skip_nonfinite_steps:
            # a skipped step would leave DDP's gradient reduction half done on the healthy ranks
            raise ValueError("skip_nonfinite_steps: not supported with several processes; a non-finite "
                             "step stops all ranks (after rank 0 writes last_good.pt)")
        self.device = get_device(device) if not isinstance(device, torch.device) else device
        # the process's CPU threads, before anything computes: runs sharing a machine each get
        # their share (config.num_threads), never PyTorch's default of every core each
        self.num_threads = apply_num_threads(config.num_threads)
        logger.info("CPU threads: %d (num_threads %d%s)", self.num_threads, config.num_threads,
                    ": PyTorch's default" if config.num_threads == 0 else "")
        local_batch = math.ceil(config.batch_size / distributed.world_size)
        # the memory plan (see efgraph.utils.memory): checkpointing and micro-batches chosen so that
        # the worst case fits the device; a config that cannot fit is refused now rather than dying
        # of out-of-memory hours into the run. Without memory_check only explicit settings apply.
        self.memory_plan: MemoryEstimate | None = None
        adaptive = config.flow_budget == "adaptive"
        if config.memory_check:
            num_parameters = sum(p.numel() for p in processor.parameters())
            if adaptive:  # the plan for max_active_flows, else for the largest budget that fits (no refusal)
                self._held_at_plan = held_memory_bytes(self.device)
                self.memory_plan = plan_adaptive_budget(config, num_parameters, local_batch,
                                                        memory.available_memory_bytes(self.device),
                                                        where=f"{self.device}, free memory")
            else:
                self.memory_plan = check_training_fits(config, num_parameters, self.device, local_batch)
            logger.info("%s", self.memory_plan.describe())
            checkpointing, micro = self.memory_plan.activation_checkpointing, self.memory_plan.micro_batch_size
        else:
            checkpointing, micro = config.activation_checkpointing, config.micro_batch_size or local_batch
        self.micro_batch_size = micro  # rows per forward + backward on this process
        # how the processor runs its steps; the caller's config is left as given (checkpoints keep
        # the settings asked for, so a resume plans again for its device)
        processor.activation_checkpointing = checkpointing
        self.processor = processor.to(self.device)
        self.flow_budget: AdaptiveFlowBudget | None = None
        if adaptive:
            self.flow_budget = AdaptiveFlowBudget(config, self.memory_plan)
            self._agree_on_cap()
            logger.info("flow budget: adaptive, %d flows per sample (cap %d of max_active_flows %d, target %s "
                        "flow-steps per sample per forward)", self.flow_budget.budget, self.flow_budget.cap,
                        config.max_active_flows, config.flow_budget_target or "none")
        self.processor.active_flow_budget = self._current_budget()
        # learning diagnostics on the logged steps (see the module docstring); the probe of
        # diag/start_churn is kept by train()
        self.diagnostics = config.learning_diagnostics
        self._start_probe: StartCellProbe | None = None
        if self.diagnostics and config.compile:
            logger.info("learning diagnostics: the logged training steps run the lattice step eagerly (a compiled "
                        "graph keeps no intermediate tensor to hook); the other steps run compiled")
        self.model: torch.nn.Module = self.processor
        if distributed.enabled:
            # find_unused_parameters: a step without spawns (or arrivals) leaves some heads unused
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.processor, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.optimizer = adamw(self.processor, config.learning_rate, config.weight_decay, config.weight_decay_on)
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
        self._best_flow_budget: int | None = None  # the flow budget the best state was evaluated under
        self.evaluations: list[dict[str, float]] = []
        self._steps_per_epoch = 0
        self.skipped_steps = 0
        # dead-run alarm: consecutive training steps without arrivals (since this process started)
        self.zero_arrival_steps = 0
        self._dead_alarm_raised = False
        self._last_step_arrivals: float | None = None  # flows that arrived in the last step's forward
        self.total_steps: int | None = None  # the run's length (the schedule's span), set by train()
        # best.pt bookkeeping (see the module docstring): the step of the state in best.pt, and
        # the best_step recorded in the latest last.pt
        self._best_file_step: int | None = None
        self._last_ckpt_best_step: int | None = None

    # ---- data checks -----------------------------------------------------------------------------
    def _check_pairs(self, src: Tensor, tgt: Tensor, what: str) -> None:
        """``src [N, input_dim]`` (``input_sequence``: ``[N, T, input_dim]``, zero-padded) and
        ``tgt [N, output_dim]``: finite pairs of the config's widths."""
        if self.config.input_sequence:  # the tokens' checks are the model's; the pair's are the rest
            if not isinstance(src, Tensor) or src.dim() != 3:
                raise ValueError(f"{what} inputs: input_sequence takes [N, tokens, {self.config.input_dim}], got "
                                 f"{tuple(getattr(src, 'shape', ()))}")
            check_embedding_pair(src.flatten(1), tgt, (f"{what} inputs", f"{what} targets"))
        else:
            check_embedding_pair(src, tgt, (f"{what} inputs", f"{what} targets"))
        for name, t, field_name in [("inputs", src, "input_dim"), ("targets", tgt, "output_dim")]:
            width = getattr(self.config, field_name)
            if t.size(-1) != width:
                raise ValueError(f"{what} {name}: width {t.size(-1)} does not match config.{field_name} {width}")

    def _forward(self, model: nn.Module, x: Tensor) -> Tensor:
        """``model``'s prediction for a batch: a sequence's tokens are read from its zero padding."""
        return model(x, token_mask(x)) if self.config.input_sequence else model(x)

    def steps_per_epoch(self, num_pairs: int) -> int:
        return math.ceil(num_pairs / self.config.batch_size)

    def batch_order(self, num_pairs: int, epoch: int) -> Tensor:
        """The permutation of epoch ``epoch``: a function of (seed, epoch) only, so resumable."""
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(num_pairs, generator=gen)

    # ---- training --------------------------------------------------------------------------------
    def train(self, input_embeddings: Tensor, target_embeddings: Tensor, epochs: int | None = None, *,
              val_inputs: Tensor | None = None, val_targets: Tensor | None = None,
              resume_from: str | Path | None = None, max_steps: int | None = None,
              total_steps: int | None = None) -> TrainResult:
        """Train until the end of epoch ``epochs`` (default ``config.epochs``) over the pairs.

        The step count is the trainer's: a second call with a larger ``epochs`` continues the
        same run where the first one stopped.

        Args:
            input_embeddings: ``[N, input_dim]``; target_embeddings: ``[N, output_dim]``.
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
        epochs = self.config.epochs if epochs is None else epochs
        if epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {epochs}")
        n = input_embeddings.size(0)
        world, bs = self.dist.world_size, self.config.batch_size
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
        self.scheduler = warmup_cosine_scheduler(self.optimizer, self.config.warmup_steps, total,
                                                 current_step=0 if resume_from is not None else self.step)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        stop = total if max_steps is None else min(total, max_steps)
        if self.step >= stop:
            logger.warning("train: already at step %d of %d (epochs=%d); nothing to do", self.step, stop, epochs)
        cfg = self.config
        if self.diagnostics:
            self._keep_start_probe(input_embeddings)
        bar = tqdm(total=stop, initial=self.step, disable=not self.progress, desc="train", dynamic_ncols=True)
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
                idx = order[within * cfg.batch_size : (within + 1) * cfg.batch_size]
                # the flow dynamics are summarised only on the steps that log them
                logs = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == stop
                metrics = self.train_step(input_embeddings[idx], target_embeddings[idx], log=logs)
                self.step += 1
                self._watch_arrivals()
                metrics["flows/zero_arrival_steps"] = float(self.zero_arrival_steps)
                last_loss = metrics["train/loss"]
                if math.isfinite(last_loss):  # a skipped non-finite step is counted in train/skipped_steps
                    loss_sum, loss_count = loss_sum + last_loss, loss_count + 1
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", flows=int(metrics.get("flows/mean_active_flows", 0)))
                if self.step % cfg.log_every == 0 or self.step == stop:
                    metrics["train/loss_last"] = last_loss
                    metrics["train/loss"] = loss_sum / loss_count if loss_count else float("nan")
                    loss_sum, loss_count = 0.0, 0
                    self.run_logger.log({**metrics, "train/epoch": epoch + (within + 1) / per_epoch}, self.step)
                if self.zero_arrival_steps == cfg.eval_every:  # exactly once per episode without arrivals
                    self._raise_dead_alarm()
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

    def _keep_start_probe(self, inputs: Tensor) -> None:
        """The probe of ``diag/start_churn``: the first :data:`PROBE_SIZE` training inputs (a
        train() call on other inputs starts a new probe, whose first churn is 0)."""
        if self.config.input_sequence:  # a token's start cell is its index: nothing to churn
            return
        probe = inputs[:PROBE_SIZE]
        kept = self._start_probe
        if kept is None or kept.inputs.shape != probe.shape or not torch.equal(kept.inputs.cpu(), probe.cpu()):
            self._start_probe = StartCellProbe(self._to_device(probe))

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

    def _watch_arrivals(self) -> None:
        """Count this step in ``zero_arrival_steps`` (or reset it) from the last forward's arrivals."""
        if self._last_step_arrivals is None:  # no forward result (a skipped non-finite step): no evidence
            return
        if self._last_step_arrivals > 0:
            self.zero_arrival_steps, self._dead_alarm_raised = 0, False
        else:
            self.zero_arrival_steps += 1

    def _raise_dead_alarm(self) -> None:
        """Warn (log and W&B alert) that no flow has arrived for ``eval_every`` steps in a row."""
        if self._dead_alarm_raised or not self.dist.is_main:
            return
        self._dead_alarm_raised = True
        output = " + ".join([*(["the input"] if self.config.residual else []),
                             *(["the linear skip"] if self.config.linear_skip else []), "the readout's bias"])
        text = (f"step {self.step}: no flow reached the output face in {self.zero_arrival_steps} consecutive "
                f"training steps; every flow dies before the output face: the lattice contributes nothing and "
                f"the prediction is {output}. Check the energy head, energy_threshold and lattice_depth"
                + ("; with linear_skip it can also mean that training found nothing for the lattice beyond "
                   "the linear map (as on the Bible, README)." if self.config.linear_skip else "."))
        logger.warning("dead run: %s", text)
        self.run_logger.alert("efgraph: dead run (no flow arrives)", text, step=self.step)

    # ---- flow budget ----------------------------------------------------------------------------
    _held_at_plan = 0  # what this process held on the device when it planned (adaptive budget)

    def _current_budget(self) -> int:
        """The per-sample flow budget of the next forward."""
        return self.flow_budget.budget if self.flow_budget is not None else self.config.max_active_flows

    def _agree_on_cap(self) -> None:
        """Several processes: every rank takes the smallest rank's cap, so all run the same budget
        (they update it from the same global flow-steps)."""
        if self.flow_budget is None or not self.dist.enabled:
            return
        cap = torch.tensor(self.flow_budget.cap, device=self.device)
        torch.distributed.all_reduce(cap, op=torch.distributed.ReduceOp.MIN)
        self.flow_budget.set_cap(int(cap.item()))

    def _replan_flow_budget(self) -> None:
        """The cap for the device's free memory now (plus what this run took since it planned)."""
        if self.flow_budget is None or self.memory_plan is None:
            return
        self.flow_budget.replan(memory_for_run(self.device, self._held_at_plan))
        self._agree_on_cap()

    def train_step(self, inputs: Tensor, targets: Tensor, *, log: bool = True) -> dict[str, float]:
        """One optimisation step on a (global) batch; returns its metrics.

        The batch runs in micro-batches of :attr:`micro_batch_size` rows (the memory plan's), each
        forward followed by its backward, so that only one micro-batch's activations are alive;
        each micro-batch's loss is weighted by its share of the batch's rows, so the accumulated
        gradient is the whole batch's (the loss is a mean over rows), and the optimizer steps
        once. With ``log`` false (a step off the log grid) the flow dynamics are not summarised:
        that is a host copy of the trace's energies per step, wanted only when they are logged; nor
        are the learning diagnostics (``diag/...``), recorded only in the forwards of a logged step.
        """
        self.model.train()
        start = time.perf_counter()
        global_batch = inputs.size(0)
        world = self.dist.world_size
        if self.dist.enabled:  # this rank's slice; the loss is scaled so DDP's mean is the global mean
            inputs = inputs.tensor_split(world)[self.dist.rank]
            targets = targets.tensor_split(world)[self.dist.rank]
        inputs, targets = self._to_device(inputs), self._to_device(targets)
        chunks = list(zip(inputs.split(self.micro_batch_size), targets.split(self.micro_batch_size)))
        bad: str | None = None
        preds: list[Tensor] = []  # detached, for naming a non-finite output
        traces: list[FlowTrace] = []
        trace: FlowTrace | None = None  # their merge, made in the last micro-batch
        loss_sum: Tensor | None = None  # sum of the weighted micro-batch losses (the batch's loss, x world)
        grad_norm = float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        budget = self.processor.active_flow_budget = self._current_budget()
        # learning diagnostics: recorded by the forwards of a logged step only, one record per micro-batch
        diagnose = log and self.diagnostics
        records: list[ForwardDiagnostics] = []
        for i, (x, y) in enumerate(chunks):
            last = i == len(chunks) - 1
            # DDP: gradients are reduced across ranks once, in the last micro-batch's backward
            accumulate = self.model.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            with accumulate:
                loss: Tensor | None = None
                if bad is None:
                    self.processor.record_diagnostics = diagnose
                    try:
                        with self._autocast():
                            pred = self._forward(self.model, x).float()
                    except FloatingPointError as err:  # NaN/inf flows: handled below like a NaN loss, never hidden
                        bad = str(err)
                    else:
                        preds.append(pred.detach())
                        traces.append(self.processor.last_trace)
                        if diagnose:
                            records.append(self.processor.last_diagnostics)
                        # embedding_loss is a mean over rows: weighted by the rows' share of the global batch
                        weight = x.size(0) * world / global_batch
                        loss = embedding_loss(pred, y, self.config.mse_weight, self.config.cosine_weight) * weight
                        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
                    finally:
                        self.processor.record_diagnostics = False
                if last:
                    # the whole batch's forward, as without micro-batches (host counts: no sync)
                    trace = FlowTrace.merge(traces) if traces else None
                    if self.dist.enabled:
                        bad = self._agree_across_ranks(bad, loss_sum, trace)
                        if bad is None and not math.isfinite(self._loss_value):
                            bad = f"loss is {self._loss_value}"
                if loss is not None and bad is None:
                    loss.backward()
        # arrivals: None (no evidence for the dead-run alarm) when a forward failed
        arrivals: float | None
        if self.dist.enabled:
            loss_value, flow_steps, arrivals = self._loss_value, self._global_flow_steps, self._global_arrivals
            if bad is not None:
                arrivals = None
        else:
            loss_value = loss_sum.item() if loss_sum is not None else float("nan")
            if bad is None and not math.isfinite(loss_value):
                bad = f"loss is {loss_value}"
            flow_steps = sum(trace.active) if trace is not None else 0
            arrivals = float(trace.total_arrived) if len(traces) == len(chunks) else None
        self._last_step_arrivals = arrivals
        if self.flow_budget is not None and bad is None:  # flow_steps: the global batch's
            self.flow_budget.update(flow_steps, global_batch)
        if bad is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.processor.parameters(), self.config.grad_clip))
            if not math.isfinite(grad_norm):
                bad = f"gradient norm is {grad_norm}"
        if bad is not None and not self.config.skip_nonfinite_steps:
            self._stop_on_nonfinite(bad, torch.cat(preds) if len(preds) == len(chunks) else None)
        lr = self.optimizer.param_groups[0]["lr"]
        if bad is None:
            self.optimizer.step()
            self.processor.project_parameters()  # project_step_gates: each gate back into [0, 1]
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
            "perf/flow_steps_per_s": flow_steps / elapsed,
            # the per-sample budget this step's forward ran under, and what it ran
            "flows/budget": float(budget),
            "flows/flow_steps_per_sample": flow_steps / global_batch,
        }
        if trace is not None:
            self.processor.last_trace = trace
            # for the progress bar, from the host counts (trace.summary() would copy the energies)
            metrics["flows/mean_active_flows"] = sum(trace.active) / max(trace.num_steps, 1)
        if log:
            self._replan_flow_budget()  # free memory is read on the logged steps only
            metrics.update({f"memory/{k}": v for k, v in memory_report(self.device).items()})
            if trace is not None:
                metrics.update({f"flows/{k}": v for k, v in trace.summary().items()})
                # per lattice step: active flows, spawns, neighbourhood size and mean energy (a curve each in W&B)
                metrics.update({f"flows/{k}": v for k, v in trace.per_step_metrics().items()})
            if diagnose:
                metrics.update(self._diagnostics_metrics(records if bad is None else [], global_batch))
            if self.processor.flow_step.gates is not None:  # residual_steps: how far each later step opened
                metrics.update({f"model/step_gate_{t + 2}": g  # lattice steps count from 1; <= 0 is closed
                                for t, g in enumerate(self.processor.flow_step.gates.detach().tolist())})
        if self.flow_budget is not None:  # the cap the next forward's budget is under
            metrics["flows/budget_cap"] = float(self.flow_budget.cap)
        if trace is not None and logger.isEnabledFor(DEBUG_CONVERGENCE):
            logger.log(DEBUG_CONVERGENCE, "step %d: %s", self.step + 1, arrival_statistics(trace))
        return metrics

    def _diagnostics_metrics(self, records: list[ForwardDiagnostics], global_batch: int) -> dict[str, float]:
        """The ``diag/...`` metrics of a logged step (after its backward and optimizer step): the
        per-step gradients, output shares and landings of its forwards (none after a non-finite
        step), and the churn of the probe's start cells under the parameters just updated."""
        # the gradient of a flow's own sample's loss: each rank's loss is weighted so that DDP's mean
        # over the ranks is the global batch's mean over rows
        out = diagnostics_metrics(records, self.config.lattice_depth - 1, global_batch / self.dist.world_size)
        if self._start_probe is not None:
            out["diag/start_churn"] = float(self._start_probe.update(self.processor.input_face))
        return out

    def _agree_across_ranks(self, bad: str | None, loss_sum: Tensor | None, trace: FlowTrace | None) -> str | None:
        """One all-reduce before the last backward (the one that reduces gradients): every rank gets
        the global loss, flow-steps, arrivals and whether any rank's forward failed, so that all
        ranks take the same branch (or collectives hang). Sets ``_loss_value``,
        ``_global_flow_steps``, ``_global_arrivals`` and ``_step_stop_signal`` (a stop signal on any
        rank, see :meth:`_stop_signal`); returns this step's failure, if any."""
        zero = torch.zeros((), device=self.device)
        flow_steps = sum(trace.active) if trace is not None else 0
        arrivals = trace.total_arrived if trace is not None else 0
        totals = torch.stack([loss_sum if loss_sum is not None and bad is None else zero, zero + flow_steps,
                              zero + (bad is not None), zero + arrivals, *(zero + f for f in self._stop_flags())])
        torch.distributed.all_reduce(totals)
        # a stop signal on any rank stops every rank after this step (see _stop_signal)
        self._step_stop_signal = _first_signal(totals[4:].tolist())
        self._loss_value = totals[0].item() / self.dist.world_size
        self._global_flow_steps = int(totals[1].item())
        # the dead-run alarm judges the global batch: a rank whose shard had no arrivals is not a dead run
        self._global_arrivals = totals[3].item()
        if bad is None and totals[2].item() > 0:
            bad = f"forward failed on {int(totals[2].item())} other rank(s) with non-finite flows"
        return bad

    def _to_device(self, t: Tensor) -> Tensor:
        """Host -> device; through pinned memory on CUDA so the copy does not block the host."""
        if self.device.type == "cuda" and t.device.type == "cpu":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _autocast(self) -> torch.autocast:
        """bf16 autocast when ``config.precision == "bf16"`` (a no-op context otherwise)."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.config.precision == "bf16")

    def _stop_on_nonfinite(self, what: str, pred: Tensor | None) -> None:
        """Write the last good state, then raise naming the step and the first bad tensor."""
        step = self.step + 1
        culprit = _first_nonfinite(self.processor, pred)
        where = ""
        if self.run_dir is not None:
            path = self.save_checkpoint(self.run_dir / "checkpoints" / "last_good.pt")
            where = f"; the state before this step is saved in {path}"
        raise FloatingPointError(f"step {step}: {what} (first non-finite: {culprit}){where}")

    # ---- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, inputs: Tensor, targets: Tensor, batch_size: int | None = None) -> dict[str, float]:
        """Loss, cosine, MSE, R@1 and the flow dynamics on held-out pairs (see :meth:`evaluate_with_predictions`)."""
        return self.evaluate_with_predictions(inputs, targets, batch_size)[0]

    @torch.no_grad()
    def evaluate_with_predictions(self, inputs: Tensor, targets: Tensor,
                                  batch_size: int | None = None,
                                  model: FlowProcessor | None = None) -> tuple[dict[str, float], Tensor]:
        """Metrics on held-out pairs and the predictions they were computed from.

        Args:
            inputs: ``[N, input_dim]``; targets: ``[N, output_dim]``.
            model: the model that reads them (default: the trained one; e.g. its
                :meth:`~efgraph.core.flow_processor.FlowProcessor.at_depth`).

        Returns:
            ``(metrics, predictions [N, output_dim] on the CPU)``. ``metrics``: ``loss``,
            ``cosine``, ``mse``, ``r_at_1``, and the dynamics as ``flows_<key>``:
            ``arrived_per_sample`` and ``spawned_per_sample`` (flows that reached the output face /
            were spawned, per input), ``energy_arrived_fraction``, ``mean_active_flows`` and
            ``steps`` (the trace's per-batch values averaged with batch-size weights; note that
            ``mean_active_flows`` counts a whole evaluation batch, as the trace does), plus
            ``neighbourhood_flows`` and ``energy_created_fraction`` when the engine's trace
            reports them.
        """
        model = model if model is not None else self.processor
        model.eval()
        bs = batch_size or max(self.config.batch_size, 64)
        preds: list[Tensor] = []
        summaries: list[dict[str, float]] = []
        for i in range(0, inputs.size(0), bs):
            with self._autocast():
                preds.append(self._forward(model, self._to_device(inputs[i : i + bs])).float().cpu())
            summaries.append(model.last_trace.summary())
        pred = torch.cat(preds)
        metrics = evaluate_predictions(pred, targets)
        metrics["loss"] = float(embedding_loss(pred, targets, self.config.mse_weight, self.config.cosine_weight))
        metrics.update(_flow_dynamics(summaries, [p.size(0) for p in preds]))
        return metrics, pred

    def _evaluate_and_keep_best(self, val_inputs: Tensor, val_targets: Tensor) -> None:
        metrics = self.evaluate(val_inputs, val_targets)
        self.evaluations.append({"step": self.step, **metrics})
        self.run_logger.log({f"val/{k}": v for k, v in metrics.items()}, self.step)
        best = self.best_val_loss is None or metrics["loss"] < self.best_val_loss
        shown = [f"{name} {metrics[key]:{fmt}}" for key, name, fmt in _CONSOLE_VAL if key in metrics]
        logger.info("val step %d/%s: %s%s", self.step, self.total_steps, " ".join(shown), " (best)" if best else "")
        if best:
            self.best_val_loss, self.best_step = metrics["loss"], self.step
            self._best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.processor.state_dict().items()})
            self._best_flow_budget = self.processor.active_flow_budget
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
        self.processor.load_state_dict(self._best_state)
        if self._best_flow_budget is not None:  # the budget it was evaluated under computes the same function
            self.processor.active_flow_budget = self._best_flow_budget
        return True

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        run_state = {
            "best_val_loss": self.best_val_loss, "best_step": self.best_step,
            "wandb_id": self.run_logger.wandb_id, "skipped_steps": self.skipped_steps,
            "total_steps": self.total_steps,
            # the per-sample flow budget of the model (evaluation and export run under it) and,
            # adaptive, the controller's state
            "active_flow_budget": int(self.processor.active_flow_budget),
            "flow_budget": self.flow_budget.state_dict() if self.flow_budget is not None else None,
            # the validation history, so a resumed run still knows its earlier (and final) evaluations
            "evaluations": self.evaluations, **(extra or {}),
        }
        return save_checkpoint(
            path, model=self.processor, optimizer=self.optimizer, scheduler=self.scheduler, step=self.step,
            epoch=self.step // self._steps_per_epoch if self._steps_per_epoch else 0,
            config=self.config.to_dict(), extra=run_state,
        )

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Restore model, optimizer, scheduler, step, RNG and best-so-far from a checkpoint."""
        ckpt = load_checkpoint(path, map_location=self.device)
        # a config saved by an older efgraph, read with the values that version computed with
        saved = EnergyConfig.from_saved(ckpt["config"], str(path))
        check_compatible(saved.to_dict(), self.config.to_dict(), ARCHITECTURE_KEYS)
        self.processor.load_state_dict(ckpt["model"])
        # a checkpoint from before the model's parts moved holds its parameters in another order
        self.optimizer.load_state_dict(optimizer_state_for(self.processor, self.optimizer, ckpt["optimizer"],
                                                           ckpt["model"], rename_legacy_keys(list(ckpt["model"]))))
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        restore_rng_state(ckpt)
        extra = ckpt.get("extra") or {}
        self.best_val_loss, self.best_step = extra.get("best_val_loss"), extra.get("best_step")
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        # checkpoints written before the history was saved have none; past this step it is not this run's
        self.evaluations = [dict(e) for e in extra.get("evaluations", []) if e["step"] <= self.step]
        if self.flow_budget is not None and extra.get("flow_budget") is not None:
            self.flow_budget.load_state_dict(extra["flow_budget"])
        self.processor.active_flow_budget = self._current_budget()
        self._restore_best_of(Path(path))
        return ckpt

    def _restore_best_of(self, path: Path) -> None:
        """Load the checkpoint's best state (its ``best_step``) from ``best.pt`` or ``best_prev.pt``
        beside it and make it this run's ``best.pt`` (see the module docstring). Without either,
        model selection starts again (warned) rather than test the last state under that name."""
        self._best_state = self._best_flow_budget = None
        self._best_file_step = self._last_ckpt_best_step = None
        if self.best_step is None:
            return
        found = None
        for candidate in (path.with_name("best.pt"), path.with_name("best_prev.pt")):
            if candidate.exists():
                best = load_checkpoint(candidate)
                if best["step"] == self.best_step:
                    found, self._best_state = candidate, best["model"]
                    self._best_flow_budget = (best.get("extra") or {}).get("active_flow_budget")
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


# Per-batch trace means, averaged over the pairs (batch-size weighted) by evaluate().
EVAL_MEAN_KEYS = ("energy_arrived_fraction", "energy_created_fraction", "neighbourhood_flows",
                  "mean_active_flows", "steps")


def _flow_dynamics(summaries: list[dict[str, float]], sizes: list[int]) -> dict[str, float]:
    """``flows_<key>`` over a split from per-batch :meth:`FlowTrace.summary` dicts and batch sizes.

    Counts become per-sample rates from the batch totals (exact over the split), and per-batch
    means are weighted by batch size, so a short last batch counts for its samples only.
    """
    n = sum(sizes)
    out = {f"flows_{key}_per_sample": sum(s[key] for s in summaries) / n for key in ("arrived", "spawned")}
    out.update({f"flows_{key}": sum(s[key] * b for s, b in zip(summaries, sizes)) / n for key in EVAL_MEAN_KEYS})
    return out


def arrival_statistics(trace: FlowTrace) -> str:
    """One line on how flows converge on the output face in a forward: what the plan's
    ``DEBUG_CONVERGENCE`` level is for (arrivals per lattice step, the mean step of arrival, the
    share of injected energy that arrived), not the loss."""
    arrived = list(trace.arrived)
    total = sum(arrived)
    summary = trace.summary()
    if total:
        mean_step = sum((i + 1) * a for i, a in enumerate(arrived)) / total
        first = next(i + 1 for i, a in enumerate(arrived) if a)
        when = f"mean arrival step {mean_step:.2f}, first at step {first}"
    else:
        when = "no arrivals"
    return (f"arrived {total} flows ({summary['arrived_per_sample']:.2f} per sample) of {summary['initial_flows']:.0f} "
            f"injected + {summary['spawned']:.0f} spawned, {when}, per step {arrived}, "
            f"{100 * summary['energy_arrived_fraction']:.1f}% of injected energy arrived")


def _first_signal(counts: list[float]) -> int | None:
    """The first of :data:`STOP_SIGNALS` that some rank received, from the all-reduced flags."""
    return next((int(sig) for sig, count in zip(STOP_SIGNALS, counts) if count > 0), None)


def _first_nonfinite(model: torch.nn.Module, pred: Tensor | None) -> str:
    """Name of the first parameter, gradient or output holding NaN/inf."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return f"parameter {name}"
    if pred is None:
        return "flows inside the forward (parameters were finite: an activation overflowed)"
    if not torch.isfinite(pred).all():
        return "model output"
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"gradient of {name}"
    return "the loss itself (inputs and outputs were finite)"
