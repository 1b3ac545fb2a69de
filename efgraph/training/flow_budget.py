"""The adaptive flow budget (``flow_budget: adaptive``): the per-sample cap on active flows, moved
between training forwards by :class:`AdaptiveFlowBudget`.

Why. With ``flow_budget: fixed`` every forward may grow each sample to ``max_active_flows`` flows.
That one number has two jobs it does badly at once: it must be small enough that the worst case
fits the device (else the memory check refuses the run, or the plan falls back to checkpointing and
micro-batches), and large enough that it does not choke the flows where the dynamics need them;
and how much compute a forward costs is whatever the dynamics make of it. The adaptive budget
splits the jobs: ``max_active_flows`` is only the ceiling, the memory plan sets the cap that
memory allows, and a compute target (``flow_budget_target``, flow-steps per sample per forward)
sets where under the cap the budget sits. :attr:`FlowProcessor.active_flow_budget` is the seam:
spawning never takes a sample past it; the controller writes it before each training forward.

The cap. The trainer first chooses its memory plan (activation checkpointing, micro-batch size;
:func:`efgraph.utils.memory.estimate_training_memory`): the plan for the config's worst case if
one fits, else, where ``fixed`` would refuse the run, the plan for the largest budget that fits
(:func:`plan_adaptive_budget`). Under that plan the cap is the largest budget whose worst case fits
the memory limit (:func:`budget_cap`), recomputed when free memory changes
(:meth:`AdaptiveFlowBudget.replan`, on every logged step). Without ``memory_check`` the cap is
``max_active_flows``.

The target. After a training forward the controller reads the measured flow-steps per sample
``m = sum(trace.active) / trace.batch_size`` (over all micro-batches and, with several processes,
all ranks: every rank then moves its budget alike) and moves the budget multiplicatively,
``b <- b * (target / m) ** gain`` with ``gain = 0.5``, clamped to ``[initial_flows_per_sample,
cap]``. While the budget binds, flow-steps grow about linearly with it (at most: a budget raises
only the steps after the flows reach it), so in log space each update closes about half of the
remaining gap; a gain below 1 damps the noise of a single batch and never overshoots a monotone
response. The budget is kept as a float (so small corrections add up) and applied rounded. Where
the budget does not bind (the dynamics want fewer flows than it allows, ``m < target``) it climbs to
the cap and stays there, which is right: it is a cap, not a quota. With ``flow_budget_target: 0``
the budget is the cap. The first budget is the smallest whose worst-case flow-steps reach the
target (:func:`budget_for_flow_steps`): where every flow spawns, that is the answer.

State. The budget changes what the model computes, so it is state: it is saved in the trainer's
checkpoints (``extra["flow_budget"]``) and restored on resume (clamped to the resumed device's
cap), kept with the best state and exported with the model (``efgraph.model_io``). Evaluation
forwards use the budget the training forwards use at that time (the model evaluated is the model
trained), and the final test uses the best state's budget.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable

import torch

from efgraph.config import EnergyConfig
from efgraph.utils import memory
from efgraph.utils.device import process_rss_mb
from efgraph.utils.logging import get_logger
from efgraph.utils.memory import MemoryEstimate, estimate_training_memory, human_bytes, plan_memory

logger = get_logger(__name__)

# exponent of the multiplicative update: 1 would jump to where the last batch says the target
# lies (noisy, and overshoots when flow-steps grow faster than the budget), 0.5 closes half the gap
GAIN = 0.5


def at_budget(config: EnergyConfig, flows: int) -> EnergyConfig:
    """``config`` with ``max_active_flows = flows``: what a forward under that budget can reach.

    (As a fixed-budget config: a compute target above the smaller worst case would not validate.)
    """
    return dataclasses.replace(config, max_active_flows=flows, flow_budget="fixed", flow_budget_target=0.0)


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The largest ``n`` in ``[lo, hi]`` with ``ok(n)`` for a predicate that is true up to some
    point and false after it (a bisection); ``lo - 1`` when ``ok(lo)`` is false."""
    return lo - 1 + bisect.bisect_left(range(lo, hi + 1), True, key=lambda n: not ok(n))


