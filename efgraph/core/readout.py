"""`OutputFace`: what the flows of one forward deposit on the output face, and the y it reads out.

A flow that ends on the output face deposits ``energy * value`` at its landing point: a flow that
arrives, and with ``survival_gradient`` a flow that dies, as a *phantom* (a deposit of zero energy
in the forward that carries the survival gradient, :mod:`efgraph.core.survival`). Each step hands
its deposits over as :class:`Arrivals`; :class:`OutputFace` gathers them over the steps and reads
y out once at the end. The weights are the lattice's and the arithmetic of one set of deposits
is :meth:`EnergyLattice.collect_output_energy` (deposits -> collected face ``[B, K]``) and
:meth:`EnergyLattice.read_out` (collected face -> y); what differs between the two readouts is
*when* the deposits are collected:

* ``readout: face``: the collected face is linear in the deposits, so each step collects its own
  (inside its compiled ``deposit`` graph, :func:`collect`) and the face sums the steps' faces;
* ``readout: shared``: one MLP on each hit cell's summed deposit is not linear in the deposits (two
  flows on one cell in two steps are not two faces), so the face keeps every step's deposits and
  collects them all at once when it is read.

In both, the phantoms are collected apart from the arrivals, so that the readout can pass their
gradient past a closed output gate; a forward in which nothing arrived reads an empty face.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from efgraph.core.energy_lattice import EnergyLattice
    from efgraph.core.flow_processor import StepResult


@dataclass
class Arrivals:
    """Deposits on the output face: one row per flow of a step, of which only the flows that end
    there (arrive; or die, for the phantoms) deposit. The other rows have ``batch == B`` (one past
    the batch: the readout drops that row) and zero energy, so every tensor keeps the step's
    static size (no data-dependent shape, no host sync)."""

    batch: Tensor  # [N]
    xy: Tensor  # [N, 2]
    energy: Tensor  # [N]
    value: Tensor  # [N, face_channels]
    flow_id: Tensor  # [N]

    def deposited(self, batch_size: int) -> "Arrivals":
        """Only the rows that deposit (a boolean mask: a host sync; for traces and tests)."""
        keep = self.batch < batch_size
        return Arrivals(self.batch[keep], self.xy[keep], self.energy[keep], self.value[keep], self.flow_id[keep])

    @staticmethod
    def cat(arrivals: list["Arrivals"]) -> "Arrivals":
        """The deposits of several steps as one set of rows (``arrivals`` must not be empty)."""
        return Arrivals(*(torch.cat([getattr(a, name) for a in arrivals])
                          for name in ("batch", "xy", "energy", "value", "flow_id")))


def collect(lattice: "EnergyLattice", deposits: Arrivals, batch_size: int) -> Tensor:
    """``[B, K]`` the collected face of ``deposits`` (rows of sample ``B`` deposit nothing), see
    :meth:`EnergyLattice.collect_output_energy`."""
    return lattice.collect_output_energy(deposits.batch, deposits.xy, deposits.energy, deposits.value, batch_size)


class OutputFace:
    """The output face of one forward: :meth:`add` each step's result, then :meth:`read` y.

    Args:
        lattice: the model's lattice (readout weights and arithmetic).
        batch_size: B.
        like: a tensor of the forward's device and dtype (for the empty face).
    """

    def __init__(self, lattice: "EnergyLattice", batch_size: int, like: Tensor) -> None:
        self.lattice, self.batch_size = lattice, batch_size
        self.linear = lattice.config.readout == "face"  # collected step by step; else all at once
        self.arrivals: list[Arrivals] = []  # every step's deposits (all rows: padding and others too)
        self.phantoms: list[Arrivals] = []
        self.collected: Tensor | None = None  # [B, K] readout: face, the sum of the steps' faces
        self.phantom: Tensor | None = None  # [B, K] the same for the phantoms
        self._like = like

    @property
    def empty(self) -> Arrivals:
        """No deposits (made only when needed: a forward without arrivals)."""
        like, width = self._like, self.lattice.config.face_channels
        rows = torch.zeros(0, dtype=torch.long, device=like.device)
        return Arrivals(rows, like.new_zeros(0, 2), like.new_zeros(0), like.new_zeros(0, width), rows)

    def add(self, result: "StepResult") -> None:
        """One step's deposits and phantoms (and, for ``readout: face``, their collected faces)."""
        if result.deposits is not None:
            self.arrivals.append(result.deposits)
        if result.phantoms is not None:
            self.phantoms.append(result.phantoms)
        self.collected = _add(self.collected, result.collected)
        self.phantom = _add(self.phantom, result.phantom_collected)

    @torch.no_grad()
    def step_face(self, result: "StepResult") -> Tensor | None:
        """``[B, K]`` the face one step's arrivals collected alone (diagnostics), ``None`` when
        nothing arrived; ``readout: shared`` collects them here for this purpose only."""
        if self.linear or result.deposits is None:
            return result.collected
        return collect(self.lattice, result.deposits, self.batch_size)

    def landed(self) -> Arrivals:
        """Every step's deposit rows as one set (rows of sample ``B`` deposit nothing)."""
        return Arrivals.cat(self.arrivals) if self.arrivals else self.empty

    def read(self) -> Tensor:
        """``[B, output_dim]``: y of everything deposited (without the config's ``residual`` x and
        ``linear_skip`` W x, which the processor adds)."""
        collected, phantom = self.collected, self.phantom
        if not self.linear:  # not linear in the deposits: collected once, over all of them
            collected = collect(self.lattice, Arrivals.cat(self.arrivals), self.batch_size) if self.arrivals else None
            phantom = collect(self.lattice, Arrivals.cat(self.phantoms), self.batch_size) if self.phantoms else None
        if collected is None:  # nothing arrived: the face is empty
            collected = collect(self.lattice, self.empty, self.batch_size)
        return self.lattice.read_out(collected, phantom)


def _add(total: Tensor | None, part: Tensor | None) -> Tensor | None:
    return part if total is None else total if part is None else total + part
