"""`FlowProcessor`: one forward of the energy-flow model, inject -> step until empty -> collect.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch_geometric.utils import degree

from efgraph.config import ARCHITECTURE_KEYS, EnergyConfig
from efgraph.core.budget import keep_top_per_group
from efgraph.core.compaction import read_counts, unique_padded
from efgraph.core.energy_carrier import CarrierHeads, EnergyCarrier
from efgraph.core.energy_lattice import EnergyLattice
from efgraph.core.flow_state import FlowState
from efgraph.core.message_passing import FlowToCellConv, neighbourhood_edges, neighbourhood_offsets
from efgraph.core.simple_neuron import SimpleNeuron
from efgraph.core.survival import survival_phantom_energy
from efgraph.core.trace import FlowTrace
from efgraph.utils.logging import DEBUG_ENERGY, DEBUG_SPAWN, get_logger

logger = get_logger(__name__)

# id of the padding rows of a step's occupied cells: past every real id, so the ids stay sorted
PADDING_CELL_ID = torch.iinfo(torch.long).max


@dataclass
class Arrivals:
    """Flows that reached the output face in one step (A of them)."""

    batch: Tensor  # [A]
    xy: Tensor  # [A, 2]
    energy: Tensor  # [A]
    value: Tensor  # [A, face_channels]
    flow_id: Tensor  # [A]


@dataclass
class StepResult:
    """Everything one step produced."""

    next_state: FlowState  # continuing flows, then their children
    arrivals: Arrivals
    occupied_cell_id: Tensor  # [C] sorted ids of the occupied cells
    num_spawned: int
    num_died: int
    energy_dissipated: Tensor  # scalar: sum of the falls of energy the carrier set
    energy_created: Tensor  # scalar: sum of the rises of energy the carrier set
    energy_died: Tensor  # scalar: carried away by flows that died
    energy_arrived: Tensor  # scalar
    neighbourhood_flows: Tensor  # scalar: sum over flows of the flows in their interaction neighbourhood
    spawner_flow_id: Tensor  # [S] ids of the flows that spawned a child this step
    # dying flows as zero-energy deposits that carry the survival gradient (None without it)
    phantoms: Arrivals | None = None
    also_read: int | None = None  # host value of step(also_read=...)


@dataclass
class StepDecisions:
    """What one step decided, kept for its recompute under activation checkpointing.

    ``fate`` is one byte per input flow (bit 0 died, bit 1 arrived, bit 2 spawned), ``counts`` the
    host integers the step read. Replaying them makes the recompute pick the same flows as the
    forward whatever its arithmetic gives near a threshold; ``torch.utils.checkpoint`` checks
    only the shapes of what it recomputes, so a flipped flow would otherwise pass silently."""

    counts: list[int] = field(default_factory=list)
    fate: Tensor | None = None  # [F] uint8
    # False: the recompute decides again and reuses only the counts (what the engine did before
    # it saved fates); kept so a test can show what replaying the fates protects against
    replay_fates: bool = True

    def record(self, counts: list[int], died: Tensor, arrived: Tensor, spawns: Tensor) -> None:
        self.counts = list(counts)
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
        config: the :class:`EnergyConfig`; the carrier is built from it.

    After each forward, :attr:`last_trace` holds the :class:`FlowTrace` of that forward. Set
    :attr:`record_paths` to also keep every flow's position at every step (for figures).
    """

    def __init__(self, lattice: EnergyLattice, neuron: SimpleNeuron, config: EnergyConfig) -> None:
        super().__init__()
        differing = [k for k in ARCHITECTURE_KEYS if getattr(lattice.config, k) != getattr(config, k)]
        if differing:  # e.g. a 10x10 lattice under a 20x20 processor would index the wrong cells
            raise ValueError("lattice: built from another config than the processor's; differing fields: "
                             + ", ".join(f"{k} ({getattr(lattice.config, k)!r} vs {getattr(config, k)!r})"
                                         for k in differing))
        if neuron.input_dim != config.neuron_input_dim:
            raise ValueError(
                f"neuron: input width {neuron.input_dim} does not match config.neuron_input_dim "
                f"{config.neuron_input_dim}"
            )
        self.config = config
        self.lattice = lattice
        self.neuron = neuron
        self.carrier = EnergyCarrier(config)
        self.conv = FlowToCellConv(config.carrier_hidden_dim, config.message_dim, config.aggregation)
        self.register_buffer("neighbour_offsets", neighbourhood_offsets(config.interaction_radius), persistent=False)
        self.record_paths = False
        self.last_trace: FlowTrace | None = None
        # the per-sample cap on active flows that spawning respects: config.max_active_flows
        # unless a budget controller (efgraph.training.flow_budget) lowers it between forwards
        self.active_flow_budget: int = config.max_active_flows
        # dynamic=True: the number of flows changes every step; fullgraph: no silent graph breaks.
        # The *unbound* method is compiled and called with self, so a deep copy of this module
        # (EMA, SWA) runs its own weights, not this instance's.
        self._compiled_advance = (
            torch.compile(type(self).advance, dynamic=True, fullgraph=True) if config.compile else None
        )

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
        """``x [B, input_dim]`` -> ``y [B, output_dim]``; the forward's trace goes to :attr:`last_trace`."""
        self._check_input(x)
        batch_size = x.size(0)
        state = self.inject(x)
        trace = FlowTrace(
            batch_size=batch_size,
            initial_flows=state.num_flows,
            energy_injected=state.energy.detach().sum(),
            paths=[] if self.record_paths else None,
            parent_of={} if self.record_paths else None,
        )
        next_id = state.num_flows
        # x's finiteness is read in the first step's sync instead of a sync of its own
        nonfinite = (~torch.isfinite(x)).any().long()
        arrivals: list[Arrivals] = []
        phantoms: list[Arrivals] = []
        lost = arrived = created = torch.zeros((), device=x.device)
        for _ in range(self.config.lattice_depth - 1):
            if state.num_flows == 0:
                break
            if trace.paths is not None:
                trace.paths.append(_path_record(state.flow_id, state.batch, state.pos, state.energy))
            result = self._run_step(state, batch_size, next_id, nonfinite)
            if nonfinite is not None:
                if result.also_read:
                    self._raise_nonfinite_rows(x)
                nonfinite = None
            if trace.parent_of is not None:  # children get ids next_id, next_id + 1, ... in spawner order
                trace.parent_of.update(zip(range(next_id, next_id + result.num_spawned),
                                           result.spawner_flow_id.tolist()))
            next_id += result.num_spawned
            arrivals.append(result.arrivals)
            if result.phantoms is not None:
                phantoms.append(result.phantoms)
            lost = lost + (result.energy_dissipated + result.energy_died).detach()
            arrived = arrived + result.energy_arrived.detach()
            created = created + result.energy_created.detach()
            trace.active.append(state.num_flows)
            trace.occupied.append(result.occupied_cell_id.numel())
            trace.spawned.append(result.num_spawned)
            trace.died.append(result.num_died)
            trace.arrived.append(result.arrivals.batch.numel())
            trace.energy_rows.append(torch.stack([result.next_state.energy.detach().sum(), arrived, lost, created]))
            trace.neighbourhood_rows.append(result.neighbourhood_flows.detach())
            state = result.next_state
        if state.num_flows:
            # dz >= 1 per step ends every finite flow by now; NaN positions never arrive or die.
            if not (torch.isfinite(state.pos).all() and torch.isfinite(state.energy).all()):
                raise FloatingPointError(
                    f"forward: {state.num_flows} flows have a non-finite position or energy after "
                    f"{self.config.lattice_depth - 1} steps (NaN/inf in the parameters or activations)"
                )
            raise AssertionError(f"{state.num_flows} finite flows still active after D-1 steps: an engine bug")

        landed = _cat_arrivals(arrivals)
        if trace.paths is not None:
            trace.paths.append(
                _path_record(landed.flow_id, landed.batch, _face_pos(landed.xy, self.config), landed.energy)
            )
        self.last_trace = trace
        y = self.collect(landed, _cat_arrivals(phantoms) if phantoms else None, batch_size)
        return x + y if self.config.residual else y

    def collect(self, landed: Arrivals, phantoms: Arrivals | None, batch_size: int) -> Tensor:
        """The output face: what landed (and the dying flows' phantoms) -> ``[B, output_dim]``.

        Phantoms deposit exactly zero (the forward is unchanged) but carry the survival gradient;
        they are collected apart so the readout can pass that gradient past a closed gate."""
        lattice = self.lattice
        collected = lattice.collect_output_energy(landed.batch, landed.xy, landed.energy, landed.value, batch_size)
        phantom = None if phantoms is None else lattice.collect_output_energy(
            phantoms.batch, phantoms.xy, phantoms.energy, phantoms.value, batch_size)
        return lattice.read_out(collected, phantom)

    def _run_step(self, state: FlowState, batch_size: int, next_id: int, also_read: Tensor | None) -> StepResult:
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
                                                     use_reentrant=False)
        return self.step(state, batch_size, next_id, also_read)

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
             decisions: StepDecisions | None = None) -> StepResult:
        """Advance all active flows by one step (see the module docstring), with one host sync.

        Args:
            state: the F active flows.
            batch_size: B (for per-sample budgets and id spaces).
            next_id: first flow id to give a child.
            also_read: a scalar int tensor to read in the same sync (returned as ``also_read``),
                so a caller's own check costs no sync of its own.
            decisions: a record the step fills with what it decided (counts and fates); when it
                is already filled (a recompute of the same step), the step replays it: nothing is
                read and no threshold is compared again.
        """
        cfg = self.config
        # 1-2. occupied cells (compaction), message passing over the neighbourhoods, neuron
        cells = self.cell_transformation(state)
        # 3-4. carrier, heads, move, next energy: dense, compiled as one graph when config.compile
        top, h, c, heads, pos, energy = self._advance(cells.transformation, state.h, state.c, state.pos, state.energy)
        # 5. lifecycle: every decision is a mask computed on the device ...
        replay = decisions is not None and bool(decisions.counts)
        if replay and decisions.replay_fates:  # a recompute of this step (activation checkpointing): what the forward decided
            died, arrived, spawns = decisions.masks()
        else:
            died = energy < cfg.energy_threshold
            arrived = ~died & (pos[:, 2] >= cfg.lattice_depth - 1)
            spawns = self._spawn_mask(~died & ~arrived, energy, heads.spawn_score, state.batch, batch_size)
        alive = ~died & ~arrived
        assert died.dtype == arrived.dtype == alive.dtype == spawns.dtype == torch.bool
        # ... and the step's one host sync reads how many flows each mask holds (it fixes the
        # next step's shapes); the flows are then picked by slicing stable sorts, which give the
        # same ascending indices that nonzero would, at no further sync.
        if replay:
            read = decisions.counts
        else:
            counts = [alive.sum(), arrived.sum(), spawns.sum(), cells.num_occupied]
            read = read_counts(counts + ([also_read] if also_read is not None else []))
            if decisions is not None:
                decisions.record(read, died, arrived, spawns)
        n_alive, n_arrived, n_spawned, n_occupied, *extra = read
        n_died = state.num_flows - n_alive - n_arrived
        if n_alive == state.num_flows:  # fast path: nobody arrives or dies
            alive_idx = arrived_idx = died_idx = None
        else:
            fate = torch.sort(died.to(torch.uint8) * 2 + arrived.to(torch.uint8), stable=True).indices
            alive_idx, arrived_idx, died_idx = fate[:n_alive], fate[n_alive:n_alive + n_arrived], fate[n_alive + n_arrived:]
        energy_after_split = energy
        if n_spawned:
            parent_idx = torch.sort((~spawns).to(torch.uint8), stable=True).indices[:n_spawned]
            # the child takes sigmoid(score) / 2 of its parent's energy: the sum is conserved
            share = self.carrier.split_fraction(heads.spawn_score.index_select(0, parent_idx))
            child_energy = energy.index_select(0, parent_idx) * share
            energy_after_split = energy.index_add(0, parent_idx, child_energy, alpha=-1)
        else:
            parent_idx = spawns.new_zeros(0, dtype=torch.long)

        moved = FlowState(h=h, c=c, pos=pos, energy=energy_after_split, batch=state.batch, flow_id=state.flow_id)
        # Fast paths: most steps keep every flow or spawn nothing; skip those copies of [L, F, H].
        next_state = moved if alive_idx is None else moved.select(alive_idx)
        if n_spawned:
            children = self._children(moved, parent_idx, child_energy, heads.child_dxy, next_id)
            next_state = FlowState.cat([next_state, children])

        if arrived_idx is None:
            arrived_idx = died_idx = parent_idx.new_zeros(0)
        arrivals = self._deposits(arrived_idx, state, pos, energy.index_select(0, arrived_idx), top)
        phantoms = None
        if cfg.survival_gradient and n_died and torch.is_grad_enabled():
            phantom_energy = survival_phantom_energy(heads.energy_logit.index_select(0, died_idx), cfg.energy_threshold)
            phantoms = self._deposits(died_idx, state, pos, phantom_energy, top)
        if logger.isEnabledFor(DEBUG_SPAWN):
            logger.log(DEBUG_SPAWN, "step: %d flows, %d spawned, %d died, %d arrived",
                       state.num_flows, n_spawned, n_died, n_arrived)
        if logger.isEnabledFor(DEBUG_ENERGY):
            logger.log(DEBUG_ENERGY, "step: mean energy %.4f, min %.4f", float(energy.detach().mean()), float(energy.detach().min()))
        # bookkeeping only: detached, so it adds nothing to the autograd graph
        change = energy.detach() - state.energy.detach()
        return StepResult(
            next_state=next_state,
            arrivals=arrivals,
            occupied_cell_id=cells.occupied_cell_id[:n_occupied],
            num_spawned=n_spawned,
            num_died=n_died,
            energy_dissipated=(-change).clamp(min=0).sum(),
            energy_created=change.clamp(min=0).sum(),
            energy_died=(energy.detach() * died).sum(),
            energy_arrived=(energy.detach() * arrived).sum(),
            neighbourhood_flows=cells.neighbourhood_flows,
            spawner_flow_id=state.flow_id.index_select(0, parent_idx),
            phantoms=phantoms,
            also_read=extra[0] if extra else None,
        )

    def _deposits(self, idx: Tensor, state: FlowState, pos: Tensor, energy: Tensor, top: Tensor) -> Arrivals:
        """The flows at ``idx`` ``[A]`` as deposits of ``energy`` ``[A]`` on the output face at their new (x, y)."""
        return Arrivals(
            batch=state.batch.index_select(0, idx),
            xy=pos.index_select(0, idx)[:, :2],
            energy=energy,
            value=self.carrier.value(top.index_select(0, idx)),
            flow_id=state.flow_id.index_select(0, idx),
        )

    def advance(
        self, transformation: Tensor, h: Tensor, c: Tensor | None, pos: Tensor, energy: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, CarrierHeads, Tensor, Tensor]:
        """The dense part of a step: carrier call, heads, move and next energy (no compaction).

        Returns ``(top [F, H], h, c, heads, new pos [F, 3], next energy [F])``; the carrier sets
        the next energy, ``sigmoid(energy_logit)``, in fp32 even under autocast (the books and
        the thresholds read it).
        """
        step_input = torch.cat([transformation, energy.unsqueeze(1), self.lattice.position_encoding(pos)], dim=1)
        top, h, c = self.carrier.step(step_input, h, c)
        heads = self.carrier.heads(top)
        new_pos = self.lattice.move(pos, heads.dxy, heads.dz_fraction)
        return top, h, c, heads, new_pos, torch.sigmoid(heads.energy_logit.float())

    def _advance(self, *args: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, CarrierHeads, Tensor, Tensor]:
        if self._compiled_advance is None:
            return self.advance(*args)
        # dynamo treats nn.GRU/LSTM as a graph break unless allow_rnn is set; patch it locally
        with torch._dynamo.config.patch(allow_rnn=True):
            return self._compiled_advance(self, *args)

    def cell_transformation(self, state: FlowState) -> CellStep:
        """The neuron's transformation for every flow, computed per occupied cell.

        The cells sit in F rows (a size the host knows, so no sync): the C occupied cells, then
        padding rows that no flow reads. Each occupied cell aggregates the messages of the flows of its sample within
        ``interaction_radius`` cells, runs the neuron once, and every flow reads its own cell's
        result (see :class:`CellStep`).
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
        heard = degree(edges[1], num_flows + 1)  # flows each cell heard = its in-degree in the graph
        return CellStep(transformation, occupied, heard.index_select(0, cell_index).sum(), num_occupied)

    def _spawn_mask(self, alive: Tensor, energy: Tensor, score: Tensor, batch: Tensor, batch_size: int) -> Tensor:
        """``[F]`` bool: the continuing flows that spawn, best score first per sample, at most
        ``max_spawn_per_step`` per sample and never past :attr:`active_flow_budget` (no host sync)."""
        cfg = self.config
        candidate = alive & self.carrier.can_spawn(energy, score)
        alive_per_sample = torch.zeros(batch_size, dtype=torch.long, device=batch.device).index_add_(0, batch, alive.long())
        room = (self.active_flow_budget - alive_per_sample).clamp(min=0, max=cfg.max_spawn_per_step)
        # non-candidates rank after every candidate of their sample
        best = keep_top_per_group(batch, torch.where(candidate, score.detach(), float("-inf")), room, batch_size)
        return candidate & best

    def _children(
        self, parents: FlowState, parent_idx: Tensor, child_energy: Tensor, child_dxy: Tensor, next_id: int
    ) -> FlowState:
        """Children of the flows at ``parent_idx``: own hidden state and lateral offset, part of the energy.

        ``child_energy`` is ``[S]``, one entry per parent in ``parent_idx`` order."""
        p = parents.select(parent_idx)
        h, c = self.carrier.spawn(p.h, p.c)
        xy = self.lattice.reflect_xy(p.pos[:, :2] + child_dxy.index_select(0, parent_idx))
        return FlowState(
            h=h,
            c=c,
            pos=torch.cat([xy, p.pos[:, 2:]], dim=1),
            energy=child_energy,
            batch=p.batch,
            flow_id=next_id + torch.arange(parent_idx.numel(), device=parent_idx.device),
        )


def _path_record(flow_id: Tensor, batch: Tensor, pos: Tensor, energy: Tensor) -> dict[str, Tensor]:
    return {name: t.detach().cpu() for name, t in
            [("flow_id", flow_id), ("batch", batch), ("pos", pos), ("energy", energy)]}


def _face_pos(xy: Tensor, config: EnergyConfig) -> Tensor:
    return torch.cat([xy, torch.full_like(xy[:, :1], config.lattice_depth - 1)], dim=1)


def _cat_arrivals(arrivals: list[Arrivals]) -> Arrivals:
    """All arrivals of a forward; every forward runs >= 1 step (>= 1 flow, D >= 2), so the list is
    never empty (a step with no arrival contributes empty tensors)."""
    return Arrivals(
        batch=torch.cat([a.batch for a in arrivals]),
        xy=torch.cat([a.xy for a in arrivals]),
        energy=torch.cat([a.energy for a in arrivals]),
        value=torch.cat([a.value for a in arrivals]),
        flow_id=torch.cat([a.flow_id for a in arrivals]),
    )