def budget_cap(config: EnergyConfig, plan: MemoryEstimate, limit_bytes: int | None = None) -> int:
    """The largest per-sample budget whose worst case fits ``limit_bytes`` (default: the plan's
    limit) under ``plan``'s activation checkpointing and micro-batch size, at most
    ``max_active_flows``; ``initial_flows_per_sample - 1`` when not even the smallest budget fits."""
    limit = plan.limit_bytes if limit_bytes is None else int(limit_bytes)
    num_parameters = plan.parameter_bytes // 4

    def fits(n: int) -> bool:
        estimate = plan_memory(at_budget(config, n), num_parameters, plan.batch_size, plan.micro_batch_size,
                               plan.activation_checkpointing, limit)
        return estimate.total_bytes <= limit

    return _largest(config.initial_flows_per_sample, config.max_active_flows, fits)


def budget_for_flow_steps(config: EnergyConfig, flow_steps: float) -> int:
    """The smallest budget (at most ``max_active_flows``) whose worst-case flow-steps per sample
    reach ``flow_steps``: where every flow spawns whenever it may, the budget of that target."""
    lo = config.initial_flows_per_sample
    short = _largest(lo, config.max_active_flows, lambda n: at_budget(config, n).worst_case_flow_steps < flow_steps)
    return min(short + 1, config.max_active_flows)


def plan_adaptive_budget(config: EnergyConfig, num_parameters: int, batch_size: int, limit_bytes: int,
                         *, where: str = "limit_bytes") -> MemoryEstimate:
    """The memory plan of an adaptive-budget run: the plan for ``max_active_flows`` when one fits
    (as with a fixed budget), else the plan for the largest budget that fits (checkpointing and
    the micro-batches that budget needs), instead of refusing the run.

    Raises:
        ValueError: not even a budget of ``initial_flows_per_sample`` (no spawns) fits; the
            memory check's refusal for that budget, naming the fields to lower.
    """
    try:
        return estimate_training_memory(config, num_parameters, batch_size, limit_bytes, where=where)
    except ValueError:
        pass

    def fits(n: int) -> bool:
        try:
            estimate_training_memory(at_budget(config, n), num_parameters, batch_size, limit_bytes, where=where)
        except ValueError:
            return False
        return True

    lo = config.initial_flows_per_sample
    n = _largest(lo, config.max_active_flows - 1, fits)
    try:
        plan = estimate_training_memory(at_budget(config, max(n, lo)), num_parameters, batch_size, limit_bytes,
                                        where=where)
    except ValueError as err:  # the refusal at the smallest budget names the limit and the fields to lower
        raise ValueError(f"flow_budget: adaptive: not even a budget of initial_flows_per_sample = {lo} flows per "
                         f"sample (no spawns) fits; {err}") from None
    logger.warning("flow budget: max_active_flows %d does not fit %s (%s) under any plan; the adaptive budget is "
                   "capped at %d flows per sample", config.max_active_flows, human_bytes(limit_bytes), where, n)
    return plan


def held_memory_bytes(device: torch.device) -> int:
    """What this process holds on ``device`` and could use again: CUDA's reserved memory (the
    caching allocator's), or the host's resident set size (:func:`efgraph.utils.device.process_rss_mb`)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_reserved(device))
    return int(process_rss_mb() * 2**20)


def memory_for_run(device: torch.device, held_at_plan: int) -> int:
    """The memory limit to plan for now, comparable with the one planned for at the start: the
    device's free memory plus what this process took since then (``held_at_plan`` =
    :func:`held_memory_bytes` when it planned), which the run's own tensors occupy and may reuse.
    Without that correction each re-plan would count the run's own memory against it and shrink."""
    return memory.available_memory_bytes(device) + max(held_memory_bytes(device) - held_at_plan, 0)


