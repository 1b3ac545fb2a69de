"""AdamW with weight decay on the weight matrices only (the model's trainer and the MLP baseline).

Weight decay pulls every decayed parameter towards 0 at each step, whatever the loss says. For
a weight matrix that is the intended regulariser; for a scalar or a vector it is a bias in the
model: the lattice's ``output_gate`` (a scalar that scales the whole lattice's contribution)
would be pulled towards "off", the energy bias towards a fixed injection energy, biases and
normalisation scales towards 0. So, as nanoGPT's ``configure_optimizers`` does, parameters with
``dim() >= 2`` (linear and recurrent weight matrices, the lattice's per-cell key table) are
decayed and parameters with ``dim() < 2`` (biases, gates, scalars, norm weights, per-channel
scales) are not. The optimizer has these two groups, in this order, always (an empty group
stays), so its ``state_dict`` keeps one layout for every model.

``weight_decay_on: all`` (what efgraph did before this rule, and what a run saved then resumes
with) is one group that decays every parameter.
"""

from __future__ import annotations

import torch
from torch import nn

DECAY_GROUP, NO_DECAY_GROUP = 0, 1


def weight_decay_groups(model: nn.Module, weight_decay: float, decay_on: str = "matrices") -> list[dict]:
    """``[{"params": matrices, "weight_decay": weight_decay}, {"params": the rest, "weight_decay": 0}]``;
    with ``decay_on="all"`` one group ``[{"params": every parameter, "weight_decay": weight_decay}]``.

    Every parameter of ``model`` is in exactly one group (shared parameters once), in the order of
    ``model.parameters()``.
    """
    params = list(model.parameters())  # deduplicated by nn.Module
    if decay_on == "all":
        return [{"params": params, "weight_decay": weight_decay}]
    if decay_on != "matrices":
        raise ValueError(f"weight_decay_on: must be one of ('matrices', 'all'), got {decay_on!r}")
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def adamw(model: nn.Module, lr: float, weight_decay: float, decay_on: str = "matrices") -> torch.optim.AdamW:
    """AdamW over :func:`weight_decay_groups` of ``model`` (``decay_on``: the config's ``weight_decay_on``)."""
    return torch.optim.AdamW(weight_decay_groups(model, weight_decay, decay_on), lr=lr, weight_decay=weight_decay)
