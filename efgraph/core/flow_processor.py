"""`FlowProcessor`: one forward of the energy-flow model, inject -> step until empty -> read out.

A step, for all F active flows of the batch at once (no Python loop over flows):

1. *Occupied cells*: cell id = (sample, cell) compacted by a sort at a static size
   (:func:`~efgraph.core.compaction.unique_padded`) -> C cells in F rows.
2. *Message passing* flows -> occupied cells within ``interaction_radius`` of each flow's cell
   (:class:`FlowToCellConv` over :func:`neighbourhood_edges`), the :class:`SimpleNeuron` on the
   F rows (the C occupied cells, then padding nobody reads), each flow gathers its own cell's
   transformation.
3. *Carrier*: one recurrent call over the F flows, then the heads.
4. *Move*: lateral move reflected at the faces, ``dz >= 1`` and never past the output face.
5. *Lifecycle*: the carrier *sets* each flow's energy (``sigmoid`` of its energy head, so it can
   rise as well as fall; a rise is booked as created energy, a fall as dissipated); a flow under
   ``energy_threshold`` dies (with ``survival_gradient`` it still sends a surrogate gradient, see
   :mod:`efgraph.core.survival`); a flow on the output face arrives; the rest continue, and those
   above ``spawn_threshold`` with a positive spawn score spawn a child that takes part of their
   energy, within the per-sample budgets ``max_spawn_per_step`` and ``max_active_flows``. A parent
   whose energy the carrier raises again spawns again.

Energy books, at every step: ``injected + created = in flight + arrived + lost``.

Because every continuing flow advances at least one cell in z, a forward ends within D-1 steps.

The step is three functions around its one host sync: :meth:`FlowProcessor.decide` (1-5 up to
every flow's fate as masks, their counts and the :class:`~efgraph.core.trace.EnergyBooks`), the
sync that reads the counts (:meth:`StepCounts.read`), then :meth:`FlowProcessor.compact` (the
next state: continuing flows, then the children, by one stable sort on fate; skipped when every
flow continues) and :meth:`FlowProcessor.deposit` (arrivals and phantoms on the output face). Every
shape inside them is the number of rows, so with ``compile: true`` each is one compiled graph:
the rows are padded to bucket sizes (:func:`~efgraph.core.compaction.bucket_rows`; padding rows
belong to sample B, one past the batch, see :class:`~efgraph.core.flow_state.FlowState`, and no
decision, budget, book or deposit counts them), so a training run compiles a bounded number of
graphs with static shapes (what CUDA graphs need). Eagerly, the rows are the flows themselves.
With ``activation_checkpointing`` the recompute in backward replays the forward's fates
(:class:`StepDecisions`).

The forward records each step in its :class:`~efgraph.core.trace.FlowTrace` and adds its deposits
to an :class:`~efgraph.core.readout.OutputFace`, which reads y out at the end (both readouts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch_geometric.utils import degree

from efgraph.config import RUNTIME_MUTABLE_KEYS, EnergyConfig, config_attribute
from efgraph.core.budget import keep_top_per_group
from efgraph.core.compaction import bucket_rows, read_counts, unique_padded
from efgraph.core.diagnostics import ForwardDiagnostics
from efgraph.core.energy_carrier import CarrierHeads, EnergyCarrier
from efgraph.core.energy_lattice import EnergyLattice
from efgraph.core.flow_state import FlowState
from efgraph.core.message_passing import FlowToCellConv, neighbourhood_edges, neighbourhood_offsets
from efgraph.core.readout import Arrivals, OutputFace, collect
from efgraph.core.simple_neuron import SimpleNeuron
from efgraph.core.survival import survival_phantom_energy
from efgraph.core.trace import EnergyBooks, FlowTrace
from efgraph.utils.logging import DEBUG_ENERGY, DEBUG_SPAWN, get_logger

logger = get_logger(__name__)

# graphs one compiled part of the step may build (buckets x batch sizes x fast paths) before
# dynamo falls back to eager; 64 holds every bucket from 8 to 6144 flows for 3 batch sizes
COMPILED_GRAPHS_LIMIT = 64

# the torch.compile backend of compile: true; tests that check what dynamo captures (graphs,
# static shapes, recompiles) set "aot_eager", which skips Inductor's minutes of C++ codegen on a CPU
COMPILE_BACKEND = "inductor"

# id of the padding rows of a step's occupied cells: past every real id, so the ids stay sorted
PADDING_CELL_ID = torch.iinfo(torch.long).max


@dataclass
class StepCounts:
    """How many flows each fate of a step holds, as host ints: ``alive`` (the flows that continue),
    ``arrived``, ``spawns`` (the children to make), ``occupied`` cells, and a caller's ``also_read``
    (:meth:`FlowProcessor.step`).

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
        host copy (:func:`read_counts`)."""
        return cls(*read_counts(stacked if also_read is None else torch.cat([stacked, also_read.view(1)])))


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
            empty = self.flow_id.new_zeros(0)
            energy = self.books.in_flight
            return Arrivals(empty, energy.new_zeros(0, 2), energy.new_zeros(0), energy.new_zeros(0, 0), empty)
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


@dataclass
class CellStep:
    """Result of the cell part of a step (occupied cells, message passing, neuron)."""

    transformation: Tensor  # [F, neuron_output_dim] the transformation of each flow's cell
    occupied_cell_id: Tensor  # [N >= C] sorted ids of the occupied cells in rows < C, then padding
    neighbourhood_flows: Tensor  # scalar: sum over flows of the flows their cell's neuron heard
    num_occupied: Tensor  # scalar int64: C


class FlowProcessor(nn.Module):
    """Runs the energy-flow model: ``y = processor(x)`` with x ``[B, input_dim]`` -> ``[B, output_dim]``.

    Args:
        lattice: the :class:`EnergyLattice` (geometry, injection, readout).
        neuron: the shared :class:`SimpleNeuron`.
        config: the :class:`EnergyConfig`: the lattice must have been built from an equal one (every
            field), the neuron to its widths; the carrier is built from it. The processor, lattice
            and carrier then share this one frozen object: only :meth:`reconfigure` changes it, on
            all three at once.

    After each forward, :attr:`last_trace` holds the :class:`FlowTrace` of that forward. Set
    :attr:`record_paths` to also keep every flow's position at every step (for figures), and
    :attr:`record_diagnostics` to record the learning diagnostics of
    :mod:`efgraph.core.diagnostics` in :attr:`last_diagnostics` (gradient hooks per step, each
    step's output, the landings; eager even with ``compile: true``).
    """

    config = config_attribute()  # the one frozen config of processor, lattice and carrier, set once

    def __init__(self, lattice: EnergyLattice, neuron: SimpleNeuron, config: EnergyConfig) -> None:
        super().__init__()
        # any field, not only the shapes: the lattice also reads e.g. initial_flows_per_sample and
        # output_gate_init, and a 10x10 lattice under a 20x20 processor would index the wrong cells
        differing = [f.name for f in fields(config) if getattr(lattice.config, f.name) != getattr(config, f.name)]
        if differing:
            raise ValueError("lattice: built from another config than the processor's; differing fields: "
                             + ", ".join(f"{k} (lattice {getattr(lattice.config, k)!r}, processor "
                                         f"{getattr(config, k)!r})" for k in differing))
        widths = (("neuron_input_dim", neuron.input_dim, config.neuron_input_dim),
                  ("neuron_hidden_dim", neuron.fc1.out_features, config.neuron_hidden_dim),
                  ("neuron_output_dim", neuron.fc2.out_features, config.neuron_output_dim))
        for name, width, expected in widths:
            if width != expected:
                raise ValueError(f"neuron: built for {name} {width}, the processor's config has {expected}")
        self.config = config
        self.lattice = lattice
        self.neuron = neuron
        self.carrier = EnergyCarrier(config)
        self.conv = FlowToCellConv(config.carrier_hidden_dim, config.message_dim, config.aggregation)
        # residual_steps: the gate of each lattice step after the first, started closed (see step_gate)
        self.step_gates = (nn.Parameter(torch.zeros(config.lattice_depth - 2))
                           if config.residual_steps and config.lattice_depth > 2 else None)
        # linear_skip: y gains W x, W started at 0 (the model at initialisation is the one without it)
        self.linear_skip = nn.Linear(config.input_dim, config.output_dim, bias=False) if config.linear_skip else None
        if self.linear_skip is not None:
            nn.init.zeros_(self.linear_skip.weight)
        self.register_buffer("neighbour_offsets", neighbourhood_offsets(config.interaction_radius), persistent=False)
        self.record_paths = False
        self.last_trace: FlowTrace | None = None
        # learning diagnostics (efgraph.core.diagnostics): off, the engine tests `_recording is None`
        # once per step and does nothing else; on, the forward fills a record for the trainer
        self.record_diagnostics = False
        self.last_diagnostics: ForwardDiagnostics | None = None
        self._recording: ForwardDiagnostics | None = None  # set only while a diagnostics forward runs
        # the per-sample cap on active flows that spawning respects: config.max_active_flows
        # unless a budget controller (efgraph.training.flow_budget) lowers it between forwards
        self.active_flow_budget: int = config.max_active_flows
        self._budget: tuple[int, Tensor] | None = None
        # compile: each part of the step is one graph with static shapes (the flows are padded to
        # bucket sizes, see bucket_rows), so the graphs are few and each can be a CUDA graph;
        # fullgraph: no silent graph breaks. The *unbound* methods are compiled and called with
        # self, so a deep copy of this module (EMA, SWA) runs its own weights, not this instance's.
        # compile is read here, once: the graphs and the padding (static shapes) follow this value
        self._static_shapes = config.compile
        self._compiled = (
            {name: torch.compile(getattr(type(self), name), backend=COMPILE_BACKEND, dynamic=False, fullgraph=True)
             for name in ("decide", "compact", "deposit")} if self._static_shapes else None
        )

    def reconfigure(self, **changes: Any) -> None:
        """Change runtime switches of the built model: one new config (``config.replace(**changes)``)
        on the processor, its lattice and its carrier together.

        Only the fields of :data:`efgraph.config.RUNTIME_MUTABLE_KEYS` (``activation_checkpointing``),
        read on every forward, may change; every other field fixes the parameters or was read when
        the model was built (``compile``: the graphs and the padding), so it is refused.

        Raises:
            ValueError: naming the refused fields, or a value out of its range.
        """
        refused = sorted(set(changes) - set(RUNTIME_MUTABLE_KEYS))
        if refused:
            raise ValueError(f"reconfigure: {', '.join(refused)} cannot change on a built model (only "
                             f"{', '.join(RUNTIME_MUTABLE_KEYS)} can); build a new one with "
                             f"FlowProcessor.from_config(config.replace(...))")
        config = self.config.replace(**changes)
        for part in (self, self.lattice, self.carrier):
            vars(part)["_config"] = config  # past config_attribute's set-once guard, on every part at once

    # ---- input checks ----------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"x: expected shape [batch, {self.config.input_dim}], got {tuple(x.shape)}")
        if x.size(0) == 0:
            raise ValueError("x: empty batch (batch size 0)")
        if x.size(1) != self.config.input_dim:
            raise ValueError(f"x: embedding width {x.size(1)} does not match config.input_dim {self.config.input_dim}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating point tensor, got {x.dtype}")
        if x.dtype != self.lattice.face_keys.dtype:
            raise ValueError(f"x: dtype {x.dtype} does not match the model's {self.lattice.face_keys.dtype}; "
                             f"convert it with x.to({self.lattice.face_keys.dtype})")

    @staticmethod
    def _raise_nonfinite_rows(x: Tensor) -> None:
        """The finiteness check of ``x``; the forward reads its flag in the first step's sync."""
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"x: non-finite values (NaN or inf) in rows {bad}")

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``x [B, input_dim]`` -> ``y [B, output_dim]``: inject the flows at the input face, step
        until no flow is active (at most D-1 steps), read y off the output face (plus x with
        ``residual``, plus ``W x`` with ``linear_skip``). The forward's
        trace goes to :attr:`last_trace` (and with :attr:`record_diagnostics` its diagnostics to
        :attr:`last_diagnostics`)."""
        self.last_diagnostics = None  # the last forward's record: none unless it recorded one
        self._check_input(x)
        batch_size = x.size(0)
        # active for this forward only: a checkpointed step recomputed in backward records nothing
        self._recording = ForwardDiagnostics(batch_size=batch_size) if self.record_diagnostics else None
        try:
            state = self.inject(x)
            trace = FlowTrace.start(state, batch_size, record_paths=self.record_paths)
            if self._static_shapes:  # compile: the flows padded to a bucket size
                state = state.padded(bucket_rows(state.num_flows), batch_size)
            face = OutputFace(self.lattice, batch_size, x)
            # x's finiteness is read in the first step's sync instead of a sync of its own
            nonfinite: Tensor | None = (~torch.isfinite(x)).any().long()
            for step_index in range(self.config.lattice_depth - 1):
                if state.num_active == 0:
                    break
                result = self._run_step(state, batch_size, trace.next_flow_id, nonfinite, step_index)
                if nonfinite is not None and result.counts.also_read:
                    self._raise_nonfinite_rows(x)
                nonfinite = None
                trace.record_step(state, result)
                face.add(result)
                if self._recording is not None:  # the face this step's arrivals collected
                    self._recording.step_output(face.step_face(result))
                state = result.next_state
            self._check_finished(state)
            trace.finish(face.arrivals, self.config.lattice_depth)
            self.last_trace = trace
            if self._recording is not None:
                landed = face.landed()
                self._recording.finish(self.lattice, landed.batch, landed.xy, landed.energy)
            y = face.read()
            if self.linear_skip is not None:
                y = y + self.linear_skip(x)
            self.last_diagnostics = self._recording
        finally:
            self._recording = None
        return x + y if self.config.residual else y

    def _check_finished(self, state: FlowState) -> None:
        """Raise if flows are still active after the D-1 steps: ``dz >= 1`` per step ends every
        finite flow by then, and a NaN position never arrives or dies."""
        if not state.num_active:
            return
        real = state.valid if state.valid is not None else slice(None)
        if not (torch.isfinite(state.pos[real]).all() and torch.isfinite(state.energy[real]).all()):
            raise FloatingPointError(
                f"forward: {state.num_active} flows have a non-finite position or energy after "
                f"{self.config.lattice_depth - 1} steps (NaN/inf in the parameters or activations)"
            )
        raise AssertionError(f"{state.num_active} finite flows still active after D-1 steps: an engine bug")

    def _run_step(self, state: FlowState, batch_size: int, next_id: int, also_read: Tensor | None,
                  step_index: int = 0) -> StepResult:
        """:meth:`step`, recomputed in backward when ``activation_checkpointing`` is on.

        With checkpointing, autograd keeps only what a step needs to be run again (its input
        state: the flows' hidden states, positions and energies) and reruns the step in backward.
        The rerun replays what the forward decided (:class:`StepDecisions`: the counts it read and
        each flow's fate, one byte per flow), so it differentiates exactly the flows the forward
        kept, even where a nondeterministic kernel (a GPU's atomic scatter-add) would put a flow
        on the other side of a threshold the second time, and it costs no second sync."""
        if self.config.activation_checkpointing and torch.is_grad_enabled():
            decisions = StepDecisions()
            return torch.utils.checkpoint.checkpoint(self.step, state, batch_size, next_id, also_read, decisions,
                                                     step_index, use_reentrant=False)
        return self.step(state, batch_size, next_id, also_read, step_index=step_index)

    @classmethod
    def from_config(cls, config: EnergyConfig) -> "FlowProcessor":
        """A fresh model: lattice, neuron and processor built from ``config``."""
        return cls(EnergyLattice(config), SimpleNeuron(config), config)

    def inject(self, x: Tensor) -> FlowState:
        """Start the flows of a batch at the input face."""
        injected = self.lattice.place_initial_energy(x)
        h, c = self.carrier.initial_state(x, injected.batch, self.lattice.position_encoding(injected.pos),
                                          injected.content)
        return FlowState(
            h=h,
            c=c,
            pos=injected.pos,
            energy=injected.energy,
            batch=injected.batch,
            flow_id=torch.arange(injected.batch.numel(), device=x.device),
        )

    def step(self, state: FlowState, batch_size: int, next_id: int = 0, also_read: Tensor | None = None,
             decisions: StepDecisions | None = None, step_index: int = 0) -> StepResult:
        """Advance all active flows by one step (see the module docstring), with one host sync.

        Three parts, each one compiled graph with ``compile: true`` (static shapes: the rows are a
        bucket size, :func:`~efgraph.core.compaction.bucket_rows`): :meth:`decide` (cells, message
        passing, neuron, carrier, move, every flow's fate), then the sync that reads the counts,
        then :meth:`compact` (split the spawners' energy, the children, the next state) and
        :meth:`deposit` (the arrivals and the dying flows' phantoms on the output face).

        Args:
            state: the F active flows (padded to a bucket size when compiled).
            batch_size: B (for per-sample budgets and id spaces).
            next_id: first flow id to give a child.
            also_read: a 0-d int tensor to read in the same sync (returned as ``counts.also_read``),
                so a caller's own check costs no sync of its own.
            decisions: a record the step fills with what it decided (counts and fates); when it
                is already filled (a recompute of the same step), the step replays it: nothing is
                read and no threshold is compared again.
            step_index: which lattice step of the forward this is (0 = the first), for the gates
                of ``residual_steps`` (:meth:`step_gate`).
        """
        cfg = self.config
        replay = decisions is not None and decisions.counts is not None  # a recompute (checkpointing)
        if decisions is not None and not replay:
            decisions.eager = self._recording is not None
        # a diagnostics forward hooks tensors inside the step's parts: eager, as is its recompute
        eager = self._recording is not None or (decisions is not None and decisions.eager)
        if self._recording is not None:
            self._recording.begin_step(state.num_active, state.valid)
        gate, spawn_allowed = self.step_gate(step_index)
        d = self._graph("decide", eager)(self, state, batch_size, self._budget_tensor(state.energy.device), gate,
                                         spawn_allowed)
        # the step's one host sync reads how many flows each fate holds (it fixes the next step's
        # shapes); the flows are then picked by sorting on their fate, no further sync
        if replay:
            n, (died, arrived, spawns) = decisions.counts, decisions.masks()
        else:
            n, died, arrived, spawns = StepCounts.read(d.counts, also_read), d.died, d.arrived, d.spawns
            if decisions is not None:
                decisions.record(n, died, arrived, spawns)
        n_died = state.num_active - n.alive - n.arrived
        moved = FlowState(h=d.h, c=d.c, pos=d.pos, energy=d.energy, batch=state.batch, flow_id=state.flow_id,
                          valid=state.valid, num_valid=state.num_valid)
        if n.alive == state.num_active and not n.spawns:  # fast path: every flow continues as it is
            next_state = moved
        else:
            n_next = n.alive + n.spawns
            next_id_t = torch.full((), next_id, dtype=torch.long, device=d.energy.device)
            next_state = self._graph("compact", eager)(self, moved, d.spawn_score, d.child_dxy, died, arrived, spawns,
                                                       next_id_t, bucket_rows(n_next) if self._static_shapes
                                                       else n_next, batch_size, gate)
            next_state.num_valid = n_next if next_state.valid is not None else None
        deposit = self._graph("deposit", eager)
        deposits = collected = phantoms = phantom_collected = None
        if n.arrived:
            deposits, collected = deposit(self, moved, d.top, d.energy, arrived, batch_size)
        if cfg.survival_gradient and n_died and torch.is_grad_enabled():
            phantoms, phantom_collected = deposit(self, moved, d.top, survival_phantom_energy(
                d.energy_logit, cfg.energy_threshold), died, batch_size)
        self._log_step(state, d.energy, n, n_died)
        return StepResult(
            next_state=next_state, deposits=deposits, collected=collected,
            occupied_cell_id=d.occupied_cell_id[:n.occupied], num_spawned=n.spawns, num_died=n_died,
            num_arrived=n.arrived, books=d.books, neighbourhood_flows=d.neighbourhood_flows, spawns=spawns,
            flow_id=state.flow_id, batch_size=batch_size, phantoms=phantoms, phantom_collected=phantom_collected,
            counts=n,
        )

    @staticmethod
    def _log_step(state: FlowState, energy: Tensor, n: StepCounts, n_died: int) -> None:
        """The step's counts and energies at the DEBUG_SPAWN and DEBUG_ENERGY levels (the energies
        cost a host read, only when that level is on)."""
        if logger.isEnabledFor(DEBUG_SPAWN):
            logger.log(DEBUG_SPAWN, "step: %d flows, %d spawned, %d died, %d arrived",
                       state.num_active, n.spawns, n_died, n.arrived)
        if logger.isEnabledFor(DEBUG_ENERGY):
            real = state.valid if state.valid is not None else slice(None)
            logger.log(DEBUG_ENERGY, "step: mean energy %.4f, min %.4f",
                       float(energy.detach()[real].mean()), float(energy.detach()[real].min()))

    def decide(self, state: FlowState, batch_size: int, budget: Tensor, gate: Tensor | None = None,
               spawn_allowed: bool = True) -> Decision:
        """Steps 1-5 up to the sync: cells, message passing, neuron, carrier, move, and every
        flow's fate as masks on the device (padding rows have none). ``gate`` and
        ``spawn_allowed``: see :meth:`step_gate`."""
        cfg = self.config
        cells = self.cell_transformation(state, batch_size)
        top, h, c, heads, pos, energy = self.advance(cells.transformation, state.h, state.c, state.pos, state.energy,
                                                     gate)
        if state.valid is not None:  # the carrier updated the padding rows too: back to canonical
            h, c, pos, energy = _canonical_padding(state.valid, h, c, pos, energy)
        # the survival surrogate reads the logit of the energy the step set (a gated step's blend)
        energy_logit = heads.energy_logit if gate is None else torch.logit(energy, eps=1e-6)
        died = energy < cfg.energy_threshold
        arrived = ~died & (pos[:, 2] >= cfg.lattice_depth - 1)
        if state.valid is not None:
            died, arrived = died & state.valid, arrived & state.valid
        alive = _continuing(state.valid, died, arrived)
        spawns = self._spawn_mask(alive, energy, heads.spawn_score, state.batch, batch_size, budget)
        if not spawn_allowed:
            spawns = torch.zeros_like(spawns)
        elif gate is not None:  # a closed step spawns nothing
            spawns = spawns & (gate > 0)
        counts = StepCounts.stack(alive.sum(), arrived.sum(), spawns.sum(), cells.num_occupied)
        # bookkeeping only: detached, so it adds nothing to the autograd graph
        e = energy.detach()
        change = e - state.energy.detach()  # zero on the (canonical) padding rows
        books = EnergyBooks(dissipated=(-change).clamp(min=0).sum(), created=change.clamp(min=0).sum(),
                            died=(e * died).sum(), arrived=(e * arrived).sum(), in_flight=(e * alive).sum())
        return Decision(top, h, c, energy_logit, heads.spawn_score, heads.child_dxy, pos, energy,
                        died, arrived, spawns, counts, books,
                        cells.occupied_cell_id, cells.neighbourhood_flows)

    def compact(self, moved: FlowState, spawn_score: Tensor, child_dxy: Tensor, died: Tensor, arrived: Tensor,
                spawns: Tensor, next_id: Tensor, rows: int, batch_size: int, gate: Tensor | None = None) -> FlowState:
        """The next state, ``rows`` rows: the continuing flows, then the spawners' children (each
        with its own hidden state and lateral offset and ``sigmoid(score) / 2`` of its parent's
        energy, so the sum is conserved), both in row order, then padding (only when compiled;
        canonical, see :class:`FlowState`). A gated step (``residual_steps``) scales the children's
        state perturbation and offset by its gate.

        Children are made for every row and the rows kept are picked by one stable sort on their
        fate (continues 0, child 1, gone 2): static shapes, the same order as ``nonzero``."""
        alive = _continuing(moved.valid, died, arrived)
        child_energy = torch.where(spawns, moved.energy * self.carrier.split_fraction(spawn_score), 0.0)
        child_h, child_c = self.carrier.spawn(moved.h, moved.c, gate)
        child_xy = self.lattice.reflect_xy(moved.pos[:, :2] + (child_dxy if gate is None else gate * child_dxy))
        gone = torch.full_like(alive, 2, dtype=torch.uint8)
        fate = torch.cat([torch.where(alive, 0, gone), torch.where(spawns, 1, gone)])
        order = torch.sort(fate, stable=True).indices[:rows]
        keep = fate.index_select(0, order) < 2

        def rows_kept(parents: Tensor, children: Tensor, fill: float | int, dim: int = 0) -> Tensor:
            """The kept rows of ``[parents; children]`` (along ``dim``), the padding rows ``fill``."""
            kept = torch.cat([parents, children], dim=dim).index_select(dim, order)
            if not self._static_shapes:  # no padding rows
                return kept
            return torch.where(keep.view([-1 if d == dim else 1 for d in range(kept.dim())]), kept, fill)

        return FlowState(
            h=rows_kept(moved.h, child_h, 0.0, dim=1),
            c=None if moved.c is None else rows_kept(moved.c, child_c, 0.0, dim=1),
            pos=rows_kept(moved.pos, torch.cat([child_xy, moved.pos[:, 2:]], dim=1), 0.0),
            energy=rows_kept(moved.energy - child_energy, child_energy, 0.0),
            batch=rows_kept(moved.batch, moved.batch, batch_size),
            flow_id=rows_kept(moved.flow_id, next_id + torch.cumsum(spawns, 0) - 1, -1),
            valid=keep if self._static_shapes else None,
        )

    def deposit(self, moved: FlowState, top: Tensor, energy: Tensor, ends: Tensor,
                batch_size: int) -> tuple[Arrivals, Tensor | None]:
        """The rows where ``ends`` as deposits of ``energy`` on the output face at their new
        (x, y), and, for ``readout: face``, their collected face ``[B, K]`` (here, inside the
        step's graph; the forward's :class:`~efgraph.core.readout.OutputFace` sums it over the
        steps and collects the shared readout's deposits once at the end)."""
        deposits = Arrivals(
            batch=torch.where(ends, moved.batch, batch_size),
            # the other rows land at (0, 0): a flow whose position went non-finite never ends,
            # and its NaN must not become a face cell index
            xy=torch.where(ends.unsqueeze(1), moved.pos[:, :2], 0.0),
            energy=torch.where(ends, energy, 0.0),
            value=self.carrier.value(top),
            flow_id=moved.flow_id,
        )
        return deposits, (collect(self.lattice, deposits, batch_size) if self.config.readout == "face" else None)

    def _graph(self, name: str, eager: bool = False) -> Callable[..., Any]:
        """``decide``, ``compact`` or ``deposit`` as an unbound function: eager (no ``compile``, or
        ``eager``), or its compiled graph."""
        if self._compiled is None or eager:
            return getattr(type(self), name)
        compiled = self._compiled[name]

        def run(*args: Any) -> Any:
            # dynamo treats nn.GRU/LSTM as a graph break unless allow_rnn is set; one graph per
            # bucket (and batch size) is expected, so the recompile limit is the buckets' count
            with torch._dynamo.config.patch(allow_rnn=True, recompile_limit=COMPILED_GRAPHS_LIMIT):
                return compiled(*args)

        return run

    def _budget_tensor(self, device: torch.device) -> Tensor:
        """:attr:`active_flow_budget` as a device scalar (a compiled graph reads it as data, so a
        budget that changes costs no recompile), cached while it does not change."""
        if self._budget is None or self._budget[0] != self.active_flow_budget or self._budget[1].device != device:
            self._budget = (self.active_flow_budget, torch.full((), self.active_flow_budget, device=device))
        return self._budget[1]

    def advance(
        self, transformation: Tensor, h: Tensor, c: Tensor | None, pos: Tensor, energy: Tensor,
        gate: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None, CarrierHeads, Tensor, Tensor]:
        """The dense part of a step: carrier call, heads, move and next energy (no compaction).

        Returns ``(top [F, H], h, c, heads, new pos [F, 3], next energy [F])``; the carrier sets
        the next energy, ``sigmoid(energy_logit)``, in fp32 even under autocast (the books and
        the thresholds read it). A ``gate`` g (scalar, ``residual_steps``) makes the step a residual
        update: ``h + g (h_new - h)`` (and ``c``), lateral move ``g * dxy``, energy
        ``e + g (sigmoid(logit) - e)``; ``top`` is then the gated state's top layer. The move in z
        is never gated: every step still advances a flow by at least one cell.
        """
        step_input = torch.cat([transformation, energy.unsqueeze(1), self.lattice.position_encoding(pos)], dim=1)
        top, h_new, c_new = self.carrier.step(step_input, h, c)
        heads = self.carrier.heads(top)
        if self._recording is not None:  # diagnostics: gradient hooks on this step's input and heads
            self._recording.watch(step_input, heads)
        next_energy = torch.sigmoid(heads.energy_logit.float())
        dxy = heads.dxy
        if gate is not None:
            h_new = h + gate * (h_new - h)
            c_new = None if c is None else c + gate * (c_new - c)
            top = h_new[-1]
            dxy = gate * dxy
            next_energy = energy + gate * (next_energy - energy)
        new_pos = self.lattice.move(pos, dxy, heads.dz_fraction)
        return top, h_new, c_new, heads, new_pos, next_energy

    def step_gate(self, step_index: int) -> tuple[Tensor | None, bool]:
        """``(gate, spawn_allowed)`` of lattice step ``step_index`` of a forward.

        Without ``residual_steps``: ``(None, True)``, every step a full update. With it, the first
        step is the one-step model's (``(None, False)``: a full update and no spawning, the one-step
        lattice's flows all arrive at once) and step ``t >= 1`` is gated by ``g_t =
        clamp(step_gates[t-1], 0, 1)``, whose gradient passes the clamp (straight through), so a
        gate pushed below 0 is closed yet can reopen. Every gate starts at 0: the deep lattice then
        computes the one-step lattice's output (each flow's state, landing point and energy are
        the first step's), and training decides how far to open each step.
        """
        if self.step_gates is None:
            return None, not self.config.residual_steps
        if step_index == 0:
            return None, False
        raw = self.step_gates[step_index - 1]
        return raw + (raw.clamp(0.0, 1.0) - raw).detach(), True

    @torch.no_grad()
    def project_parameters(self) -> None:
        """Put the parameters that have a range back into it; the trainer calls this after every
        optimizer step. With ``project_step_gates`` that is each step gate into [0, 1], so a gate
        the gradient closed waits at 0 (where :meth:`step_gate` reads it as closed and its gradient
        still flows) instead of sinking below it. Without it, nothing changes."""
        if self.step_gates is not None and self.config.project_step_gates:
            self.step_gates.clamp_(0.0, 1.0)

    def cell_transformation(self, state: FlowState, batch_size: int | None = None) -> CellStep:
        """The neuron's transformation for every flow, computed per occupied cell.

        The cells sit in F rows (a size the host knows, so no sync): the C occupied cells, then
        padding rows that no flow reads. Each occupied cell aggregates the messages of the flows of
        its sample within ``interaction_radius`` cells, runs the neuron once, and every flow reads
        its own cell's result (see :class:`CellStep`). Padding flows (sample ``batch_size``) sit in
        cells of their own sample, after every real cell, and are not counted.
        """
        lattice = self.lattice
        num_flows = state.num_flows
        cell = lattice.cell_coordinates(state.pos)
        cell_id = lattice.cell_id(state.batch, cell)
        # F rows, the first C the occupied cells; the padding id is past every real id
        occupied, cell_index, num_occupied = unique_padded(cell_id, fill=PADDING_CELL_ID)
        # each occupied row's (x, y, z), written by its flows (all write the same cell; padding stays 0)
        occupied_cell = torch.zeros_like(cell).index_copy_(0, cell_index, cell)
        # row F collects the edges to empty cells and is dropped
        edges = neighbourhood_edges(cell, state.batch, occupied, cell_index, self.neighbour_offsets,
                                    lattice.cell_bounds, lattice.cell_id, miss_row=num_flows)
        aggregated = self.conv(state.h[-1], state.energy, edges, num_flows + 1)[:num_flows]
        cell_pe = lattice.position_encoding(occupied_cell.to(state.pos.dtype))
        # the neuron runs on the F rows (a static size); padding rows are never read
        transformation = self.neuron(torch.cat([aggregated, cell_pe], dim=1)).index_select(0, cell_index)
        heard = degree(edges[1], num_flows + 1).index_select(0, cell_index)  # flows each cell heard
        if state.valid is not None:  # the padding flows' cells (their own sample) are not counted
            heard = heard * state.valid
            num_occupied = (occupied < batch_size * self.config.num_cells).sum()
        return CellStep(transformation, occupied, heard.sum(), num_occupied)

    def _spawn_mask(self, alive: Tensor, energy: Tensor, score: Tensor, batch: Tensor, batch_size: int,
                    budget: Tensor) -> Tensor:
        """``[F]`` bool: the continuing flows that spawn, best score first per sample, at most
        ``max_spawn_per_step`` per sample and never past ``budget`` active flows (no host sync).
        Padding rows (sample ``batch_size``) are never alive; their group is one past the batch."""
        candidate = alive & self.carrier.can_spawn(energy, score)
        groups = batch_size + 1
        alive_per_sample = torch.zeros(groups, dtype=torch.long, device=batch.device).index_add_(0, batch, alive.long())
        room = (budget - alive_per_sample).clamp(min=0, max=self.config.max_spawn_per_step)
        # non-candidates rank after every candidate of their sample
        best = keep_top_per_group(batch, torch.where(candidate, score.detach(), float("-inf")), room, groups)
        return candidate & best


def _canonical_padding(valid: Tensor, h: Tensor, c: Tensor | None, pos: Tensor,
                       energy: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``h``, ``c`` ``[L, F, H]``, ``pos`` ``[F, 3]`` and ``energy`` ``[F]`` with the rows that
    ``valid`` ``[F]`` does not mark set to zero (a padding row's state, see :class:`FlowState`)."""
    rows = valid.view(1, -1, 1)
    return (torch.where(rows, h, 0.0), None if c is None else torch.where(rows, c, 0.0),
            torch.where(valid.unsqueeze(1), pos, 0.0), torch.where(valid, energy, 0.0))


def _continuing(valid: Tensor | None, died: Tensor, arrived: Tensor) -> Tensor:
    """``[F]`` bool: the flows that go on to the next step (padding rows never do)."""
    alive = ~died & ~arrived
    return alive if valid is None else valid & alive