class AdaptiveFlowBudget:
    """Moves the per-sample flow budget between ``[initial_flows_per_sample, cap]`` toward a compute
    target, where ``cap <= max_active_flows`` is what the memory plan allows (see the module
    docstring for why and how).

    Args:
        config: the run's config (``flow_budget_target``, the flow budgets, the model's sizes).
        plan: the trainer's memory plan, or ``None`` without ``memory_check`` (cap =
            ``max_active_flows``).

    Use: write :attr:`budget` into ``processor.active_flow_budget`` before a training forward,
    then call :meth:`update` with the forward's flow-steps and rows. :attr:`target` (flow-steps
    per sample per forward, 0 = none) may be changed between updates; :attr:`value` is the
    unrounded budget (the state a checkpoint keeps).
    """

    def __init__(self, config: EnergyConfig, plan: MemoryEstimate | None) -> None:
        self.config = config
        self.plan = plan
        self.floor = config.initial_flows_per_sample
        self.target = config.flow_budget_target
        self.limit_bytes = plan.limit_bytes if plan is not None else None
        self.cap = config.max_active_flows if plan is None else budget_cap(config, plan)
        if self.cap < self.floor:
            raise ValueError(f"memory_check: not even {self.floor} flows per sample (initial_flows_per_sample, "
                             f"no spawns) fit {human_bytes(plan.limit_bytes)} under the memory plan")
        self.value = float(self.cap if self.target <= 0 else min(self.cap, budget_for_flow_steps(config, self.target)))
        self.last_flow_steps_per_sample: float | None = None
        self._starved = False  # the last re-plan found not even the floor fitting

    @property
    def budget(self) -> int:
        """The budget to apply: the controller's value rounded, within ``[floor, cap]``."""
        return min(max(math.floor(self.value + 0.5), self.floor), self.cap)

    def update(self, flow_steps: float, batch_size: int) -> int:
        """After a training forward of ``batch_size`` rows that ran ``flow_steps`` flow-steps (the
        sum over lattice steps of the active flows): move toward the target; returns the new budget."""
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        measured = flow_steps / batch_size
        self.last_flow_steps_per_sample = measured
        if self.target <= 0:
            self.value = float(self.cap)
        elif measured > 0:
            self.value *= (self.target / measured) ** GAIN
        self.value = min(max(self.value, float(self.floor)), float(self.cap))
        return self.budget

    def replan(self, limit_bytes: int) -> int:
        """The free memory changed: recompute the cap under the same plan for ``limit_bytes`` (the
        budget drops to it at once; with no target it rises with it). Returns the new cap; not
        below ``initial_flows_per_sample`` (a warning then: the plan no longer fits at all).
        Without a plan (no ``memory_check``) the cap stays ``max_active_flows``."""
        if self.plan is None:
            return self.cap
        cap = budget_cap(self.config, self.plan, limit_bytes)
        if cap < self.floor and not self._starved:  # once, until memory comes back
            logger.warning("flow budget: not even %d flows per sample fit %s under the memory plan; the budget "
                           "stays at that floor", self.floor, human_bytes(limit_bytes))
        self._starved = cap < self.floor
        self.set_cap(max(cap, self.floor))
        self.limit_bytes = int(limit_bytes)
        return self.cap

    def set_cap(self, cap: int) -> None:
        """Set the cap (e.g. the smallest over the ranks of several processes) and clamp to it."""
        if cap != self.cap:
            logger.info("flow budget: cap %d -> %d flows per sample", self.cap, cap)
        self.cap = min(max(int(cap), self.floor), self.config.max_active_flows)
        self.value = float(self.cap) if self.target <= 0 else min(self.value, float(self.cap))

    def state_dict(self) -> dict[str, float]:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue from a saved budget, within this run's ``[floor, cap]`` (the device may differ)."""
        value = float(state["value"])
        self.value = float(self.cap) if self.target <= 0 else min(max(value, float(self.floor)), float(self.cap))
