"""Per-step learning diagnostics: how much gradient reaches each lattice step, and where output comes from.

Why: the lattice learns routing in one lattice step, and every extra step costs accuracy. Before
changing the engine we measure, on the trainer's *logged* training steps only, per lattice step
``k = 1 .. lattice_depth - 1``:

* ``diag/grad_carrier_in_step_k``: the mean, over the flows active at the start of step ``k``,
  of the per-flow gradient norm ``|d L_b / d u_f|`` with ``u_f`` the flow's carrier input at that
  step (``[neuron transformation, energy, position code]``, what the GRU/LSTM reads) and ``L_b``
  the loss of the flow's own sample (the batch loss times the global batch size: a flow only
  affects its own sample, so this does not shrink as the batch grows);
* ``diag/grad_move_step_k``: the same for the step's move, the displacement the lattice applies:
  the head's lateral move ``dxy`` (cells) and its depth fraction ``dz_fraction``, one ``[3]``
  vector per flow (the landing point's gradient of hypothesis 1 is the last step's ``dxy`` part);
* ``diag/grad_energy_step_k``: the same for the energy head's output, the logit that sets the
  next energy ``sigmoid(logit)``: the logit, not the energy, because the survival phantom of a
  dying flow (:mod:`efgraph.core.survival`) reads the logit, so its surrogate gradient is
  included;
* ``diag/output_share_step_k``: the share of the lattice's output carried by step ``k``'s
  arrivals: per sample, ``|W_out c_k| / sum_j |W_out c_j|`` with ``c_k`` the face the step's
  arrivals collected (``readout: face`` is linear, so ``gate * sum_k W_out c_k + bias`` is
  exactly y without the residual and the linear skip); the mean over the samples that received
  any arrival, so the shares sum to 1 over the steps whenever something arrived (all 0
  otherwise). The gate (a scalar) and bias are left out, so the shares stay defined at a closed
  gate. ``readout: shared`` is not linear: there ``c_k`` is the readout's MLP over step ``k``'s
  deposits alone, a share that needs not add up to y;

and per forward:

* ``diag/landing_cells_per_sample``: distinct output-face cells that receive energy from the
  bilinear deposits (a corner with weight exactly 0 receives none), mean over all samples (a
  sample where nothing arrived counts 0);
* ``diag/landing_effective_cells``: ``exp`` of the entropy of a sample's arrived energy over
  those cells (1 = all on one cell, n = spread evenly over n), mean over all samples (0 where
  nothing arrived);
* ``diag/start_churn`` (:class:`StartCellProbe`, kept by the trainer): the fraction of the start
  cells (the injected top-K amplitude cells) of a fixed probe batch, the first 64 training inputs,
  that were not start cells of the same input at the previous logged step (0 at the first logged
  step of a process, also after a resume).

Steps that did not run in a forward (it ended early) log 0 for every per-step key.

How. With :attr:`FlowProcessor.record_diagnostics` on, a forward records a
:class:`ForwardDiagnostics` (``processor.last_diagnostics``): each step registers a gradient hook
on its carrier input, move and energy logit (``Tensor.register_hook``; the hook computes the
per-row squared norm ``[F]`` on the device and keeps nothing else), and the forward keeps each
step's collected face and computes the landing statistics under ``no_grad``. Hooks return
``None``, so outputs and parameter gradients are bit for bit those of a forward without them
(tested). :func:`diagnostics_metrics` turns the records of one training step (one per
micro-batch) into the logged floats with one host read. With the flag off (every step off the
log grid) the engine pays one ``is None`` test per step: no op, no sync.

* Micro-batches: supported; each micro-batch's forward has its own record and the metrics add
  them up (the trainer weights each micro-batch's loss by its share of the rows, so a flow's
  gradient is the whole batch's).
* Activation checkpointing: supported; the hooks sit on the forward's tensors, whose graph the
  non-reentrant checkpoint keeps (it recomputes saved activations only), and the recompute in
  backward records nothing.
* ``compile: true``: a diagnostics forward runs the step's parts eagerly (a compiled graph keeps
  no intermediate tensor to hook), on the same padded rows, so the logged step costs eager time
  and its numbers differ from the compiled ones by rounding only; under checkpointing its
  recompute runs eagerly too (:class:`~efgraph.core.flow_processor.StepDecisions`). The
  trainer says so once in the log.
* Evaluation (no grad): the gradient keys are 0, output shares and landings are still measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from efgraph.core.compaction import unique_padded

if TYPE_CHECKING:  # the engine imports this module
    from efgraph.core.energy_carrier import CarrierHeads
    from efgraph.core.energy_lattice import EnergyLattice
    from efgraph.core.input_face import InputFace
    from efgraph.core.readout import OutputFace

PREFIX = "diag/"
# the fixed probe of start_churn: the first PROBE_SIZE training inputs
PROBE_SIZE = 64
# gradients recorded per step, in metric-key order
GRADIENT_KEYS = ("carrier_in", "move", "energy")


@dataclass
class StepWatch:
    """One lattice step of a diagnostics forward: its flows and the gradients its hooks received.

    The squared norms are filled in backward (``None`` until a gradient arrives, and for good when
    none ever does: the step's tensors could not affect the loss, a gradient of 0)."""

    num_flows: int  # flows at the start of the step (padding rows excluded): the mean's denominator
    valid: Tensor | None  # [F] bool: the real rows of a padded (compiled-shape) step, else None
    squared: dict[str, Tensor] = field(default_factory=dict)  # key -> [F] per-row |grad|^2

    def hook(self, key: str):
        """A gradient hook that adds the per-row squared norm of the gradient under ``key``
        (added, so the move's two tensors, ``dxy`` and ``dz_fraction``, make one vector)."""

        def record(grad: Tensor) -> None:
            g = grad.detach().float()
            sq = g.pow(2).flatten(1).sum(1) if g.dim() > 1 else g.pow(2)
            self.squared[key] = sq if key not in self.squared else self.squared[key] + sq
            return None  # never changes the gradient

        return record

    def gradient_sums(self, device: torch.device) -> Tensor:
        """``[3]``: per key of :data:`GRADIENT_KEYS`, the sum over the step's flows of ``|grad|``."""
        out = []
        for key in GRADIENT_KEYS:
            sq = self.squared.get(key)
            if sq is None:  # no gradient reached this tensor
                out.append(torch.zeros((), device=device))
                continue
            norm = sq.sqrt()
            if self.valid is not None:  # padding rows get no gradient, but mask them all the same
                norm = norm * self.valid
            out.append(norm.sum().to(device))
        return torch.stack(out)


@dataclass
class ForwardDiagnostics:
    """What one diagnostics forward recorded (``processor.last_diagnostics``).

    Attributes:
        batch_size: B of the forward.
        steps: one :class:`StepWatch` per executed lattice step.
        step_outputs: per executed step, ``[B, K]`` the face its arrivals collected (detached;
            ``None`` for a step without arrivals), see the module docstring.
        output_norms: ``[S, B]`` per step and sample, ``|W_out c_k|`` (set by :meth:`finish`).
        landing_cells: ``[B]`` distinct output-face cells that received energy (set by :meth:`finish`).
        landing_effective: ``[B]`` ``exp(entropy)`` of the arrived energy over those cells.
    """

    batch_size: int
    steps: list[StepWatch] = field(default_factory=list)
    step_outputs: list[Tensor | None] = field(default_factory=list)
    output_norms: Tensor | None = None
    landing_cells: Tensor | None = None
    landing_effective: Tensor | None = None

    # ---- called by the engine during the forward ----------------------------------------------
    def begin_step(self, num_flows: int, valid: Tensor | None) -> None:
        """A lattice step starts on ``num_flows`` flows (``valid``: its real rows when padded)."""
        self.steps.append(StepWatch(num_flows, None if valid is None else valid.detach()))

    def watch(self, carrier_input: Tensor, heads: "CarrierHeads") -> None:
        """Hook the current step's carrier input ``[F, in]``, move (``dxy [F, 2]``,
        ``dz_fraction [F]``) and energy logit ``[F]``; nothing is hooked without grad."""
        step = self.steps[-1]
        for key, tensor in (("carrier_in", carrier_input), ("move", heads.dxy), ("move", heads.dz_fraction),
                            ("energy", heads.energy_logit)):
            if tensor.requires_grad:
                tensor.register_hook(step.hook(key))

    def step_output(self, collected: Tensor | None) -> None:
        """The face ``[B, K]`` the current step's arrivals collected (``None``: nothing arrived)."""
        self.step_outputs.append(None if collected is None else collected.detach())

    @torch.no_grad()
    def finish(self, face: "OutputFace", batch: Tensor, xy: Tensor, energy: Tensor) -> None:
        """At the end of the forward: each step's output norms and the landing statistics.

        Args:
            face: the model's output face (readout weights, and its lattice's geometry).
            batch: ``[A]`` sample of each deposit row of the forward (``B``: a row that deposits nothing).
            xy: ``[A, 2]`` landing points; energy: ``[A]`` their energies on arrival.
        """
        b = self.batch_size
        with torch.autocast(device_type=energy.device.type, enabled=False):  # fp32 statistics
            weight = face.readout_out.weight.float()
            rows = [torch.zeros(b, device=energy.device) if c is None
                    else torch.nn.functional.linear(c.float(), weight).norm(dim=1) for c in self.step_outputs]
            self.output_norms = torch.stack(rows) if rows else torch.zeros(0, b, device=energy.device)
            self.landing_cells, self.landing_effective = landing_statistics(face.lattice, batch, xy, energy.float(), b)

    # ---- read after backward ------------------------------------------------------------------
    def output_shares(self) -> Tensor:
        """``[S, B]``: each step's share of each sample's output norm (0 for a sample without any)."""
        assert self.output_norms is not None, "finish() was not called: the forward did not complete"
        total = self.output_norms.sum(0)
        return torch.where(total > 0, self.output_norms / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)


@torch.no_grad()
def landing_statistics(lattice: "EnergyLattice", batch: Tensor, xy: Tensor, energy: Tensor,
                       batch_size: int) -> tuple[Tensor, Tensor]:
    """Per sample: the output-face cells that receive energy, and their effective number.

    The deposit of each arrival is spread bilinearly over its 4 nearest face cells
    (:meth:`EnergyLattice.landing_corners`); a cell receives the sum of ``energy * weight`` of
    every arrival of its sample.

    Args:
        lattice: geometry (``landing_corners``, W, H).
        batch: ``[A]`` sample of each row; rows with ``batch == batch_size`` deposit nothing.
        xy: ``[A, 2]`` landing points; energy: ``[A]`` energies.
        batch_size: B.

    Returns:
        ``(cells [B], effective [B])``: the count of cells with received energy > 0, and
        ``exp(-sum_q p_q log p_q)`` over them, ``p_q`` the cell's share of the sample's arrived
        energy (0 for a sample that received nothing). No host sync (sorts at a static size).
    """
    device = energy.device
    if batch.numel() == 0:
        zero = torch.zeros(batch_size, device=device)
        return zero, zero.clone()
    face = lattice.width * lattice.height
    cell, weight = lattice.landing_corners(xy)  # [A, 4]
    received = energy.unsqueeze(1) * weight  # [A, 4]
    real = (batch < batch_size).unsqueeze(1) & (received > 0)
    # every (sample, face cell) pair an id; rows that deposit nothing share the id past the batch
    ids = torch.where(real, batch.unsqueeze(1) * face + cell, batch_size * face).reshape(-1)
    unique, inverse, _ = unique_padded(ids, fill=(batch_size + 1) * face)
    per_cell = torch.zeros(ids.numel(), device=device).index_add_(0, inverse, (received * real).reshape(-1))
    sample = (unique // face).clamp(max=batch_size)  # padding rows -> B, dropped below
    hit = (per_cell > 0) & (sample < batch_size)
    groups = batch_size + 1
    cells = torch.zeros(groups, device=device).index_add_(0, sample, hit.float())
    total = torch.zeros(groups, device=device).index_add_(0, sample, torch.where(hit, per_cell, 0.0))
    p = torch.where(hit, per_cell / total.index_select(0, sample).clamp(min=torch.finfo(total.dtype).tiny), 1.0)
    entropy = torch.zeros(groups, device=device).index_add_(0, sample, torch.where(hit, -p * p.log(), 0.0))
    effective = torch.where(total > 0, entropy.exp(), 0.0)
    return cells[:batch_size], effective[:batch_size]


def diagnostics_metrics(records: list[ForwardDiagnostics], steps: int, grad_scale: float) -> dict[str, float]:
    """The logged ``diag/...`` floats of one training step from its forwards' records.

    Args:
        records: one :class:`ForwardDiagnostics` per micro-batch, after its backward.
        steps: the lattice steps to report (``lattice_depth - 1``); steps a forward did not run
            count no flows, no gradient and no output.
        grad_scale: what turns a gradient of the trained loss into one of the flow's own
            sample's loss (the global batch size over the processes, as the trainer weights its loss).

    Returns:
        ``diag/grad_{carrier_in,move,energy}_step_k``, ``diag/output_share_step_k`` for
        ``k = 1 .. steps``, ``diag/landing_cells_per_sample`` and ``diag/landing_effective_cells``
        (see the module docstring). One host read.
    """
    if not records:
        return {}
    device = records[0].landing_cells.device if records[0].landing_cells is not None else torch.device("cpu")
    grads = torch.zeros(steps, len(GRADIENT_KEYS), device=device)
    shares = torch.zeros(steps, device=device)
    flows = [0] * steps
    answered = torch.zeros((), device=device)  # samples whose output received anything
    landing = torch.zeros(2, device=device)
    samples = 0
    for record in records:
        for k, step in enumerate(record.steps[:steps]):
            grads[k] += step.gradient_sums(device)
            flows[k] += step.num_flows
        share = record.output_shares()[:steps]
        shares[: share.size(0)] += share.sum(1)
        answered += (record.output_norms.sum(0) > 0).sum()
        landing += torch.stack([record.landing_cells.sum(), record.landing_effective.sum()])
        samples += record.batch_size
    values = torch.cat([grads.flatten(), shares, answered.view(1), landing]).tolist()  # the one read
    grad_sums = values[: steps * len(GRADIENT_KEYS)]
    share_sums = values[steps * len(GRADIENT_KEYS): steps * (len(GRADIENT_KEYS) + 1)]
    answered_n, cells, effective = values[-3:]
    out: dict[str, float] = {}
    for k in range(steps):
        for i, key in enumerate(GRADIENT_KEYS):
            total = grad_sums[k * len(GRADIENT_KEYS) + i]
            out[f"{PREFIX}grad_{key}_step_{k + 1}"] = grad_scale * total / flows[k] if flows[k] else 0.0
    for k in range(steps):
        out[f"{PREFIX}output_share_step_{k + 1}"] = share_sums[k] / answered_n if answered_n else 0.0
    out[f"{PREFIX}landing_cells_per_sample"] = cells / samples
    out[f"{PREFIX}landing_effective_cells"] = effective / samples
    return out


class StartCellProbe:
    """``diag/start_churn``: how much the start cells of a fixed probe batch change between logged steps.

    Args:
        inputs: ``[P, input_dim]`` the probe (the trainer keeps its first :data:`PROBE_SIZE`
            training inputs), on the model's device.
    """

    def __init__(self, inputs: Tensor) -> None:
        self.inputs = inputs
        self.previous: Tensor | None = None  # [P, K] start cells at the last update

    @staticmethod
    @torch.no_grad()
    def start_cells(face: "InputFace", inputs: Tensor) -> Tensor:
        """``[P, K]`` the input-face cells where each input's flows start, as
        :meth:`InputFace.start_cells` picks them (in fp32, outside autocast)."""
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            return face.start_cells(inputs.to(face.face_keys.dtype))[1]

    def update(self, face: "InputFace") -> Tensor:
        """The probe's churn since the previous call, a scalar tensor (0 at the first call): per
        input, the fraction of its start cells that were not among its previous ones, averaged."""
        cells = self.start_cells(face, self.inputs)
        if self.previous is None:
            churn = torch.zeros((), device=cells.device)
        else:  # a cell is new when it equals none of the input's previous K cells
            new = (cells.unsqueeze(2) != self.previous.unsqueeze(1)).all(dim=2)  # [P, K]
            churn = new.float().mean()
        self.previous = cells
        return churn
