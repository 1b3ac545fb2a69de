"""`FlowTrace`: what happened during one forward, step by step.

Counts are host integers the engine has read anyway: each step's one host sync
(:func:`~efgraph.core.compaction.read_counts`) reads how many flows continue, arrive and spawn and
how many cells are occupied, which fixes the next step's shapes; the dead are the rest, and the
active flows are the state's own count. Energies stay on the device as one stacked tensor and are
copied to the host only when a caller asks, so keeping the trace on costs no extra
synchronisation in the step loop. The forward records each step in one call
(:meth:`FlowTrace.record_step`) and makes the energy rows cumulative once, at its end
(:meth:`FlowTrace.finish`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from efgraph.core.flow_state import FlowState
from efgraph.core.records import Arrivals, EnergyBooks, StepResult

ENERGY_COLUMNS = ("energy_in_flight", "energy_arrived", "energy_lost", "energy_created")


@dataclass
class FlowTrace:
    """Per-step record of a forward over a batch.

    Lists hold one entry per executed step. ``energy`` rows are *cumulative* at the end of the
    step: in flight, arrived at the output face, lost (falls of energy set by the carrier, and
    the energy of dying flows) and created (rises of energy set by the carrier), so
    ``energy_injected + created == in_flight + arrived + lost`` at every step.
    """

    batch_size: int
    initial_flows: int
    energy_injected: Tensor  # scalar, detached
    active: list[int] = field(default_factory=list)  # flows at the start of the step
    occupied: list[int] = field(default_factory=list)  # occupied cells in the step
    spawned: list[int] = field(default_factory=list)
    died: list[int] = field(default_factory=list)
    arrived: list[int] = field(default_factory=list)
    energy_rows: list[Tensor] = field(default_factory=list)  # each [4], detached
    # each a detached scalar: sum over the step's flows of the flows in their interaction neighbourhood
    neighbourhood_rows: list[Tensor] = field(default_factory=list)
    # when recorded: one dict per step (flows at its start) plus one for the arrivals, each with
    # CPU tensors flow_id [N], batch [N], pos [N, 3], energy [N]
    paths: list[dict[str, Tensor]] | None = None
    # recorded with the paths: flow id of each child's parent, so every arrival can be traced back
    # to the input-face cell its lineage started from (channel figures)
    parent_of: dict[int, int] | None = None
    step_books: list[EnergyBooks] = field(default_factory=list, repr=False)  # per step, until finish()

    @classmethod
    def start(cls, state: FlowState, batch_size: int, record_paths: bool = False) -> "FlowTrace":
        """The trace of a forward whose injected flows are ``state`` (unpadded)."""
        return cls(batch_size=batch_size, initial_flows=state.num_flows, energy_injected=state.energy.detach().sum(),
                   paths=[] if record_paths else None, parent_of={} if record_paths else None)

    @property
    def next_flow_id(self) -> int:
        """The id the next child gets: flows are numbered in the order they start."""
        return self.initial_flows + self.total_spawned

    def record_step(self, state: FlowState, result: StepResult) -> None:
        """One step: ``state`` its flows at the start, ``result`` what the step made of them."""
        if self.paths is not None:
            self.paths.append(_path_record(state))
            # the children got ids next_flow_id, next_flow_id + 1, ... in spawner order
            first = self.next_flow_id
            self.parent_of.update(zip(range(first, first + result.num_spawned), result.spawner_flow_id.tolist()))
        self.active.append(state.num_active)
        self.occupied.append(result.occupied_cell_id.numel())
        self.spawned.append(result.num_spawned)
        self.died.append(result.num_died)
        self.arrived.append(result.num_arrived)
        self.neighbourhood_rows.append(result.neighbourhood_flows.detach())
        self.step_books.append(result.books)

    def finish(self, landed: list[Arrivals], depth: int) -> None:
        """At the end of the forward: the cumulative energy rows from the steps' books, and with
        paths the arrivals' record (``landed``: every step's deposits, ``depth``: D)."""
        if self.step_books:  # cumulative in flight, arrived, lost, created after each step (ENERGY_COLUMNS)
            names = [f.name for f in fields(EnergyBooks)]
            # one stack and one cumsum for every book and step: [books, S]
            per_step = torch.stack([getattr(b, name) for name in names for b in self.step_books]).view(len(names), -1)
            step, total = dict(zip(names, per_step)), dict(zip(names, per_step.cumsum(1)))
            rows = torch.stack([step["in_flight"], total["arrived"], total["dissipated"] + total["died"],
                                total["created"]], dim=1)
            self.energy_rows = list(rows.unbind())
        if self.paths is not None:
            self.paths.append(_landed_record([a.deposited(self.batch_size) for a in landed], depth))

    @classmethod
    def merge(cls, traces: list["FlowTrace"]) -> "FlowTrace":
        """One trace of a batch from the traces of its micro-batches' forwards.

        Counts add up step by step (a micro-batch whose forward ended earlier adds nothing to the
        later steps); the cumulative energy books add up with a finished micro-batch's last row
        carried on; ``paths`` are not merged (``None``). Device tensors are combined on the device:
        no host copy.
        """
        if len(traces) == 1:
            return traces[0]
        steps = max(t.num_steps for t in traces)

        def per_step(name: str) -> list[int]:
            return [sum(getattr(t, name)[k] for t in traces if k < t.num_steps) for k in range(steps)]

        def books(t: FlowTrace, k: int) -> Tensor:
            if t.energy_rows:
                return t.energy_rows[min(k, t.num_steps - 1)]
            zero = torch.zeros_like(t.energy_injected)
            return torch.stack([t.energy_injected, *[zero] * (len(ENERGY_COLUMNS) - 1)])

        return cls(
            batch_size=sum(t.batch_size for t in traces),
            initial_flows=sum(t.initial_flows for t in traces),
            energy_injected=torch.stack([t.energy_injected for t in traces]).sum(),
            active=per_step("active"),
            occupied=per_step("occupied"),
            spawned=per_step("spawned"),
            died=per_step("died"),
            arrived=per_step("arrived"),
            energy_rows=[torch.stack([books(t, k) for t in traces]).sum(0) for k in range(steps)],
            neighbourhood_rows=[torch.stack([t.neighbourhood_rows[k] for t in traces if k < t.num_steps]).sum()
                                for k in range(steps)],
        )

    @property
    def num_steps(self) -> int:
        return len(self.active)

    @property
    def energy(self) -> Tensor:
        """``[S, 4]`` cumulative (in flight, arrived, lost, created) after each step."""
        if not self.energy_rows:
            return torch.zeros(0, len(ENERGY_COLUMNS))
        return torch.stack(self.energy_rows)

    @property
    def neighbourhood_flows(self) -> list[float]:
        """Per step: mean number of flows in a flow's interaction neighbourhood (itself included)."""
        sums = torch.stack(self.neighbourhood_rows).tolist() if self.neighbourhood_rows else []
        return [s / max(n, 1) for s, n in zip(sums, self.active)]

    @property
    def total_spawned(self) -> int:
        return sum(self.spawned)

    @property
    def total_died(self) -> int:
        return sum(self.died)

    @property
    def total_arrived(self) -> int:
        return sum(self.arrived)

    def summary(self) -> dict[str, float]:
        """Scalars for logging: totals, peak flows, fraction of injected energy that arrived."""
        injected = float(self.energy_injected)
        final = self.energy[-1].tolist() if self.energy_rows else [injected, 0.0, 0.0, 0.0]
        heard = float(torch.stack(self.neighbourhood_rows).sum()) if self.neighbourhood_rows else 0.0
        flow_steps = sum(self.active)
        return {
            "steps": float(self.num_steps),
            "initial_flows": float(self.initial_flows),
            "peak_active_flows": float(max(self.active, default=0)),
            "mean_active_flows": float(sum(self.active) / max(self.num_steps, 1)),
            "mean_occupied_cells": float(sum(self.occupied) / max(self.num_steps, 1)),
            "spawned": float(self.total_spawned),
            "died": float(self.total_died),
            "arrived": float(self.total_arrived),
            "arrived_per_sample": self.total_arrived / self.batch_size,
            "spawned_per_sample": self.total_spawned / self.batch_size,
            # flow-weighted: the mean, over flow-steps, of the flows a flow's neuron heard
            "neighbourhood_flows": heard / flow_steps if flow_steps else 0.0,
            "energy_injected": injected,
            "energy_arrived_fraction": final[1] / injected if injected > 0 else 0.0,
            "energy_lost_fraction": final[2] / injected if injected > 0 else 0.0,
            "energy_created_fraction": final[3] / injected if injected > 0 else 0.0,
            "mean_initial_energy": injected / max(self.initial_flows, 1),
        }

    def per_step_metrics(self) -> dict[str, float]:
        """``active_step_k``, ``spawned_step_k``, ``neighbourhood_step_k`` and ``mean_energy_step_k``
        (mean energy of the flows active at the start of step k) for each lattice step k (1-based):
        one W&B curve per lattice step shows how the dynamics change during training."""
        # energy rows are the state at the *end* of each step, ``active`` counts flows at the *start*
        in_flight = [float(self.energy_injected)] + (self.energy[:, 0].tolist() if self.energy_rows else [])
        out: dict[str, float] = {}
        steps = zip(self.active, self.spawned, self.neighbourhood_flows, in_flight)
        for k, (active, spawned, heard, energy) in enumerate(steps, 1):
            out[f"active_step_{k}"] = float(active)
            out[f"spawned_step_{k}"] = float(spawned)
            out[f"neighbourhood_step_{k}"] = heard
            out[f"mean_energy_step_{k}"] = energy / active if active else 0.0
        return out

    def as_dict(self) -> dict[str, list]:
        """Per-step lists (one host copy of the energies)."""
        energy = self.energy.tolist()
        out: dict[str, list] = {
            "active": list(self.active),
            "occupied": list(self.occupied),
            "spawned": list(self.spawned),
            "died": list(self.died),
            "arrived": list(self.arrived),
            "neighbourhood_flows": self.neighbourhood_flows,
        }
        for i, name in enumerate(ENERGY_COLUMNS):
            out[name] = [row[i] for row in energy]
        return out


def _path_record(state: FlowState) -> dict[str, Tensor]:
    """The flows of ``state`` (padding dropped) as CPU tensors, for figures."""
    real = state.valid if state.valid is not None else slice(None)
    return {name: getattr(state, name)[real].detach().cpu() for name in ("flow_id", "batch", "pos", "energy")}


def _landed_record(ends: list[Arrivals], depth: int) -> dict[str, Tensor]:
    """Where the arrivals landed (their (x, y) on the output face, z = D-1), for figures."""
    if not ends:
        empty = torch.zeros(0, dtype=torch.long)
        return {"flow_id": empty, "batch": empty, "pos": torch.zeros(0, 3), "energy": torch.zeros(0)}
    landed = Arrivals.cat(ends)
    pos = torch.cat([landed.xy, torch.full_like(landed.xy[:, :1], depth - 1)], dim=1)
    return {name: t.detach().cpu() for name, t in
            [("flow_id", landed.flow_id), ("batch", landed.batch), ("pos", pos), ("energy", landed.energy)]}
