"""The records a forward passes between its parts: what one step decided, deposited and counted.

They are plain dataclasses of tensors (and a few host ints) and import nothing of the engine's
modules but :class:`~efgraph.core.flow_state.FlowState` and the carrier's heads, so the input face,
the step, the readout, the trace and the processor that runs them all read the same types without
an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from efgraph.core.compaction import read_counts
from efgraph.core.energy_carrier import CarrierHeads
from efgraph.core.flow_state import FlowState


@dataclass
class EnergyBooks:
    """One step's energy books, each a detached 0-d tensor summed over the step's flows (padding
    rows excluded): falls and rises of the energy the carrier set, the energy of the flows that
    died and of those that arrived, and the energy still in flight after the step."""

    dissipated: Tensor
    created: Tensor
    died: Tensor
    arrived: Tensor
    in_flight: Tensor


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

    @staticmethod
    def empty(like: Tensor, width: int) -> "Arrivals":
        """No deposits, on ``like``'s device and dtype (``width``: face_channels)."""
        rows = torch.zeros(0, dtype=torch.long, device=like.device)
        return Arrivals(rows, like.new_zeros(0, 2), like.new_zeros(0), like.new_zeros(0, width), rows)


@dataclass
class StepCounts:
    """How many flows each fate of a step holds, as host ints: ``alive`` (the flows that continue),
    ``arrived``, ``spawns`` (the children to make), ``occupied`` cells, and a caller's ``also_read``
    (:meth:`efgraph.core.flow_processor.FlowProcessor.step`).

    On the device they travel as one int64 vector, stacked inside the compiled ``decide`` graph
    (:meth:`stack`: no kernel of its own) and copied to the host by :meth:`read` in the step's one
    sync; these two methods are the only code that knows its layout."""

    alive: int
    arrived: int
    spawns: int
    occupied: int
    also_read: int | None = None

    @staticmethod
    def stack(alive: Tensor, arrived: Tensor, spawns: Tensor, occupied: Tensor) -> Tensor:
        """``[4]`` int64: the 0-d counts, laid out for :meth:`read`."""
        return torch.stack([alive, arrived, spawns, occupied])

    @classmethod
    def read(cls, stacked: Tensor, also_read: Tensor | None = None) -> "StepCounts":
        """The host values of :meth:`stack`'s vector (and of a 0-d ``also_read``) in one device ->
        host copy (:func:`~efgraph.core.compaction.read_counts`)."""
        return cls(*read_counts(stacked if also_read is None else torch.cat([stacked, also_read.view(1)])))


@dataclass
class CellStep:
    """The cell part of a step (occupied cells, message passing, neuron)."""

    transformation: Tensor  # [F, neuron_output_dim] the transformation of each flow's cell
    occupied_cell_id: Tensor  # [N >= C] sorted ids of the occupied cells in rows < C, then padding
    neighbourhood_flows: Tensor  # scalar: sum over flows of the flows their cell's neuron heard
    num_occupied: Tensor  # scalar int64: C


@dataclass
class Decision:
    """The first half of a step, up to its one sync: the dense update and every flow's fate."""

    top: Tensor  # [F, H] the carrier's top layer
    h: Tensor  # [L, F, H]
    c: Tensor | None
    # the heads the rest of the step reads (a compiled graph's output that nothing reads would
    # still get a zero gradient materialised in backward: the move's heads are not returned)
    energy_logit: Tensor  # [F]
    spawn_score: Tensor  # [F]
    child_dxy: Tensor  # [F, 2]
    pos: Tensor  # [F, 3] after the move
    energy: Tensor  # [F] the next energy the carrier set
    died: Tensor  # [F] bool
    arrived: Tensor  # [F] bool
    spawns: Tensor  # [F] bool
    counts: Tensor  # [4] int64: StepCounts.stack of the counts, for StepCounts.read
    books: EnergyBooks  # detached
    occupied_cell_id: Tensor  # [F] sorted ids, the occupied cells first
    neighbourhood_flows: Tensor  # scalar
    # only when the caller asked to observe the step (diagnostics, eager): the carrier's input
    # [F, in] and every head, so gradient hooks can be put on them from outside the step
    carrier_input: Tensor | None = None
    heads: CarrierHeads | None = None


@dataclass
class StepResult:
    """Everything one step produced."""

    next_state: FlowState  # continuing flows, then their children (then padding when compiled)
    deposits: Arrivals | None  # the arrivals among the step's rows; None when nobody arrived
    collected: Tensor | None  # [B, K] their collected face (readout: face; linear, summed over steps)
    occupied_cell_id: Tensor  # [C] sorted ids of the occupied cells
    num_spawned: int
    num_died: int
    num_arrived: int
    books: EnergyBooks  # detached
    neighbourhood_flows: Tensor  # scalar: sum over flows of the flows in their interaction neighbourhood
    spawns: Tensor  # [F] bool: the rows that spawned a child
    flow_id: Tensor  # [F] ids of the step's rows
    batch_size: int
    # dying flows as zero-energy deposits that carry the survival gradient (None without it)
    phantoms: Arrivals | None = None
    phantom_collected: Tensor | None = None
    counts: StepCounts | None = None  # the host counts the step read (with step(also_read=...)'s value)

    @property
    def arrivals(self) -> Arrivals:
        """The flows that arrived, in row order (boolean indexing: a host sync; for tests, traces)."""
        if self.deposits is None:
            return Arrivals.empty(self.books.in_flight, 0)
        return self.deposits.deposited(self.batch_size)

    @property
    def spawner_flow_id(self) -> Tensor:
        """``[S]`` ids of the flows that spawned, in row order (a host sync)."""
        return self.flow_id[self.spawns]


@dataclass
class StepDecisions:
    """What one step decided, kept for its recompute under activation checkpointing.

    ``fate`` is one byte per input flow (bit 0 died, bit 1 arrived, bit 2 spawned), ``counts`` the
    host integers the step read. Replaying them makes the recompute pick the same flows as the
    forward whatever its arithmetic gives near a threshold; ``torch.utils.checkpoint`` checks
    only the shapes of what it recomputes, so a flipped flow would otherwise pass silently.
    ``eager``: the forward ran the step's parts eagerly (a diagnostics forward under
    ``compile: true``, whose hooks need eager tensors), so the recompute does too: its saved
    activations must be the forward's."""

    counts: StepCounts | None = None  # host ints; None until the forward's step has read them
    fate: Tensor | None = None  # [F] uint8
    eager: bool = False

    def record(self, counts: StepCounts, died: Tensor, arrived: Tensor, spawns: Tensor) -> None:
        self.counts = counts
        self.fate = died.to(torch.uint8) | (arrived.to(torch.uint8) << 1) | (spawns.to(torch.uint8) << 2)

    def masks(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(died, arrived, spawns)``, each ``[F]`` bool."""
        assert self.fate is not None
        return (self.fate & 1).bool(), (self.fate & 2).bool(), (self.fate & 4).bool()
