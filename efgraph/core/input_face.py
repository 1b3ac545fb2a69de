r"""`InputFace`: where the input embedding enters the lattice and the flows start.

With ``injection: face`` the embedding is laid across the input face (z = 0) as two fields of rank
``r`` (``c = face_channels``, ``r = injection_rank``): cell ``p`` holds

.. math::
    a_p = K_p^\top (W_q x) / \sqrt{r}, \qquad u_p = C_p^\top \mathrm{mat}_{r \times c}(W_u x),

an amplitude and its own ``c``-wide part of x (``K``, ``C``: learned amplitude and content keys
per face cell; ``C`` starts as ``r`` tiles of the face, :func:`face_tiles`). The
``initial_flows_per_sample`` cells of highest amplitude start flows with energy
``sigmoid(a_p + b)``, and a flow's carrier state starts from *its cell's* part and position only:

.. math::
    h_0 = \tanh(W_h u_p + W_p\,\mathrm{pe}(p) + b_h).

**Sequence input** (``input_sequence: true``): x is ``[B, T, input_dim]``, T embeddings (tokens)
with a mask ``[B, T]``, and each real token starts its own flow, as the plan has it ("for each
embedding we create an EnergyCarrier"). Token ``t`` starts on face cell ``t`` in raster order
(``x = t mod W``, ``y = t div W``), the same cell whatever ``T`` is, so a model trained on short
sequences places a longer one's first tokens where it learned them and its later ones on the cells
after; neighbouring tokens sit on neighbouring cells and meet through the step's message passing.
Its energy is ``sigmoid(w_a^T e_t + b)`` and its first state ``tanh(W_s e_t + W_p pe(p_t) + b_h)``:
one shared projection of the token, whatever its index. Masked tokens start no flow.

With ``injection: broadcast`` (the earlier formulation, kept so that runs saved with it still load)
every flow starts from the whole ``x``, ``tanh(W_x x + W_p pe(p))``, so flows differ only by a
position code. The top-K choice is the only place where the face is read whole (``[B, W*H]``
amplitudes); the contents are computed for the chosen cells only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from efgraph.core.model_config import ModelConfig, config_attribute
from efgraph.core.energy_lattice import EnergyLattice
from efgraph.core.flow_state import FlowState


class InputFace(nn.Module):
    """The learned input face: ``x [B, input_dim]`` -> the :class:`FlowState` of the injected flows.

    Args:
        config: reads ``input_dim``, ``injection``, ``injection_rank``, ``face_channels``,
            ``initial_flows_per_sample``, the lattice's width and height, and the carrier's
            ``carrier_type``, ``carrier_hidden_dim``, ``carrier_num_layers`` (the first state's shape).
        lattice: the geometry (start positions and their position code).

    Shapes:
        input: ``x [B, input_dim]``; with ``input_sequence``, ``x [B, T, input_dim]`` and a bool
        ``mask [B, T]`` (True: a token), ``T <= initial_flows_per_sample``.
        output: ``F0`` flows, sample-major: ``h [L, F0, H]`` (and ``c`` zeros for an LSTM carrier),
        ``pos [F0, 3]`` with z = 0, ``energy [F0]`` in (0, 1). ``F0 = B * initial_flows_per_sample``
        for a vector, the number of real tokens for a sequence.
    """

    config = config_attribute()  # the processor's one frozen config, set once

    def __init__(self, config: ModelConfig, lattice: EnergyLattice) -> None:
        super().__init__()
        self.config = config
        self.lattice = lattice
        layers, hidden = config.carrier_num_layers, config.carrier_hidden_dim
        self.energy_bias = nn.Parameter(torch.empty(()))
        if config.input_sequence:  # one shared projection of each token: its amplitude and first state
            self.token_amplitude = nn.Linear(config.input_dim, 1)
            self.token_state = nn.Linear(config.input_dim, layers * hidden)
        else:  # the amplitude field over the face, and what a flow starts from
            self.input_query = nn.Linear(config.input_dim, config.injection_rank)
            self.face_keys = nn.Parameter(torch.empty(config.face_cells, config.injection_rank))
            if config.injection == "face":  # each cell's part of x: content_keys[p] . mat(W_u x)
                self.input_content = nn.Linear(config.input_dim, config.injection_rank * config.face_channels)
                self.content_keys = nn.Parameter(torch.empty(config.face_cells, config.injection_rank))
                self.init_from_cell = nn.Linear(config.face_channels, layers * hidden)
            else:
                self.init_from_input = nn.Linear(config.input_dim, layers * hidden)
        self.init_from_position = nn.Linear(config.position_encoding_dim, layers * hidden, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in (m for m in self.children() if m is not self.lattice):
            module.reset_parameters()
        nn.init.constant_(self.energy_bias, 1.0)  # start energies near sigmoid(1) = 0.73
        if self.config.input_sequence:
            return
        nn.init.normal_(self.face_keys, std=1.0)
        if self.config.injection == "face":
            with torch.no_grad():
                self.content_keys.copy_(face_tiles(self.config.lattice_width, self.config.lattice_height,
                                                   self.config.injection_rank))

    def amplitudes(self, x: Tensor) -> Tensor:
        """``[B, input_dim]`` -> ``[B, W*H]`` injection amplitude per input-face cell."""
        return self.input_query(x) @ self.face_keys.t() / math.sqrt(self.config.injection_rank)

    def start_cells(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(amplitude [B, K], cell [B, K])``: the ``K = initial_flows_per_sample`` cells of
        highest amplitude per sample (face index ``y * W + x``), highest first."""
        return self.amplitudes(x).topk(self.config.initial_flows_per_sample, dim=1)

    def face_content(self, x: Tensor, cell: Tensor) -> Tensor:
        """``[B, K, face_channels]``: ``C_p^T mat(W_u x)``, the part of ``x [B, input_dim]`` that lies
        on each chosen cell ``cell [B, K]`` (``injection: face``; only those cells are computed)."""
        r, c = self.config.injection_rank, self.config.face_channels
        coefficients = self.input_content(x).view(x.size(0), r, c)  # [B, r, c]
        keys = self.content_keys.index_select(0, cell.reshape(-1)).view(*cell.shape, r)  # [B, K, r]
        return torch.bmm(keys, coefficients)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> FlowState:
        """The flows of ``x`` (``[B, input_dim]``, or ``[B, T, input_dim]`` with ``mask [B, T]``) on
        their start cells."""
        if self.config.input_sequence:
            return self.sequence_flows(x, mask)
        lattice = self.lattice
        amplitude, cell = self.start_cells(x)  # [B, K]
        batch = torch.arange(x.size(0), device=x.device).repeat_interleave(cell.size(1))
        pos = lattice.face_position(cell.reshape(-1), 0.0)
        # energies are bookkept in fp32 even under autocast, so energy accounting stays exact
        energy = torch.sigmoid(amplitude.reshape(-1).float() + self.energy_bias)
        if self.config.injection == "face":
            own = self.init_from_cell(self.face_content(x, cell).reshape(batch.numel(), -1))  # [F0, L*H]
        else:
            own = self.init_from_input(x).index_select(0, batch)  # computed once per sample
        h, c = self.first_state(own + self.init_from_position(lattice.position_encoding(pos)))
        return FlowState(h=h, c=c, pos=pos, energy=energy, batch=batch,
                         flow_id=torch.arange(batch.numel(), device=x.device))

    def sequence_flows(self, x: Tensor, mask: Tensor | None) -> FlowState:
        """One flow per real token of ``x [B, T, input_dim]`` (``mask [B, T]``, None: every token),
        token ``t`` on face cell ``t``. Picking the real tokens is a boolean index: on a GPU one host
        sync per forward, at injection (the steps keep theirs to one each)."""
        b, t = x.shape[:2]
        batch = torch.arange(b, device=x.device).repeat_interleave(t)
        cell = torch.arange(t, device=x.device).repeat(b)
        tokens = x.reshape(b * t, -1)
        if mask is not None:
            keep = mask.reshape(-1)
            batch, cell, tokens = batch[keep], cell[keep], tokens[keep]
        pos = self.lattice.face_position(cell, 0.0)
        energy = torch.sigmoid(self.token_amplitude(tokens).squeeze(1).float() + self.energy_bias)
        h, c = self.first_state(self.token_state(tokens) + self.init_from_position(self.lattice.position_encoding(pos)))
        return FlowState(h=h, c=c, pos=pos, energy=energy, batch=batch,
                         flow_id=torch.arange(batch.numel(), device=x.device))

    def first_state(self, pre_activation: Tensor) -> tuple[Tensor, Tensor | None]:
        """``[F0, L*H]`` -> the carrier's ``h [L, F0, H]`` (tanh), and ``c`` zeros for an LSTM.
        fp32 even under autocast: the carrier state stays fp32 across the steps."""
        layers, hidden = self.config.carrier_num_layers, self.config.carrier_hidden_dim
        h = torch.tanh(pre_activation).view(-1, layers, hidden).transpose(0, 1).float().contiguous()
        return h, (torch.zeros_like(h) if self.config.carrier_type == "lstm" else None)


def face_tiles(width: int, height: int, channels: int) -> Tensor:
    """``[W*H, channels]``: the face cut into ``channels`` rectangular tiles (a ``gx x gy`` grid
    with ``gx * gy = channels``, as square as the factors allow), each cell one-hot on its tile.

    The input face's content keys start so: tile k holds row k of ``mat(W_u x)``, a part of x
    of its own, learned independently of the other tiles' parts -- the embedding laid across
    the face. (Random keys would start every cell on a random mixture of all the parts; the two
    starts were not compared over whole runs.)
    """
    gx = max(d for d in range(1, int(math.isqrt(channels)) + 1) if channels % d == 0)
    gy = channels // gx
    if width < height:
        gx, gy = gy, gx  # more tiles along the longer side
    xs = torch.arange(width) * gx // width
    ys = torch.arange(height) * gy // height
    tile = (ys.view(-1, 1) * gx + xs.view(1, -1)).reshape(-1)  # [W*H], row y * W + x
    return nn.functional.one_hot(tile, channels).float()


def token_mask(x: Tensor) -> Tensor:
    """``[B, T]`` bool: the real tokens of a zero-padded sequence ``x [B, T, d]`` (a token is
    padding exactly when every entry is 0; the data loaders refuse a real token of zeros)."""
    return x.ne(0).any(dim=-1)
