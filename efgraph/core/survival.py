"""The survival gradient: how a flow that dies still tells the carrier whether it should have lived.

Death is a hard threshold (``energy < energy_threshold``): the flow leaves the active set and
everything it would have done later is never computed, so by itself death sends *no* gradient
back. A model can then learn to kill flows (silencing an untrained lattice lowers the loss
during warm-up) but never learn to keep them, and once every flow dies before the output face
the output is ``x + bias`` and every other parameter's gradient is exactly zero: an absorbing
"dead lattice" (issue 11).

The fix treats survival as a spiking neuron treats a spike: the forward keeps the hard step, the
backward uses a surrogate derivative. A dying flow adds a *phantom* deposit at its current
(x, y) on the output face::

    phantom energy = threshold * (s - s.detach()),  s = 0.5 * u / (1 + |u|),
    u = energy_logit - logit(threshold)

which is exactly zero in the forward (so outputs, energies and the books are unchanged) while
its gradient with respect to the flow's energy logit is ``threshold * 0.5 / (1 + |u|)^2`` times
what a deposit of that flow's value would have done to the loss. A flow whose would-be deposit
helps is pushed to survive; one whose deposit would hurt is pushed further down. The fast-sigmoid
surrogate (Zenke & Ganguli, SuperSpike) decays polynomially, not exponentially, so flows far under
the threshold still hear it, which is what lets a dead lattice come back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def survival_phantom_energy(energy_logit: Tensor, threshold: float) -> Tensor:
    """``[N]`` zeros in the forward whose gradient is the surrogate survival signal (see module doc).

    Args:
        energy_logit: ``[N]`` the carrier's energy logits of the dying flows.
        threshold: ``energy_threshold``; the phantom deposits as if the flow had just survived.
    """
    t = min(max(threshold, 1e-6), 1.0 - 1e-6)  # a zero threshold never kills anyone, keep logit finite
    u = energy_logit.float() - math.log(t / (1.0 - t))
    s = 0.5 * u / (1.0 + u.abs())
    return threshold * (s - s.detach())
