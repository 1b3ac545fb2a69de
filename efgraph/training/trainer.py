"""`EnergyTrainer`: the training loop behind ``scripts/train.py`` (:class:`~efgraph.training.loop.Trainer`)
with the lattice's hooks, usable on its own.

    trainer = EnergyTrainer(processor, config)
    trainer.train(input_embeddings, target_embeddings, epochs=5)

The loop, its optimizer, schedule, loss, evaluation, best state, checkpoints, non-finite steps and
signals are :mod:`efgraph.training.loop`'s, shared with the learned baselines. What the lattice adds:

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

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from efgraph.config import ARCHITECTURE_KEYS, EnergyConfig
from efgraph.core.diagnostics import PROBE_SIZE, ForwardDiagnostics, StartCellProbe, diagnostics_metrics
from efgraph.core.flow_processor import FlowProcessor, rename_legacy_keys
from efgraph.core.input_face import token_mask
from efgraph.core.trace import FlowTrace
from efgraph.data.pairs import check_embedding_pair
from efgraph.training.checkpoint import check_compatible, optimizer_state_for
from efgraph.training.distributed import SINGLE_PROCESS, DistributedContext
from efgraph.training.flow_budget import (AdaptiveFlowBudget, held_memory_bytes, memory_for_run,
                                          plan_adaptive_budget)
from efgraph.training.loop import Trainer, TrainResult
from efgraph.training.run_logger import RunLogger
from efgraph.utils import memory
from efgraph.utils.device import apply_num_threads, get_device
from efgraph.utils.logging import DEBUG_CONVERGENCE, get_logger
from efgraph.utils.memory import MemoryEstimate, check_training_fits

logger = get_logger(__name__)

__all__ = ["EnergyTrainer", "TrainResult", "arrival_statistics"]


class EnergyTrainer(Trainer):
    """Trains a :class:`FlowProcessor` on (input embedding, target embedding) pairs.

    Args:
        processor: the model.
        config: the run's config (its :attr:`~efgraph.config.EnergyConfig.training` fields drive
            the loop; the rest plans memory, the flow budget and the diagnostics).
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
        device = device if isinstance(device, torch.device) else get_device(device)
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
                self._held_at_plan = held_memory_bytes(device)
                self.memory_plan = plan_adaptive_budget(config, num_parameters, local_batch,
                                                        memory.available_memory_bytes(device),
                                                        where=f"{device}, free memory")
            else:
                self.memory_plan = check_training_fits(config, num_parameters, device, local_batch)
            logger.info("%s", self.memory_plan.describe())
            checkpointing, micro = self.memory_plan.activation_checkpointing, self.memory_plan.micro_batch_size
        else:
            checkpointing, micro = config.activation_checkpointing, config.micro_batch_size or local_batch
        # how the processor runs its steps; the caller's config is left as given (checkpoints keep
        # the settings asked for, so a resume plans again for its device)
        processor.activation_checkpointing = checkpointing
        super().__init__(processor, config.training, device=device, run_dir=run_dir, run_logger=run_logger,
                         progress=progress, distributed=distributed, micro_batch_size=micro)
        self.processor = processor
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
        # dead-run alarm: consecutive training steps without arrivals (since this process started)
        self.zero_arrival_steps = 0
        self._dead_alarm_raised = False
        self._last_step_arrivals: float | None = None  # flows that arrived in the last step's forward
        # this training step's forwards: whether they record diagnostics, their traces and records
        self._recording = False
        self._traces: list[FlowTrace] = []
        self._records: list[ForwardDiagnostics] = []
        self._trace: FlowTrace | None = None  # their merge: the whole batch's forward
        self._budget = self.processor.active_flow_budget  # the budget this step's forwards ran under

    # ---- the forward ------------------------------------------------------------------------------
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
        """``model``'s prediction for a batch: a sequence's tokens are read from its zero padding.
        A training forward of a logged step records the learning diagnostics."""
        self.processor.record_diagnostics = self._recording
        try:
            return model(x, token_mask(x)) if self.config.input_sequence else model(x)
        finally:
            self.processor.record_diagnostics = False

    # ---- the training step's hooks ------------------------------------------------------------------
    def _on_train_start(self, inputs: Tensor) -> None:
        if self.diagnostics:
            self._keep_start_probe(inputs)

    def _begin_batch(self, log: bool) -> None:
        self._budget = self.processor.active_flow_budget = self._current_budget()
        # learning diagnostics: recorded by the forwards of a logged step only, one record per micro-batch
        self._recording = log and self.diagnostics
        self._traces, self._records, self._trace = [], [], None

    def _forward_done(self) -> None:
        self._traces.append(self.processor.last_trace)
        if self._recording:
            self._records.append(self.processor.last_diagnostics)

    def _end_forwards(self) -> None:
        self._recording = False

    def _batch_counts(self) -> list[float]:
        """This rank's flow-steps and arrivals, from the merged trace (host counts: no sync)."""
        self._trace = trace = FlowTrace.merge(self._traces) if self._traces else None
        return [float(sum(trace.active)), float(trace.total_arrived)] if trace is not None else [0.0, 0.0]

    def _after_batch(self, counts: list[float], bad: str | None, complete: bool, global_batch: int) -> None:
        flow_steps, arrivals = counts
        # arrivals: None (no evidence for the dead-run alarm) when a forward failed
        failed = bad is not None if self.dist.enabled else not complete
        self._last_step_arrivals = None if failed else arrivals
        if self.flow_budget is not None and bad is None:  # flow_steps: the global batch's
            self.flow_budget.update(int(flow_steps), global_batch)

    def _after_update(self) -> None:
        self.processor.project_parameters()  # project_step_gates: each gate back into [0, 1]

    def _step_metrics(self, log: bool, bad: str | None, counts: list[float], elapsed: float,
                      global_batch: int) -> dict[str, float]:
        """The flows of a training step: what it ran, and on a logged step (``log``) the trace's
        summary, per-step curves, learning diagnostics and step gates. With ``log`` false the flow
        dynamics are not summarised: that is a host copy of the trace's energies per step."""
        flow_steps = counts[0]
        trace = self._trace
        metrics = {
            "perf/flow_steps_per_s": flow_steps / elapsed,
            # the per-sample budget this step's forward ran under, and what it ran
            "flows/budget": float(self._budget),
            "flows/flow_steps_per_sample": flow_steps / global_batch,
        }
        if trace is not None:
            self.processor.last_trace = trace
            # for the progress bar, from the host counts (trace.summary() would copy the energies)
            metrics["flows/mean_active_flows"] = sum(trace.active) / max(trace.num_steps, 1)
        if log:
            self._replan_flow_budget()  # free memory is read on the logged steps only
            if trace is not None:
                metrics.update({f"flows/{k}": v for k, v in trace.summary().items()})
                # per lattice step: active flows, spawns, neighbourhood size and mean energy (a curve each in W&B)
                metrics.update({f"flows/{k}": v for k, v in trace.per_step_metrics().items()})
            if self.diagnostics:
                metrics.update(self._diagnostics_metrics(self._records if bad is None else [], global_batch))
            if self.processor.flow_step.gates is not None:  # residual_steps: how far each later step opened
                metrics.update({f"model/step_gate_{t + 2}": g  # lattice steps count from 1; <= 0 is closed
                                for t, g in enumerate(self.processor.flow_step.gates.detach().tolist())})
        if self.flow_budget is not None:  # the cap the next forward's budget is under
            metrics["flows/budget_cap"] = float(self.flow_budget.cap)
        if trace is not None and logger.isEnabledFor(DEBUG_CONVERGENCE):
            logger.log(DEBUG_CONVERGENCE, "step %d: %s", self.step + 1, arrival_statistics(trace))
        return metrics

    def _after_step(self, metrics: dict[str, float]) -> None:
        self._watch_arrivals()
        metrics["flows/zero_arrival_steps"] = float(self.zero_arrival_steps)
        if self.zero_arrival_steps == self.config.eval_every:  # exactly once per episode without arrivals
            self._raise_dead_alarm()

    def _progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {**super()._progress(metrics), "flows": str(int(metrics.get("flows/mean_active_flows", 0)))}

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

    def _keep_start_probe(self, inputs: Tensor) -> None:
        """The probe of ``diag/start_churn``: the first :data:`PROBE_SIZE` training inputs (a
        train() call on other inputs starts a new probe, whose first churn is 0)."""
        if self.config.input_sequence:  # a token's start cell is its index: nothing to churn
            return
        probe = inputs[:PROBE_SIZE]
        kept = self._start_probe
        if kept is None or kept.inputs.shape != probe.shape or not torch.equal(kept.inputs.cpu(), probe.cpu()):
            self._start_probe = StartCellProbe(self._to_device(probe))

    # ---- dead-run alarm -------------------------------------------------------------------------
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

    # ---- evaluation -----------------------------------------------------------------------------
    def _eval_batch_summary(self, model: nn.Module) -> dict[str, float]:
        return model.last_trace.summary()

    def _eval_metrics(self, summaries: list[dict[str, float]], sizes: list[int]) -> dict[str, float]:
        """The dynamics as ``flows_<key>``: ``arrived_per_sample`` and ``spawned_per_sample`` (flows
        that reached the output face / were spawned, per input), ``energy_arrived_fraction``,
        ``mean_active_flows`` and ``steps`` (the trace's per-batch values averaged with batch-size
        weights; note that ``mean_active_flows`` counts a whole evaluation batch, as the trace does),
        plus ``neighbourhood_flows`` and ``energy_created_fraction`` when the engine's trace reports them."""
        return _flow_dynamics(summaries, sizes)

    # ---- what a checkpoint keeps ------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        # the per-sample flow budget of the model: evaluation and export run under it
        return {"active_flow_budget": int(self.processor.active_flow_budget)}

    def _apply_settings(self, settings: dict[str, Any]) -> None:
        if settings.get("active_flow_budget") is not None:
            self.processor.active_flow_budget = settings["active_flow_budget"]

    def _config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        # adaptive: the controller's state
        state = {"flow_budget": self.flow_budget.state_dict() if self.flow_budget is not None else None}
        return super().save_checkpoint(path, {**state, **(extra or {})})

    def _optimizer_state_of(self, ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
        # a config saved by an older efgraph, read with the values that version computed with
        saved = EnergyConfig.from_saved(ckpt["config"], str(path))
        check_compatible(saved.to_dict(), self.config.to_dict(), ARCHITECTURE_KEYS)
        # a checkpoint from before the model's parts moved holds its parameters in another order
        return optimizer_state_for(self.processor, self.optimizer, ckpt["optimizer"], ckpt["model"],
                                   rename_legacy_keys(list(ckpt["model"])))

    def _load_run_state(self, extra: dict[str, Any]) -> None:
        if self.flow_budget is not None and extra.get("flow_budget") is not None:
            self.flow_budget.load_state_dict(extra["flow_budget"])
        self.processor.active_flow_budget = self._current_budget()


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
