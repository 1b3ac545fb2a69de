"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_ratio`` of the peak."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based, the step about to be taken)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0, current_step: int = 0
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine_factor` (its state_dict restores on resume).

    ``current_step > 0`` continues a run whose optimizer already took that many steps (e.g. a
    second ``train`` call with more epochs): the schedule picks up there instead of warming up again.
    """
    factor = lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio)  # noqa: E731
    if current_step == 0:
        return LambdaLR(optimizer, factor)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return LambdaLR(optimizer, factor, last_epoch=current_step - 1)
