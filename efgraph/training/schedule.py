"""Learning-rate schedule: linear warm-up, then cosine decay to 0.

One ``LambdaLR`` over a closed-form factor, rather than torch's
``SequentialLR([LinearLR(start_factor=1/warmup, total_iters=warmup-1),
CosineAnnealingLR(T_max=total-warmup)], milestones=[warmup])``. From step 0 the two give the
same learning rate at every step up to ``total_steps`` (``tests/test_optimizer_and_schedule.py``
checks it step by step), but the closed form is what resuming needs:

* ``current_step > 0`` (a second ``train`` call that stretches the run to a new total) is
  ``LambdaLR(last_epoch=current_step - 1)``: the factor of any step is computed, not replayed.
  ``SequentialLR`` (torch 2.13) built with ``last_epoch=k - 1`` starts at the peak and follows
  another curve, and ``CosineAnnealingLR`` is recursive (each step's lr from the previous one),
  so it cannot be placed mid-run with a new span;
* past ``total_steps`` the factor stays at 0; ``CosineAnnealingLR`` rises again;
* ``warmup_steps == total_steps`` is a warm-up and nothing else here; ``CosineAnnealingLR``
  with ``T_max=0`` divides by zero.

A checkpoint's ``LambdaLR`` state (its step) restores the schedule exactly on resume.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based, the step about to be taken)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                            current_step: int = 0) -> LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine_factor` (its state_dict restores on resume).

    ``current_step > 0`` continues a run whose optimizer already took that many steps (e.g. a
    second ``train`` call with more epochs): the schedule picks up there instead of warming up again.
    """
    factor = lambda step: warmup_cosine_factor(step, warmup_steps, total_steps)  # noqa: E731
    if current_step == 0:
        return LambdaLR(optimizer, factor)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return LambdaLR(optimizer, factor, last_epoch=current_step - 1)

