"""`FlowProcessor`: one forward of the energy-flow model, inject -> step until empty -> read out.

The model is three parts, each one module that owns one idea and knows nothing of how it is run:

* :class:`~efgraph.core.input_face.InputFace`: x -> the injected flows (start cells, energies,
  first carrier states);
* :class:`~efgraph.core.flow_step.FlowStep`: the maths of one lattice step (cells, message
  passing, neuron, carrier, move, every flow's fate; then the next state);
* :class:`~efgraph.core.readout.OutputFace`: what the flows that end deposit, and y.

This module runs them. A step is :meth:`FlowStep.decide`, the step's one host sync that reads
how many flows each fate holds (:meth:`~efgraph.core.records.StepCounts.read`: it fixes the next
step's shapes), then :meth:`FlowStep.compact` (skipped when every flow continues or none does) and
:meth:`OutputFace.deposit` (arrivals, and the dying flows' phantoms with ``survival_gradient``).
How it is run wraps that from outside:

* ``compile: true``: each of the three is one compiled graph with static shapes; the rows are
  padded to bucket sizes (:func:`~efgraph.core.compaction.bucket_rows`; padding rows belong to
  sample B, one past the batch, and no decision, budget, book or deposit counts them), so a
  training run compiles a bounded number of graphs (what CUDA graphs need). Eagerly, the rows
  are the flows themselves.
* ``activation_checkpointing``: the step is recomputed in backward, replaying the forward's
  fates (:class:`~efgraph.core.records.StepDecisions`).
* :attr:`FlowProcessor.record_diagnostics`: the step runs eagerly and returns its carrier input
  and heads, on which :mod:`efgraph.core.diagnostics` hooks its gradients.

Each step is recorded in the forward's :class:`~efgraph.core.trace.FlowTrace` and its deposits
added to the forward's :class:`~efgraph.core.readout.Landings`, which reads y out at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from efgraph.core.model_config import ModelConfig, config_attribute
from efgraph.core.compaction import bucket_rows
from efgraph.core.diagnostics import ForwardDiagnostics
from efgraph.core.energy_lattice import EnergyLattice
from efgraph.core.flow_state import FlowState
from efgraph.core.flow_step import FlowStep
from efgraph.core.input_face import InputFace
from efgraph.core.readout import Landings, OutputFace
from efgraph.core.records import StepCounts, StepDecisions, StepResult
from efgraph.core.simple_neuron import SimpleNeuron
from efgraph.core.survival import survival_phantom_energy
from efgraph.core.trace import FlowTrace
from efgraph.utils.logging import DEBUG_ENERGY, DEBUG_SPAWN, get_logger

logger = get_logger(__name__)

# graphs one compiled part of the step may build (buckets x batch sizes x fast paths) before
# dynamo falls back to eager; 64 holds every bucket from 8 to 6144 flows for 3 batch sizes
COMPILED_GRAPHS_LIMIT = 64

# the torch.compile backend of compile: true; tests that check what dynamo captures (graphs,
# static shapes, recompiles) set "aot_eager", which skips Inductor's minutes of C++ codegen on a CPU
COMPILE_BACKEND = "inductor"

# The step's parts that run as compiled graphs: name -> the unbound function. The *unbound*
# functions are compiled and called with their module, so a deep copy of the model (EMA, SWA)
# runs its own weights, not this instance's.
STEP_GRAPHS: dict[str, Callable[..., Any]] = {
    "decide": FlowStep.decide, "compact": FlowStep.compact, "deposit": OutputFace.deposit,
}

# state_dict keys of models saved before the model was split into its faces and step (old ->
# new prefix, first match wins): such files still load (load_model, resume; see _rename_legacy_keys)
LEGACY_KEY_PREFIXES = (
    ("lattice.input_query.", "input_face.input_query."), ("lattice.face_keys", "input_face.face_keys"),
    ("lattice.energy_bias", "input_face.energy_bias"), ("lattice.input_content.", "input_face.input_content."),
    ("lattice.content_keys", "input_face.content_keys"), ("carrier.init_from_", "input_face.init_from_"),
    ("carrier.value_head.", "output_face.value_head."), ("lattice.", "output_face."),
    ("carrier.", "flow_step.carrier."), ("neuron.", "flow_step.neuron."), ("conv.", "flow_step.conv."),
    ("step_gates", "flow_step.gates"),
)


def rename_legacy_keys(keys: list[str]) -> dict[str, str]:
    """``{old: new}`` for the keys of ``keys`` saved before the split (see :data:`LEGACY_KEY_PREFIXES`)."""
    renamed = {}
    for key in keys:
        for old, new in LEGACY_KEY_PREFIXES:
            if key.startswith(old):
                renamed[key] = new + key[len(old):]
                break
    return renamed


class FlowProcessor(nn.Module):
    """Runs the energy-flow model: ``y = processor(x)`` with x ``[B, input_dim]`` -> ``[B, output_dim]``.

    Args:
        lattice: the :class:`EnergyLattice` (geometry); it must be built from a config that agrees
            with ``config`` on the fields it reads (:attr:`EnergyLattice.READS`).
        neuron: the shared :class:`SimpleNeuron`, built to ``config``'s widths.
        config: the :class:`ModelConfig` of the model (or a run's
            :class:`~efgraph.config.EnergyConfig`, whose model part is taken); the faces, the step and
            the carrier are built from it and share this one frozen object.
        compile: how the model is run, not what it is (so not a model field): each part of the step
            one compiled graph with static shapes. Read once, here; ``None`` takes an
            ``EnergyConfig``'s ``compile`` (``False`` for a ModelConfig).
        activation_checkpointing: recompute each lattice step in backward (:attr:`activation_checkpointing`,
            which may change between forwards); ``None`` as ``compile``.

    After each forward, :attr:`last_trace` holds the :class:`FlowTrace` of that forward. Set
    :attr:`record_paths` to also keep every flow's position at every step (for figures), and
    :attr:`record_diagnostics` to record the learning diagnostics of
    :mod:`efgraph.core.diagnostics` in :attr:`last_diagnostics` (gradient hooks per step, each
    step's output, the landings; eager even with ``compile: true``).
    """

    config = config_attribute()  # the one frozen config of every part, set once

    def __init__(self, lattice: EnergyLattice, neuron: SimpleNeuron, config: ModelConfig,
                 compile: bool | None = None, activation_checkpointing: bool | None = None) -> None:
        super().__init__()
        # how the model is run: a run's config (EnergyConfig) carries its choice, a ModelConfig none
        compile = getattr(config, "compile", False) if compile is None else compile
        if activation_checkpointing is None:
            activation_checkpointing = getattr(config, "activation_checkpointing", False)
        config = ModelConfig.of(config)
        differing = [k for k in EnergyLattice.READS if getattr(lattice.config, k) != getattr(config, k)]
        if differing:  # a 10x10 lattice under a 20x20 model would index the wrong cells
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
        self.input_face = InputFace(config, lattice)
        self.flow_step = FlowStep(config, lattice, neuron)
        self.output_face = OutputFace(config, lattice)
        # linear_skip: y gains W x, W started at 0 (the model at initialisation is the one without it)
        self.linear_skip = nn.Linear(config.input_dim, config.output_dim, bias=False) if config.linear_skip else None
        if self.linear_skip is not None:
            nn.init.zeros_(self.linear_skip.weight)
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)
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
        # read on every forward: each lattice step recomputed in backward (the trainer turns it on
        # when its memory plan needs it)
        self.activation_checkpointing: bool = bool(activation_checkpointing)
        # compile is read here, once: the graphs and the padding (static shapes) follow this value;
        # fullgraph: no silent graph breaks
        self._static_shapes = bool(compile)
        self._compiled = (
            {name: torch.compile(fn, backend=COMPILE_BACKEND, dynamic=False, fullgraph=True)
             for name, fn in STEP_GRAPHS.items()} if self._static_shapes else None
        )

    @property
    def neuron(self) -> SimpleNeuron:
        """The shared neuron (the step's)."""
        return self.flow_step.neuron

    @property
    def carrier(self) -> nn.Module:
        """The shared carrier (the step's)."""
        return self.flow_step.carrier

    @classmethod
    def from_config(cls, config: ModelConfig, compile: bool | None = None,
                    activation_checkpointing: bool | None = None) -> "FlowProcessor":
        """A fresh model built from ``config`` (a ModelConfig, or a run's EnergyConfig: its model,
        and unless given, its ``compile`` and ``activation_checkpointing``)."""
        return cls(EnergyLattice(config), SimpleNeuron(config), config, compile, activation_checkpointing)

    @property
    def compiled(self) -> bool:
        """Whether the step's parts run as compiled graphs (fixed when the model is built)."""
        return self._static_shapes

    @torch.no_grad()
    def project_parameters(self) -> None:
        """Put the parameters that have a range back into it (the trainer calls this after every
        optimizer step): the step gates with ``project_step_gates`` (:meth:`FlowStep.project_parameters`)."""
        self.flow_step.project_parameters()

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x [B, input_dim]`` (or, with ``input_sequence``, ``x [B, T, input_dim]`` and a bool
        ``mask [B, T]``, None: every token) -> ``y [B, output_dim]``: inject the flows at the input
        face, step until no flow is active (at most D-1 steps), read y off the output face (plus x
        with ``residual``, plus ``W x`` with ``linear_skip``). The forward's trace goes to
        :attr:`last_trace` (and with :attr:`record_diagnostics` its diagnostics to :attr:`last_diagnostics`)."""
        batch_size = self._begin_forward(x, mask)
        try:
            state = self.inject(x, mask)
            trace = FlowTrace.start(state, batch_size, record_paths=self.record_paths)
            landings = Landings(self.output_face, batch_size, x)
            state = state.padded(bucket_rows(state.num_flows), batch_size) if self._static_shapes else state
            nonfinite = (~torch.isfinite(x)).any().long()  # read in the first step's sync, not one of its own
            for step_index in range(self.config.lattice_depth - 1):
                if state.num_active == 0:
                    break
                result = self._run_step(state, batch_size, trace.next_flow_id, nonfinite if step_index == 0 else None,
                                        step_index)
                if step_index == 0 and result.counts.also_read:
                    self._raise_nonfinite_rows(x)
                trace.record_step(state, result)
                landings.add(result)
                state = result.next_state
            self._check_finished(state)
            trace.finish(landings.arrivals, self.config.lattice_depth)
            self.last_trace = trace
            y = landings.read() if self.linear_skip is None else landings.read() + self.linear_skip(x)
            self._finish_recording(landings)
        finally:
            self._recording = None
        return x + y if self.config.residual else y

    def inject(self, x: Tensor, mask: Tensor | None = None) -> FlowState:
        """The flows of a batch at the input face (unpadded); ``x`` and ``mask`` as :meth:`forward`'s."""
        return self.input_face(x, mask)

    def at_depth(self, depth: int) -> "FlowProcessor":
        """This model at lattice depth ``depth`` >= its own, with the same parameters (a new model).

        Every per-step parameter is shared or extended by a rule: the carrier, neuron and heads are
        one for every step; the z position code keeps the span it was trained with
        (``position_z_extent``, so a z it saw reads the same code and a deeper z continues the
        sinusoids); with ``residual_steps`` each step past the trained ones takes the last trained
        step's gate (0, closed, where there was none). Past the trained depth a flow still advances at
        least one cell a step and may jump any fraction of the depth left, so it lands when its
        carrier says it is done (a jump of the whole rest) or at most D'-1 steps after it started.
        The budget it ran under (:attr:`active_flow_budget`) and the device go with it.

        Raises:
            ValueError: ``depth`` below the model's own depth.
        """
        cfg = self.config
        if depth < cfg.lattice_depth:
            raise ValueError(f"depth: must be >= the model's lattice_depth ({cfg.lattice_depth}), got {depth}")
        extent = cfg.position_z_extent or cfg.lattice_depth - 1
        deeper = FlowProcessor.from_config(cfg.replace(lattice_depth=depth, position_z_extent=extent), self.compiled,
                                            self.activation_checkpointing)
        state = self.state_dict()
        if deeper.flow_step.gates is not None:  # one gate per step after the first: the last one goes on
            trained = state.pop("flow_step.gates", deeper.flow_step.gates.detach()[:0])
            last = trained[-1:] if trained.numel() else trained.new_zeros(1)
            state["flow_step.gates"] = torch.cat([trained, last.expand(deeper.flow_step.gates.numel() - trained.numel())])
        deeper.load_state_dict(state)
        deeper.active_flow_budget = min(self.active_flow_budget, deeper.config.max_active_flows)
        return deeper.to(next(self.parameters()).device).train(self.training)

    def step(self, state: FlowState, batch_size: int, next_id: int = 0, also_read: Tensor | None = None,
             decisions: StepDecisions | None = None, step_index: int = 0) -> StepResult:
        """Run one lattice step of all active flows, with one host sync.

        :meth:`FlowStep.decide`, the sync that reads the counts, then :meth:`FlowStep.compact` and
        :meth:`OutputFace.deposit`: each one compiled graph with ``compile: true``.

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
                of ``residual_steps`` (:meth:`FlowStep.gate`).
        """
        cfg, recording = self.config, self._recording
        replay = decisions is not None and decisions.counts is not None  # a recompute (checkpointing)
        if decisions is not None and not replay:
            decisions.eager = recording is not None
        # a diagnostics forward hooks tensors inside the step's parts: eager, as is its recompute
        eager = recording is not None or (decisions is not None and decisions.eager)
        if recording is not None:
            recording.begin_step(state.num_active, state.valid)
        gate, spawn_allowed = self.flow_step.gate(step_index)
        d = self._graph("decide", eager)(self.flow_step, state, batch_size, self._budget_tensor(state.energy.device),
                                         gate, spawn_allowed, recording is not None)
        if recording is not None:  # diagnostics: gradient hooks on this step's carrier input and heads
            recording.watch(d.carrier_input, d.heads)
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
        elif n.alive == 0 and not n.spawns:  # every flow ended (a one-step lattice, the last step)
            next_state = moved.without_rows()
        else:
            n_next = n.alive + n.spawns
            next_id_t = torch.full((), next_id, dtype=torch.long, device=d.energy.device)
            next_state = self._graph("compact", eager)(self.flow_step, moved, d.spawn_score, d.child_dxy, died,
                                                       arrived, spawns, next_id_t, bucket_rows(n_next)
                                                       if self._static_shapes else n_next, batch_size, gate)
            next_state.num_valid = n_next if next_state.valid is not None else None
        deposit = self._graph("deposit", eager)
        deposits = collected = phantoms = phantom_collected = None
        if n.arrived:
            deposits, collected = deposit(self.output_face, moved, d.top, d.energy, arrived, batch_size)
        if cfg.survival_gradient and n_died and torch.is_grad_enabled():
            phantoms, phantom_collected = deposit(self.output_face, moved, d.top, survival_phantom_energy(
                d.energy_logit, cfg.energy_threshold), died, batch_size)
        _log_step(state, d.energy, n, n_died)
        result = StepResult(
            next_state=next_state, deposits=deposits, collected=collected,
            occupied_cell_id=d.occupied_cell_id[:n.occupied], num_spawned=n.spawns, num_died=n_died,
            num_arrived=n.arrived, books=d.books, neighbourhood_flows=d.neighbourhood_flows, spawns=spawns,
            flow_id=state.flow_id, batch_size=batch_size, phantoms=phantoms, phantom_collected=phantom_collected,
            counts=n,
        )
        if recording is not None:  # the face this step's arrivals collected
            recording.step_output(self.output_face.step_face(result))
        return result

    # ---- how a step is run -----------------------------------------------------------------------
    def _run_step(self, state: FlowState, batch_size: int, next_id: int, also_read: Tensor | None,
                  step_index: int = 0) -> StepResult:
        """:meth:`step`, recomputed in backward when ``activation_checkpointing`` is on.

        With checkpointing, autograd keeps only what a step needs to be run again (its input
        state: the flows' hidden states, positions and energies) and reruns the step in backward.
        The rerun replays what the forward decided (:class:`StepDecisions`: the counts it read and
        each flow's fate, one byte per flow), so it differentiates exactly the flows the forward
        kept, even where a nondeterministic kernel (a GPU's atomic scatter-add) would put a flow
        on the other side of a threshold the second time, and it costs no second sync."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            decisions = StepDecisions()
            return torch.utils.checkpoint.checkpoint(self.step, state, batch_size, next_id, also_read, decisions,
                                                     step_index, use_reentrant=False)
        return self.step(state, batch_size, next_id, also_read, step_index=step_index)

    def _graph(self, name: str, eager: bool = False) -> Callable[..., Any]:
        """The step's part ``name`` (:data:`STEP_GRAPHS`) as an unbound function: eager (no
        ``compile``, or ``eager``), or its compiled graph."""
        if self._compiled is None or eager:
            return STEP_GRAPHS[name]
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

    def _begin_forward(self, x: Tensor, mask: Tensor | None) -> int:
        """Check the input and open this forward's diagnostics record (when asked); returns B."""
        self._check_input(x, mask)
        self.last_diagnostics = None  # the last forward's record: none unless it records one
        # active for this forward only: a checkpointed step recomputed in backward records nothing
        self._recording = ForwardDiagnostics(batch_size=x.size(0)) if self.record_diagnostics else None
        return x.size(0)

    def _finish_recording(self, landings: Landings) -> None:
        """A diagnostics forward's last record: where the flows landed."""
        if self._recording is not None:
            landed = landings.landed()
            self._recording.finish(self.output_face, landed.batch, landed.xy, landed.energy)
            self.last_diagnostics = self._recording

    # ---- checks ----------------------------------------------------------------------------------
    def _check_input(self, x: Tensor, mask: Tensor | None) -> None:
        cfg = self.config
        if not isinstance(x, Tensor):
            raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        expected = (f"[batch, tokens <= {cfg.initial_flows_per_sample}, {cfg.input_dim}] (input_sequence)"
                    if cfg.input_sequence else f"[batch, {cfg.input_dim}]")
        if x.dim() != (3 if cfg.input_sequence else 2):
            raise ValueError(f"x: expected shape {expected}, got {tuple(x.shape)}")
        if x.size(0) == 0:
            raise ValueError("x: empty batch (batch size 0)")
        if x.size(-1) != cfg.input_dim:
            raise ValueError(f"x: embedding width {x.size(-1)} does not match config.input_dim {cfg.input_dim}")
        if cfg.input_sequence:
            _check_tokens(x, mask, cfg.initial_flows_per_sample)
        elif mask is not None:
            raise ValueError("mask: only read with input_sequence: true (x is one vector per sample here); drop it")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating point tensor, got {x.dtype}")
        dtype = self.input_face.energy_bias.dtype
        if x.dtype != dtype:
            raise ValueError(f"x: dtype {x.dtype} does not match the model's {dtype}; convert it with x.to({dtype})")

    @staticmethod
    def _raise_nonfinite_rows(x: Tensor) -> None:
        """The finiteness check of ``x``; the forward reads its flag in the first step's sync."""
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"x: non-finite values (NaN or inf) in rows {bad}")

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


def _check_tokens(x: Tensor, mask: Tensor | None, max_tokens: int) -> None:
    """Raise ``ValueError`` on a sequence ``x [B, T, d]`` longer than ``max_tokens``
    (``initial_flows_per_sample``: a token a flow, each on a face cell of its own) or a bad ``mask``."""
    if x.size(1) == 0 or x.size(1) > max_tokens:
        raise ValueError(f"x: {x.size(1)} tokens; input_sequence takes 1 to initial_flows_per_sample = {max_tokens}")
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask: expected a bool tensor of shape {tuple(x.shape[:2])} (True: a token), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    if mask.device != x.device:
        raise ValueError(f"mask: on {mask.device}, x on {x.device}; put both on one device")
    if not bool(mask.any(dim=1).all()):
        empty = (~mask.any(dim=1)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"mask: rows {empty} hold no token; every sample needs at least one")


def _rename_legacy_keys(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: a state dict saved before the split, renamed in place."""
    for old, new in rename_legacy_keys([k[len(prefix):] for k in state_dict if k.startswith(prefix)]).items():
        state_dict[prefix + new] = state_dict.pop(prefix + old)


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
