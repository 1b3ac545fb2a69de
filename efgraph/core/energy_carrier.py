"""`EnergyCarrier`: the shared recurrent cell that carries every flow, and its heads (move, energy, spawn)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from efgraph.core.model_config import ModelConfig, config_attribute

# Initial biases, chosen so that an untrained model behaves sensibly (and tests are not flaky):
# the carrier sets energies near sigmoid(2) = 0.88, above the preset spawn threshold (0.8), so an
# untrained lattice lives, spawns and reaches the output face. How far a jump goes at the start is
# the config's jump_init (0.5: about half the remaining depth, ~log2(D) steps rather than D-1).
ENERGY_INIT_BIAS = 2.0
# a spawn score centred on 0: about half of the flows above the spawn threshold want to spawn,
# whatever the random draw of the head's bias (a negative draw used to switch spawning off)
SPAWN_INIT_BIAS = 0.0


@dataclass
class CarrierHeads:
    """Per-flow outputs of the heads for F flows.

    Attributes:
        dxy: ``[F, 2]`` lateral move in cells, within ``+-max_lateral_step``.
        dz_fraction: ``[F]`` in (0, 1): jump length beyond one cell, as a fraction of the depth left.
        energy_logit: ``[F]``: the carrier *sets* the flow's next energy to ``sigmoid(energy_logit)``,
            so energy can rise as well as fall and stays in (0, 1); a flow that was split by a
            spawn can climb back above ``spawn_threshold`` and spawn again.
        spawn_score: ``[F]`` logit; a flow may spawn when it is > 0, and ``sigmoid(score) / 2``
            of its energy goes to the child (so the score also gets a gradient).
        child_dxy: ``[F, 2]`` the child's lateral offset from its parent.
    """

    dxy: Tensor
    dz_fraction: Tensor
    energy_logit: Tensor
    spawn_score: Tensor
    child_dxy: Tensor


class EnergyCarrier(nn.Module):
    """A GRU or LSTM (``carrier_hidden_dim`` x ``carrier_num_layers``) shared by all flows.

    Every step, all flows go through *one* batched recurrent call (a sequence of length 1 of F
    flows), then through small linear heads on the top layer's output: displacement, next energy
    and spawn. A flow's first state is the input face's (:class:`~efgraph.core.input_face.InputFace`)
    and what it deposits on arrival the output face's value head
    (:class:`~efgraph.core.readout.OutputFace`).

    Args:
        config: carrier_type, carrier_hidden_dim, carrier_num_layers, neuron_output_dim,
            position_encoding_dim, child_rank, max_lateral_step, spawn_threshold.

    Shapes:
        step input: ``[F, neuron_output_dim + 1 + position_encoding_dim]`` (transformation,
        energy, position encoding); hidden state ``[L, F, H]``.
    """

    config = config_attribute()  # the processor's one frozen config, set once

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_dim = config.carrier_hidden_dim
        self.num_layers = config.carrier_num_layers
        self.is_lstm = config.carrier_type == "lstm"
        self.step_input_dim = config.neuron_output_dim + 1 + config.position_encoding_dim
        rnn_cls = nn.LSTM if self.is_lstm else nn.GRU
        self.rnn = rnn_cls(self.step_input_dim, self.hidden_dim, self.num_layers)
        self.displacement_head = nn.Linear(self.hidden_dim, 3)
        self.energy_head = nn.Linear(self.hidden_dim, 1)
        self.spawn_head = nn.Linear(self.hidden_dim, 3)
        # a child's hidden state = parent's + low-rank learned perturbation (a copy would be useless)
        self.child_down = nn.Linear(self.hidden_dim, config.child_rank)
        self.child_up = nn.Linear(config.child_rank, self.hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.children():
            module.reset_parameters()
        with torch.no_grad():
            self.energy_head.bias.fill_(ENERGY_INIT_BIAS)
            self.displacement_head.bias[2] = math.log(self.config.jump_init / (1.0 - self.config.jump_init))
            self.spawn_head.bias[0] = SPAWN_INIT_BIAS

    def step(self, inputs: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """One recurrent call over all flows: ``inputs [F, in]`` -> ``(top [F, H], h, c)``.

        Always in fp32, also under bf16 autocast: the state is carried across up to D-1 steps and
        its rounding errors would compound; the heads and the neuron may run in bf16.
        """
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            inputs = inputs.float()
            if self.is_lstm:
                out, (h_new, c_new) = self.rnn(inputs.unsqueeze(0), (h, c))
            else:
                out, h_new = self.rnn(inputs.unsqueeze(0), h)
                c_new = None
        return out.squeeze(0), h_new, c_new

    # ---- heads -----------------------------------------------------------------------------------
    def heads(self, top: Tensor) -> CarrierHeads:
        """Heads on the top layer output ``[F, H]``, always in fp32 (also under bf16 autocast):
        they decide moves, energies and spawns, and bf16's 8-bit mantissa would move a flow by
        ~0.2 cell at D=50 and blur the thresholds. They are three tiny products, so this is free."""
        with torch.autocast(device_type=top.device.type, enabled=False):
            top = top.float()
            disp = self.displacement_head(top)
            spawn = self.spawn_head(top)
            energy_logit = self.energy_head(top).squeeze(1)
        step = self.config.max_lateral_step
        return CarrierHeads(
            dxy=torch.tanh(disp[:, :2]) * step,
            dz_fraction=torch.sigmoid(disp[:, 2]),
            energy_logit=energy_logit,
            spawn_score=spawn[:, 0],
            child_dxy=torch.tanh(spawn[:, 1:]) * step,
        )

    # ---- spawning --------------------------------------------------------------------------------
    def can_spawn(self, energy: Tensor, spawn_score: Tensor) -> Tensor:
        """``[F]`` bool: energy above ``spawn_threshold`` and a positive spawn score."""
        return (energy > self.config.spawn_threshold) & (spawn_score > 0)

    def split_fraction(self, spawn_score: Tensor) -> Tensor:
        """Fraction of a parent's energy that goes to its child, in (0, 0.5)."""
        return 0.5 * torch.sigmoid(spawn_score)

    def spawn(self, h: Tensor, c: Tensor | None, gate: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Children's states from their parents' ``[L, S, H]`` states (same layer-wise shape).

        ``gate`` (a scalar, ``residual_steps``) scales the child's perturbation: a child spawned by
        a nearly closed step is nearly a copy of its parent, so opening a gate changes the output
        continuously."""
        perturbation = self.child_up(torch.tanh(self.child_down(h)))
        h_child = h + (perturbation if gate is None else gate * perturbation)
        return h_child, c  # c comes from index_select: already a fresh tensor
