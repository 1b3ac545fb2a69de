r"""`OutputFace`: the learned output face, where the flows deposit and y is read; `Landings`, one forward's deposits.

A flow that ends on the output face (z = D-1) deposits ``f = energy * value`` (``value``: a head on
the flow's carrier state) with bilinear weights on the four face cells nearest its landing point,
so the landing position receives a gradient. With ``readout: face`` each face cell ``q`` owns its
readout ``R_q = \sum_k L_{qk} B_k`` (rank ``readout_rank``; ``L``: a learned key per cell, ``B_k``:
``[output_dim, c]``)::

    y = g * sum_q R_q f_q + b = g * B vec(sum_q L_q f_q^T) + b

so the same deposit on another cell writes another part of y, and moving a flow moves y through
the weights. ``sum_q L_q f_q^T`` is a sum over arrivals of ``energy * L(xy) value^T``, with
``L(xy)`` the bilinear interpolation of the keys at the landing point: only the landing points
cost compute, no face cell is materialised. Where the landings outnumber the face's cells enough,
the same sum is cheaper on the face itself, ``L^T F`` with ``F`` the deposits summed on each cell
(:func:`face_grid_is_cheaper`). With ``readout: shared`` (the earlier formulation, kept so that
runs saved with it still load) one bias-free MLP runs on every hit cell and is summed per sample,
position entering only as an additive code in each deposit: y is blind to where the flows land.
``g`` is a learned gate started at ``output_gate_init``.

Which deposits a forward collects when is :class:`Landings`' part:

* ``readout: face``: the collected face is linear in the deposits, so each step collects its own
  (inside its compiled ``deposit`` graph, :meth:`OutputFace.deposit`) and the forward sums them;
* ``readout: shared``: one MLP on each hit cell's summed deposit is not linear in the deposits (two
  flows on one cell in two steps are not two faces), so every step's deposits are kept and
  collected all at once when y is read.

In both, the deposits of dying flows with ``survival_gradient`` (the *phantoms*, zero energy in the
forward, :mod:`efgraph.core.survival`) are collected apart from the arrivals, so that the readout
can pass their gradient past a closed output gate; a forward in which nothing arrived reads an
empty face.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from efgraph.core.model_config import ModelConfig, config_attribute
from efgraph.core.compaction import unique_padded
from efgraph.core.energy_lattice import EnergyLattice
from efgraph.core.flow_state import FlowState
from efgraph.core.records import Arrivals, StepResult


@dataclass
class FaceDeposit:
    """What arrived on the output face, compacted to the cells that were hit (``readout: shared``).

    A forward with A arrivals has N = 4A rows (a static size, so compaction needs no host
    sync): rows ``< num_cells`` are the M hit cells, ascending; the rest are padding rows, which
    the readout masks out (their ``batch`` is B, a row that is dropped).

    Attributes:
        cell_id: ``[N]`` sample * W * H + y * W + x (padding rows: 0).
        batch: ``[N]`` sample index of each cell; B for the padding rows.
        values: ``[N, face_channels]`` sum of energy * bilinear weight * value.
        energy: ``[N]`` sum of energy * bilinear weight (sums to the arrived energy).
        num_cells: scalar int64 tensor, M.
    """

    cell_id: Tensor
    batch: Tensor
    values: Tensor
    energy: Tensor
    num_cells: Tensor


def face_grid_is_cheaper(rows: int, face_rows: int) -> bool:
    """Whether :meth:`OutputFace.collect` sums the deposits on the materialised face
    (``face_rows`` = samples x face cells, one small matrix product per cell) rather than over the
    ``rows`` landing points (an ``[A, r, c]`` outer product each). A product row is an order of
    magnitude cheaper than a broadcast one on a CPU (``scripts/bench_step.py``: routing's readout
    2.8 -> 1.1 ms, the Bible's 2.8 -> 1.6 ms at 13 face rows a landing), hence the factor 16: a
    large face that few flows reach keeps the landing points. Host integers: no sync."""
    return face_rows <= 16 * rows


class OutputFace(nn.Module):
    """The learned output face: deposits of the flows that end -> ``y [B, output_dim]``.

    Args:
        config: reads ``readout``, ``readout_rank``, ``readout_hidden_dim``, ``face_channels``,
            ``output_dim``, ``carrier_hidden_dim`` (the value head's input) and ``output_gate_init``.
        lattice: the geometry (landing corners, position code of a face cell).

    Shapes:
        :meth:`deposit`: ``F`` rows of a step -> :class:`Arrivals` ``[F]`` and, for ``readout: face``,
        the collected face ``[B, readout_rank * face_channels]``; :meth:`read`: ``[B, K]`` -> ``[B, output_dim]``.
    """

    config = config_attribute()  # the processor's one frozen config, set once

    def __init__(self, config: ModelConfig, lattice: EnergyLattice) -> None:
        super().__init__()
        self.config = config
        self.lattice = lattice
        # what an arriving flow deposits (times its energy): a head on its carrier state
        self.value_head = nn.Linear(config.carrier_hidden_dim, config.face_channels)
        if config.readout == "face":
            self.readout_keys = nn.Parameter(torch.empty(config.face_cells, config.readout_rank))
            self.readout_out = nn.Linear(config.readout_rank * config.face_channels, config.output_dim, bias=False)
        else:
            self.face_position_value = nn.Linear(config.position_encoding_dim, config.face_channels, bias=False)
            self.readout_hidden = nn.Linear(config.face_channels, config.readout_hidden_dim, bias=False)
            self.readout_out = nn.Linear(config.readout_hidden_dim, config.output_dim, bias=False)
        self.readout_bias = nn.Parameter(torch.empty(config.output_dim))
        # learned scalar on the flows' contribution; starting at 0 scales the lattice in from zero
        self.output_gate = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in (m for m in self.children() if m is not self.lattice):
            module.reset_parameters()
        if self.config.readout == "face":
            with torch.no_grad():
                self.readout_keys.copy_(smooth_face_field(self.lattice.width, self.lattice.height,
                                                          self.config.readout_rank))
        nn.init.zeros_(self.readout_bias)
        nn.init.constant_(self.output_gate, self.config.output_gate_init)

    def deposit(self, moved: FlowState, top: Tensor, energy: Tensor, ends: Tensor,
                batch_size: int) -> tuple[Arrivals, Tensor | None]:
        """The rows of a step where ``ends`` ``[F]`` as deposits of ``energy`` ``[F]`` at their new
        (x, y), valued by their carrier state ``top [F, H]``, and, for ``readout: face``, their
        collected face ``[B, K]`` (here, inside the step's graph; :class:`Landings` sums it over
        the steps and collects the shared readout's deposits once at the end)."""
        deposits = Arrivals(
            batch=torch.where(ends, moved.batch, batch_size),
            # the other rows land at (0, 0): a flow whose position went non-finite never ends,
            # and its NaN must not become a face cell index
            xy=torch.where(ends.unsqueeze(1), moved.pos[:, :2], 0.0),
            energy=torch.where(ends, energy, 0.0),
            value=self.value_head(top),
            flow_id=moved.flow_id,
        )
        return deposits, (self.collect_arrivals(deposits, batch_size) if self.config.readout == "face" else None)

    @torch.no_grad()
    def step_face(self, result: StepResult) -> Tensor | None:
        """``[B, K]`` the face one step's arrivals collected alone (diagnostics), ``None`` when
        nothing arrived; ``readout: shared`` collects them here for this purpose only."""
        if self.config.readout == "face" or result.deposits is None:
            return result.collected
        return self.collect_arrivals(result.deposits, result.batch_size)

    def collect_arrivals(self, deposits: Arrivals, batch_size: int) -> Tensor:
        """``[B, K]`` the collected face of ``deposits`` (rows of sample ``B`` deposit nothing)."""
        return self.collect(deposits.batch, deposits.xy, deposits.energy, deposits.value, batch_size)

    def collect(
        self, batch: Tensor, xy: Tensor, energy: Tensor, values: Tensor, batch_size: int
    ) -> Tensor:
        """Deposit arriving flows on the output face and gather each sample's face for the readout.

        Args:
            batch: ``[A]`` sample of each arriving flow; ``B`` marks a row that deposits nothing.
            xy: ``[A, 2]`` continuous landing position.
            energy: ``[A]`` energy on arrival.
            values: ``[A, face_channels]`` the flow's value vector (from the carrier).
            batch_size: B.

        Returns:
            ``[B, K]`` what :meth:`read` turns into y. ``readout: face``: ``vec(sum_q L_q f_q^T)``
            (``K = readout_rank * face_channels``), the face's deposits in its rank-r cell basis;
            ``readout: shared``: ``sum_q GELU(W_1 f_q)`` over the hit cells (``K = readout_hidden_dim``).
            Linear in the deposits for ``readout: face``, so a zero-energy deposit adds exactly 0.
        """
        if self.config.readout == "shared":
            deposit = self.deposit_on_cells(batch, xy, energy, values, batch_size)
            per_cell = nn.functional.gelu(self.readout_hidden(deposit.values))
            # padding rows go to row B, which is dropped: nothing of them reaches any sample
            return scatter(per_cell, deposit.batch, dim=0, dim_size=batch_size + 1, reduce="sum")[:batch_size]
        cell, weight = self.lattice.landing_corners(xy)
        r, c = self.config.readout_rank, self.config.face_channels
        deposit = energy.unsqueeze(1) * values  # [A, c]
        # rows of sample B (the engine's rows that deposit nothing) go to sample B, which is dropped
        face_cells = self.config.face_cells
        if face_grid_is_cheaper(batch.numel(), (batch_size + 1) * face_cells):
            # sum_q L_q f_q^T with the face materialised: each deposit's bilinear parts summed on
            # its four cells [B + 1, W*H, c], then one product with the keys
            cell_row = (batch.unsqueeze(1) * face_cells + cell).reshape(-1)
            parts = (weight.unsqueeze(2) * deposit.unsqueeze(1)).reshape(-1, c)  # [4A, c]
            face = deposit.new_zeros((batch_size + 1) * face_cells, c).index_add(0, cell_row, parts)
            face = face.view(batch_size + 1, face_cells, c)[:batch_size]
            return torch.einsum("qr,bqc->brc", self.readout_keys, face).reshape(batch_size, r * c)
        # only the landing points: sum over arrivals of L(xy) f^T, L(xy) the keys interpolated there
        keys = (weight.unsqueeze(-1) * self.readout_keys[cell]).sum(dim=1)  # [A, r]
        outer = keys.unsqueeze(2) * deposit.unsqueeze(1)  # [A, r, c]
        return scatter(outer.reshape(-1, r * c), batch, dim=0, dim_size=batch_size + 1, reduce="sum")[:batch_size]

    def deposit_on_cells(
        self, batch: Tensor, xy: Tensor, energy: Tensor, values: Tensor, batch_size: int
    ) -> FaceDeposit:
        """The bilinear deposits compacted to the hit cells (``readout: shared``), each deposit's
        value plus the position code of its cell; see :class:`FaceDeposit`."""
        w, h = self.lattice.width, self.lattice.height
        face_cell, weight = self.lattice.landing_corners(xy)
        corner_id = batch.unsqueeze(1) * (w * h) + face_cell  # [A, 4]
        corner_pos = self.lattice.face_position(face_cell.reshape(-1), self.lattice.depth - 1)
        corner_value = values.unsqueeze(1) + self.face_position_value(self.lattice.position_encoding(corner_pos)).view(
            -1, 4, values.size(1)
        )
        deposit_energy = energy.unsqueeze(1) * weight  # [A, 4]
        deposit = deposit_energy.unsqueeze(-1) * corner_value  # [A, 4, C]

        cell_id, inverse, num_cells = unique_padded(corner_id.reshape(-1), fill=0)
        m = cell_id.numel()
        real = torch.arange(m, device=cell_id.device) < num_cells
        return FaceDeposit(
            cell_id=cell_id,
            batch=torch.where(real, cell_id // (w * h), batch_size),
            values=scatter(deposit.reshape(-1, values.size(1)), inverse, dim=0, dim_size=m, reduce="sum"),
            energy=scatter(deposit_energy.reshape(-1), inverse, dim=0, dim_size=m, reduce="sum"),
            num_cells=num_cells,
        )

    def read(self, collected: Tensor, phantom: Tensor | None = None) -> Tensor:
        """``[B, K]`` collected face (:meth:`collect`) -> ``[B, output_dim]``.

        ``y = g * W_out(collected) + b``. ``phantom`` is the collected face of the dying flows'
        zero-energy deposits (:mod:`efgraph.core.survival`): exactly zero in the forward, it enters
        with a gate of ``+-max(|g|, 1)`` (detached) instead of ``g``, so the survival gradient
        still reaches the energy head when ``g`` is 0 (the default start), which is what lets a
        dead lattice come back.
        """
        gate = self.output_gate
        summed = gate * collected
        if phantom is not None:
            g = gate.detach()
            phantom_gate = torch.where(g < 0, -1.0, 1.0) * g.abs().clamp(min=1.0)
            summed = summed + phantom_gate * phantom
        # sum over cells before the (linear, bias-free) last layer: it runs on B rows, not 4A
        return self.readout_out(summed) + self.readout_bias


class Landings:
    """What the flows of one forward deposited: :meth:`add` each step's result, then :meth:`read` y.

    Args:
        face: the model's :class:`OutputFace` (readout weights and arithmetic).
        batch_size: B.
        like: a tensor of the forward's device and dtype (for the empty face).
    """

    def __init__(self, face: OutputFace, batch_size: int, like: Tensor) -> None:
        self.face, self.batch_size = face, batch_size
        self.linear = face.config.readout == "face"  # collected step by step; else all at once
        self.arrivals: list[Arrivals] = []  # every step's deposits (all rows: padding and others too)
        self.phantoms: list[Arrivals] = []
        self.collected: Tensor | None = None  # [B, K] readout: face, the sum of the steps' faces
        self.phantom: Tensor | None = None  # [B, K] the same for the phantoms
        self._like = like

    @property
    def empty(self) -> Arrivals:
        """No deposits (made only when needed: a forward without arrivals)."""
        return Arrivals.empty(self._like, self.face.config.face_channels)

    def add(self, result: StepResult) -> None:
        """One step's deposits and phantoms (and, for ``readout: face``, their collected faces)."""
        if result.deposits is not None:
            self.arrivals.append(result.deposits)
        if result.phantoms is not None:
            self.phantoms.append(result.phantoms)
        self.collected = _add(self.collected, result.collected)
        self.phantom = _add(self.phantom, result.phantom_collected)

    def landed(self) -> Arrivals:
        """Every step's deposit rows as one set (rows of sample ``B`` deposit nothing)."""
        return Arrivals.cat(self.arrivals) if self.arrivals else self.empty

    def read(self) -> Tensor:
        """``[B, output_dim]``: y of everything deposited (without the config's ``residual`` x and
        ``linear_skip`` W x, which the processor adds)."""
        collected, phantom = self.collected, self.phantom
        if not self.linear:  # not linear in the deposits: collected once, over all of them
            collected = self.face.collect_arrivals(Arrivals.cat(self.arrivals), self.batch_size) if self.arrivals else None
            phantom = self.face.collect_arrivals(Arrivals.cat(self.phantoms), self.batch_size) if self.phantoms else None
        if collected is None:  # nothing arrived: the face is empty
            collected = self.face.collect_arrivals(self.empty, self.batch_size)
        return self.face.read(collected, phantom)


def _add(total: Tensor | None, part: Tensor | None) -> Tensor | None:
    return part if total is None else total if part is None else total + part


def smooth_face_field(width: int, height: int, channels: int, components: int = 4) -> Tensor:
    """``[W*H, channels]`` random smooth fields over the face (row ``y * W + x``), unit std each.

    Each channel is a sum of ``components`` random plane waves of at most 1.5 cycles across the
    face. The readout keys start smooth so that the gradient with respect to a landing point
    (the difference of the keys of neighbouring cells) points the same way over several cells
    instead of changing at every cell; training is free to make them rough.
    """
    if width * height == 1:
        return torch.randn(1, channels)
    u = torch.arange(width, dtype=torch.float32) / max(width - 1, 1)
    v = torch.arange(height, dtype=torch.float32) / max(height - 1, 1)
    uv = torch.stack(torch.meshgrid(v, u, indexing="ij")[::-1], dim=-1).reshape(-1, 2)  # [W*H, (u, v)]
    freq = (torch.rand(channels, components, 2) * 2 - 1) * 1.5
    phase = torch.rand(channels, components) * 2 * math.pi
    waves = torch.cos(2 * math.pi * torch.einsum("pd,kjd->pkj", uv, freq) + phase).sum(dim=-1)  # [W*H, channels]
    return (waves - waves.mean(dim=0)) / waves.std(dim=0).clamp(min=1e-6)
