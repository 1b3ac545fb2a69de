"""`FlowStep`: the maths of one lattice step, for all F active flows of a batch at once.

1. *Occupied cells*: cell id = (sample, cell) compacted by a sort at a static size
   (:func:`~efgraph.core.compaction.unique_padded`) -> C cells in F rows.
2. *Message passing* flows -> the cells within ``interaction_radius`` of each flow's cell
   (:class:`FlowToCellConv`, over edges or on a dense grid, whichever is cheaper), then the
   :class:`SimpleNeuron` on each flow's cell's aggregate and position code (F rows).
3. *Carrier*: one recurrent call over the F flows, then the heads.
4. *Move*: lateral move reflected at the faces, ``dz >= 1`` and never past the output face.
5. *Lifecycle*: the carrier *sets* each flow's energy (``sigmoid`` of its energy head, so it can
   rise as well as fall; a rise is booked as created energy, a fall as dissipated); a flow under
   ``energy_threshold`` dies (with ``survival_gradient`` it still sends a surrogate gradient, see
   :mod:`efgraph.core.survival`); a flow on the output face arrives; the rest continue, and those
   above ``spawn_threshold`` with a positive spawn score spawn a child that takes part of their
   energy, within the per-sample budgets ``max_spawn_per_step`` and ``max_active_flows``. A parent
   whose energy the carrier raises again spawns again.

Energy books, at every step: ``injected + created = in flight + arrived + lost``. Because every
continuing flow advances at least one cell in z, a forward ends within D-1 steps.

A step is two functions around one host sync: :meth:`FlowStep.decide` (1-5 up to every flow's fate
as masks, their counts and the books), then, once the caller has read the counts,
:meth:`FlowStep.compact` (the next state: continuing flows, then the children). What arrives is
the output face's (:meth:`~efgraph.core.readout.OutputFace.deposit`). Every shape inside them is
the number of rows, and padding rows (sample B, one past the batch, see
:class:`~efgraph.core.flow_state.FlowState`) are counted by no decision, budget, book or deposit,
so each function can be one compiled graph with static shapes. How a step is *run* (compiled,
checkpointed and replayed, observed by the diagnostics) is
:class:`~efgraph.core.flow_processor.FlowProcessor`'s: nothing here knows of it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.utils import degree

from efgraph.core.model_config import ModelConfig, config_attribute
from efgraph.core.budget import keep_top_per_group
from efgraph.core.compaction import unique_padded
from efgraph.core.energy_carrier import CarrierHeads, EnergyCarrier
from efgraph.core.energy_lattice import EnergyLattice
from efgraph.core.flow_state import FlowState
from efgraph.core.message_passing import (FlowToCellConv, grid_is_cheaper, neighbourhood_edges,
                                          neighbourhood_offsets)
from efgraph.core.records import CellStep, Decision, EnergyBooks, StepCounts
from efgraph.core.simple_neuron import SimpleNeuron

# id of the padding rows of a step's occupied cells: past every real id, so the ids stay sorted
PADDING_CELL_ID = torch.iinfo(torch.long).max


class FlowStep(nn.Module):
    """One lattice step's maths: the shared neuron, carrier and message passing, and the step gates.

    Args:
        config: the model's config (the carrier's, neuron's and message widths, the thresholds and
            budgets, ``interaction_radius``, ``residual_steps``).
        lattice: the geometry.
        neuron: the shared :class:`SimpleNeuron` (built from ``config`` when not given).

    Shapes:
        :meth:`decide`: a :class:`FlowState` of F rows -> a :class:`Decision` of F rows;
        :meth:`compact`: F rows -> ``rows`` rows (the continuing flows, then the children).
    """

    config = config_attribute()  # the processor's one frozen config, set once

    def __init__(self, config: ModelConfig, lattice: EnergyLattice, neuron: SimpleNeuron | None = None) -> None:
        super().__init__()
        self.config = config
        self.lattice = lattice
        self.neuron = neuron if neuron is not None else SimpleNeuron(config)
        self.carrier = EnergyCarrier(config)
        self.conv = FlowToCellConv(config.carrier_hidden_dim, config.message_dim, config.aggregation)
        # residual_steps: the gate of each lattice step after the first, started closed (see gate)
        self.gates = (nn.Parameter(torch.zeros(config.lattice_depth - 2))
                      if config.residual_steps and config.lattice_depth > 2 else None)
        self.register_buffer("neighbour_offsets", neighbourhood_offsets(config.interaction_radius), persistent=False)

    def decide(self, state: FlowState, batch_size: int, budget: Tensor, gate: Tensor | None = None,
               spawn_allowed: bool = True, observed: bool = False) -> Decision:
        """Steps 1-5 up to the sync: cells, message passing, neuron, carrier, move, and every
        flow's fate as masks on the device (padding rows have none).

        Args:
            state: the F flows (padded to a bucket size when compiled).
            batch_size: B.
            budget: 0-d int64, the per-sample cap on active flows that spawning respects.
            gate, spawn_allowed: the step's gate and whether it may spawn (:meth:`gate`).
            observed: also return the carrier's input and heads (:attr:`Decision.carrier_input`,
                :attr:`Decision.heads`), for a caller that hooks their gradients.
        """
        cfg = self.config
        cells = self.cells(state, batch_size)
        carrier_input, top, h, c, heads, pos, energy = self.advance(cells.transformation, state.h, state.c,
                                                                    state.pos, state.energy, gate)
        if state.valid is not None:  # the carrier updated the padding rows too: back to canonical
            h, c, pos, energy = _canonical_padding(state.valid, h, c, pos, energy)
        # the survival surrogate reads the logit of the energy the step set (a gated step's blend)
        energy_logit = heads.energy_logit if gate is None else torch.logit(energy, eps=1e-6)
        died = energy < cfg.energy_threshold
        arrived = ~died & (pos[:, 2] >= cfg.lattice_depth - 1)
        if state.valid is not None:
            died, arrived = died & state.valid, arrived & state.valid
        alive = _continuing(state.valid, died, arrived)
        spawns = self.spawn_mask(alive, energy, heads.spawn_score, state.batch, batch_size, budget)
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
                        cells.occupied_cell_id, cells.neighbourhood_flows,
                        carrier_input if observed else None, heads if observed else None)

    def compact(self, moved: FlowState, spawn_score: Tensor, child_dxy: Tensor, died: Tensor, arrived: Tensor,
                spawns: Tensor, next_id: Tensor, rows: int, batch_size: int, gate: Tensor | None = None) -> FlowState:
        """The next state, ``rows`` rows: the continuing flows, then the spawners' children (each
        with its own hidden state and lateral offset and ``sigmoid(score) / 2`` of its parent's
        energy, so the sum is conserved), both in row order, then padding (only when compiled;
        canonical, see :class:`FlowState`). A gated step (``residual_steps``) scales the children's
        state perturbation and offset by its gate.

        Children are made for every row and the rows kept are picked by one stable sort on their
        fate (continues 0, child 1, gone 2): static shapes, the same order as ``nonzero``."""
        padded = moved.valid is not None  # compiled: rows is a bucket size, the rest padding
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
            if not padded:
                return kept
            return torch.where(keep.view([-1 if d == dim else 1 for d in range(kept.dim())]), kept, fill)

        return FlowState(
            h=rows_kept(moved.h, child_h, 0.0, dim=1),
            c=None if moved.c is None else rows_kept(moved.c, child_c, 0.0, dim=1),
            pos=rows_kept(moved.pos, torch.cat([child_xy, moved.pos[:, 2:]], dim=1), 0.0),
            energy=rows_kept(moved.energy - child_energy, child_energy, 0.0),
            batch=rows_kept(moved.batch, moved.batch, batch_size),
            flow_id=rows_kept(moved.flow_id, next_id + torch.cumsum(spawns, 0) - 1, -1),
            valid=keep if padded else None,
        )

    def advance(
        self, transformation: Tensor, h: Tensor, c: Tensor | None, pos: Tensor, energy: Tensor,
        gate: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, CarrierHeads, Tensor, Tensor]:
        """The dense part of a step: carrier call, heads, move and next energy (no compaction).

        Returns ``(carrier input [F, in], top [F, H], h, c, heads, new pos [F, 3], next energy [F])``; the carrier sets
        the next energy, ``sigmoid(energy_logit)``, in fp32 even under autocast (the books and
        the thresholds read it). A ``gate`` g (scalar, ``residual_steps``) makes the step a residual
        update: ``h + g (h_new - h)`` (and ``c``), lateral move ``g * dxy``, energy
        ``e + g (sigmoid(logit) - e)``; ``top`` is then the gated state's top layer. The move in z
        is never gated: every step still advances a flow by at least one cell.
        """
        step_input = torch.cat([transformation, energy.unsqueeze(1), self.lattice.position_encoding(pos)], dim=1)
        top, h_new, c_new = self.carrier.step(step_input, h, c)
        heads = self.carrier.heads(top)
        next_energy = torch.sigmoid(heads.energy_logit.float())
        dxy = heads.dxy
        if gate is not None:
            h_new = h + gate * (h_new - h)
            c_new = None if c is None else c + gate * (c_new - c)
            top = h_new[-1]
            dxy = gate * dxy
            next_energy = energy + gate * (next_energy - energy)
        new_pos = self.lattice.move(pos, dxy, heads.dz_fraction)
        return step_input, top, h_new, c_new, heads, new_pos, next_energy

    def gate(self, step_index: int) -> tuple[Tensor | None, bool]:
        """``(gate, spawn_allowed)`` of lattice step ``step_index`` of a forward.

        Without ``residual_steps``: ``(None, True)``, every step a full update. With it, the first
        step is the one-step model's (``(None, False)``: a full update and no spawning, the one-step
        lattice's flows all arrive at once) and step ``t >= 1`` is gated by ``g_t =
        clamp(gates[t-1], 0, 1)``, whose gradient passes the clamp (straight through), so a
        gate pushed below 0 is closed yet can reopen. Every gate starts at 0: the deep lattice then
        computes the one-step lattice's output (each flow's state, landing point and energy are
        the first step's), and training decides how far to open each step.
        """
        if self.gates is None:
            return None, not self.config.residual_steps
        if step_index == 0:
            return None, False
        raw = self.gates[step_index - 1]
        return raw + (raw.clamp(0.0, 1.0) - raw).detach(), True

    @torch.no_grad()
    def project_parameters(self) -> None:
        """Put the parameters that have a range back into it; the trainer calls this after every
        optimizer step. With ``project_step_gates`` that is each step gate into [0, 1], so a gate
        the gradient closed waits at 0 (where :meth:`step_gate` reads it as closed and its gradient
        still flows) instead of sinking below it. Without it, nothing changes."""
        if self.gates is not None and self.config.project_step_gates:
            self.gates.clamp_(0.0, 1.0)

    def cells(self, state: FlowState, batch_size: int) -> CellStep:
        """The neuron's transformation for every flow: its cell's, from the flows around that cell.

        Each flow's cell aggregates the messages of the flows of its sample within
        ``interaction_radius`` cells, in the layout that touches fewer rows (edges or grid, see
        :mod:`efgraph.core.message_passing`; the same sums), and the neuron runs on that aggregate
        and the cell's position code (see :class:`CellStep`). The rows are the F flows (a size the
        host knows, so no sync): flows that share a cell get the same input and so the same
        transformation. Padding flows (sample ``batch_size``) sit in cells of their own sample,
        after every real cell, and are not counted.
        """
        lattice, radius = self.lattice, self.config.interaction_radius
        num_flows = state.num_flows
        cell = lattice.cell_coordinates(state.pos)
        cell_id = lattice.cell_id(state.batch, cell)
        # the occupied cells, sorted (the step's record), the padding id past every real id
        occupied, cell_index, num_occupied = unique_padded(cell_id, fill=PADDING_CELL_ID)
        samples = batch_size + 1  # the padding rows' sample included
        if grid_is_cheaper(num_flows, samples * lattice.num_cells, radius):
            # a cell id is the row of a (samples, D, H, W) grid; a non-finite position's cell is
            # out of it, and such a flow reads its clamped cell instead of an out-of-range row
            grid_id = cell_id.clamp(0, samples * lattice.num_cells - 1)
            aggregated, heard = self.conv.on_grid(state.h[-1], state.energy, grid_id,
                                                  (samples, lattice.depth, lattice.height, lattice.width), radius)
        else:
            # row F collects the edges to empty cells and is dropped
            edges = neighbourhood_edges(cell, state.batch, occupied, cell_index, self.neighbour_offsets,
                                        lattice.cell_bounds, lattice.cell_id, miss_row=num_flows)
            aggregated = self.conv(state.h[-1], state.energy, edges, num_flows + 1).index_select(0, cell_index)
            heard = degree(edges[1], num_flows + 1).index_select(0, cell_index)
        cell_code = lattice.position_encoding(cell.to(state.pos.dtype))
        transformation = self.neuron(torch.cat([aggregated, cell_code], dim=1))
        if state.valid is not None:  # the padding flows' cells (their own sample) are not counted
            heard = heard * state.valid
            num_occupied = (occupied < batch_size * self.config.num_cells).sum()
        return CellStep(transformation, occupied, heard.sum(), num_occupied)

    def spawn_mask(self, alive: Tensor, energy: Tensor, score: Tensor, batch: Tensor, batch_size: int,
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
