"""`SimpleNeuron`: the cell automaton shared by every cell of the lattice."""

from __future__ import annotations

from torch import Tensor, nn

from efgraph.core.model_config import ModelConfig


class SimpleNeuron(nn.Module):
    r"""A tiny MLP evaluated once per *occupied* cell per step.

    .. math::
        t_c = W_2\,\mathrm{GELU}(W_1 [\bar m_c \,\|\, \mathrm{pe}(c)] + b_1) + b_2

    where :math:`\bar m_c` aggregates (``aggregation``: mean or sum) the messages of the flows of
    :math:`c`'s sample within ``interaction_radius`` cells of it (Chebyshev distance; radius 0: the
    flows in :math:`c` only; see :mod:`efgraph.core.message_passing`) and :math:`\mathrm{pe}(c)` is
    the cell's position encoding. The result is the *transformation* every flow in the cell
    receives. 32 -> 64 -> 16 by default (~3k parameters).

    Args:
        config: uses ``neuron_input_dim`` (message_dim + position encoding), ``neuron_hidden_dim``,
            ``neuron_output_dim``.

    Shapes:
        input: ``[C, neuron_input_dim]``; output: ``[C, neuron_output_dim]``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_dim = config.neuron_input_dim
        self.fc1 = nn.Linear(config.neuron_input_dim, config.neuron_hidden_dim)
        self.fc2 = nn.Linear(config.neuron_hidden_dim, config.neuron_output_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, cell_input: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(cell_input)))
