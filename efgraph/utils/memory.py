"""Will a training step fit? A worst-case memory estimate, the plan that makes it fit, and the limit.

Worst case. The engine bounds a forward: a forward takes at most ``lattice_depth - 1`` steps, and a
sample starts with ``initial_flows_per_sample`` flows and gains in a step at most one child per flow
and ``max_spawn_per_step`` in all, never past ``max_active_flows`` (:func:`flows_per_step_bound`:
``n -> min(n + min(n, max_spawn_per_step), max_active_flows)``). So the forward of ``m`` rows runs
at most ``m * sum(flows_per_step_bound)`` flow-steps, and at most ``m * max(flows_per_step_bound)``
flows in its largest step. That worst case is what a run can reach once training drives flows to
spawn whenever they may, none to die, and all to move one cell per step (the tests pin such a
forward and it reaches the bound at every step); if it does not fit, the run would die of
out-of-memory hours in, so it is planned for (or refused) up front. (``max_active_flows`` at every
step would be no worst case but an unreachable one when spawning cannot fill the budget in time:
the optimized preset's 32 flows + 10 a step reach 512 of their 1000 in 49 steps, 3.7x fewer
flow-steps.)

What a training step holds (bytes; ``S = carrier_num_layers * carrier_hidden_dim``, the state
of a flow is ``S`` floats, ``2 S`` for an LSTM with its cell state):

* parameters, their gradients and AdamW's two moments (4 copies), plus 2 more parameter-sized
  gradient buffers in flight during backward (autograd's sum of a parameter's gradients over
  the lattice steps, and the step's fresh one);
* activations, without checkpointing: every flow-step's saved tensors for backward,
  ``4 * (k * S + c)`` bytes (``k``, ``c`` calibrated on this engine, see below), for all
  flow-steps of the forward, plus the injected flows (their initial state), the deposits on the
  output face (one per flow that ends: it arrives, or dies and sends the survival gradient) and
  the readout; plus the backward working set of the largest step (its gradients: 2 states per flow);
* activations, with activation checkpointing (``FlowProcessor`` reruns each lattice step in
  backward): per flow-step only what the checkpoint keeps, the step's input state (hidden state,
  positions, energy, batch and id: ``S + 8`` floats, ``2 S + 8`` for an LSTM, and one byte of its fate for the replay), plus the same
  injection, deposits and readout (they outlive the steps), plus the peak of recomputing ONE step
  in backward: the largest step's full activations (``m * max(flows_per_step_bound)`` flows at
  the full per-flow-step size) and their gradients.

The plan. :func:`estimate_training_memory` picks the cheapest plan that fits ``limit_bytes``: the
whole batch without checkpointing; else with activation checkpointing (~1/3 more compute); else
also micro-batches of the largest size that fits, whose gradients accumulate into the whole
batch's (``EnergyTrainer`` runs them; one optimizer step per batch). Explicit settings are
honoured: ``activation_checkpointing: true`` is always on, ``micro_batch_size > 0`` is that size.
When even checkpointed micro-batches of one row do not fit it raises ``ValueError`` naming the
fields to lower. For ``create_optimized_config()`` (100x100x50, 1000 flows per sample, batch 32,
GRU 1024 x 3) the whole batch needs 44.7 GiB of activations at most (426,496 flow-steps); the plan
is the whole batch without checkpointing, 45.5 GiB in all (``describe()`` lists the parts); with
checkpointing it would be 7.5 GiB.

Calibration (``tests/test_memory.py``): the sizes above are fitted to, and bound from above, the
tensors this engine really holds, measured on the CPU with :func:`saved_activation_bytes` (what
autograd saves) and :func:`peak_tensor_bytes` (the peak of live tensors over forward + backward,
which also sees what a checkpoint keeps and the recompute in backward): measured GRU
``8.0 S + 320`` floats saved per flow-step (LSTM ``31 S``), a checkpointed flow-step keeps ``S``
(LSTM ``2 S``), an injected flow ``S + 540`` and a deposit ``~8.5 * face_channels + 4 *
readout_hidden_dim``. The test pins the worst case at hidden 1024 x 3 layers and checks that the
estimate is >= the measurement and within 1.5x of it, with and without checkpointing (measured:
1.13x the peak and 1.19x the saved tensors without, 1.15x the peak with checkpointing). It also
measures a scaled-down optimized preset (20x20x10, radius 1, 4 flows + 1 a step of 125 per sample,
GRU 128 x 3, batch 2) at its worst case, flows spawning at every step: the estimate is 1.28x the
measured peak without checkpointing, 1.28x with it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from efgraph.config import EnergyConfig

GIB = 2**30
# the limit estimate_training_memory plans for when none is given: one 80 GB GPU
DEFAULT_LIMIT_BYTES = 80 * GIB
# floats saved for backward per flow-step, per unit of carrier state (layers x hidden), and the
# carrier-independent rest (neuron, messages, positions, heads): calibrated, see module docstring
# (measured: GRU 8.0 x state + ~320, LSTM 31 x state; the constants below bound those from above)
FLOATS_PER_STATE_UNIT = {"gru": 9.0, "lstm": 33.0}
FLOATS_PER_FLOW_STEP = 400.0
# what a checkpointed step keeps beyond the state: position (3), energy (1), batch and id (int64: 2 + 2)
KEPT_FLOATS_PER_FLOW_STEP = 8.0
# an injected flow beyond its initial state (tanh input, position encodings, indices; measured ~540)
INJECTION_FLOATS = 640.0
# the backward working set of a step, per flow: gradients of its input and output states
GRADIENT_STATES_PER_FLOW = 2.0
OPTIMIZER_COPIES = 4  # parameter, gradient, AdamW exp_avg and exp_avg_sq
GRADIENT_BUFFER_COPIES = 2  # autograd's running sum of a parameter's gradient and the step's fresh one


@dataclass(frozen=True)
class MemoryEstimate:
    """Worst-case bytes of one training step under a plan (checkpointing, micro-batch size).

    ``activation_bytes = kept_activation_bytes + backward_peak_bytes``: what the forward of one
    micro-batch keeps for backward, and the largest step's working set in backward (with
    checkpointing: its recomputed activations and their gradients; without: its gradients).
    """

    parameter_bytes: int
    optimizer_bytes: int  # gradients and AdamW moments
    gradient_buffer_bytes: int  # parameter gradients in flight during backward
    kept_activation_bytes: int
    backward_peak_bytes: int
    flow_steps: int  # of one micro-batch's forward
    activation_checkpointing: bool
    micro_batch_size: int
    batch_size: int
    limit_bytes: int

    @property
    def activation_bytes(self) -> int:
        return self.kept_activation_bytes + self.backward_peak_bytes

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.optimizer_bytes + self.gradient_buffer_bytes + self.activation_bytes

    @property
    def num_micro_batches(self) -> int:
        return -(-self.batch_size // self.micro_batch_size)

    def components_gib(self) -> dict[str, float]:
        """Each component and the total in GiB (for logs and the README)."""
        parts = {"parameters": self.parameter_bytes, "gradients_and_adamw": self.optimizer_bytes,
                 "gradient_buffers": self.gradient_buffer_bytes, "activations_kept": self.kept_activation_bytes,
                 "backward_peak": self.backward_peak_bytes, "total": self.total_bytes}
        return {k: v / GIB for k, v in parts.items()}

    def describe(self) -> str:
        """One line: the plan and where its bytes go."""
        plan = (f"activation checkpointing {'on' if self.activation_checkpointing else 'off'}, "
                f"micro-batches of {self.micro_batch_size} of {self.batch_size} rows "
                f"({self.num_micro_batches} per optimizer step)")
        parts = ", ".join(f"{k.replace('_', ' ')} {human_bytes(v * GIB)}"
                          for k, v in self.components_gib().items() if k != "total")
        return (f"memory plan: {plan}; up to {human_bytes(self.total_bytes)} of {human_bytes(self.limit_bytes)} "
                f"({parts}; {self.flow_steps:,} flow-steps per forward)")


def human_bytes(n: float) -> str:
    """``n`` bytes as GiB, MiB or KiB with two decimals."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.2f} KiB"


@contextmanager
def saved_activation_bytes(params: Iterable[torch.Tensor] = ()) -> Iterator[list[int]]:
    """Count the bytes of the distinct tensors autograd saves for backward inside the block.

    Parameters are excluded (they exist anyway and are saved again at every step; counting them
    would inflate the activations). Yields a one-element list holding the running total. Inside a
    checkpointed region the checkpoint's own hooks take over: what it keeps (the region's inputs)
    and recomputes is not counted here; :func:`peak_tensor_bytes` sees it.
    """
    total = [0]
    seen = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        # detached: a saved *output* returned as itself would hold its own grad_fn, a reference
        # cycle through C++ that Python's collector cannot free (the graph would leak)
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


class TensorMeter(TorchDispatchMode):
    """Live and peak bytes of the tensors that operators create while the meter is on.

    Each distinct storage an operator returns is counted once, from its creation until it is
    freed (a weak reference on the storage; PyTorch keeps one Python object per storage), and the
    peak is taken after every operator: on the CPU, where there are no allocator statistics, the
    analogue of ``torch.cuda.max_memory_allocated`` for the tensors of a block. Storages of
    ``exclude`` (parameters, buffers, inputs, existing gradients) are not counted, nor are
    tensors shaped like one of ``exclude_shapes`` (pass the parameters' shapes to leave out the
    parameter gradients and autograd's sums of them, which the estimate books separately).
    Temporary buffers inside one operator's kernel are not seen.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), exclude_shapes: Iterable[tuple[int, ...]] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._shapes = {tuple(s) for s in exclude_shapes}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self._seen or key in self._exclude:
                continue
            nbytes = 0 if tuple(t.shape) in self._shapes else storage.nbytes()
            self._seen.add(key)
            self.live += nbytes
            weakref.finalize(storage, self._freed, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


@contextmanager
def peak_tensor_bytes(model: torch.nn.Module, inputs: Iterable[torch.Tensor] = ()) -> Iterator[TensorMeter]:
    """A :class:`TensorMeter` over the block that leaves out ``model``'s parameters, buffers and
    gradients (also those created inside the block) and ``inputs``: run forward and backward in
    it and read ``.peak``, the activation memory of a training step."""
    params = list(model.parameters())
    existing = [*params, *model.buffers(), *(p.grad for p in params if p.grad is not None), *inputs]
    with TensorMeter(existing, [p.shape for p in params]) as meter:
        yield meter


def state_floats(config: EnergyConfig) -> int:
    """Floats of one flow's carrier state: layers x hidden, twice for an LSTM (h and c)."""
    return config.carrier_num_layers * config.carrier_hidden_dim * (2 if config.carrier_type == "lstm" else 1)


def activation_bytes_per_flow_step(config: EnergyConfig) -> float:
    """Bytes a flow-step saves for backward without checkpointing (the full size)."""
    state = config.carrier_num_layers * config.carrier_hidden_dim
    return 4.0 * (FLOATS_PER_STATE_UNIT[config.carrier_type] * state + FLOATS_PER_FLOW_STEP)


def flows_per_step_bound(config: EnergyConfig) -> list[int]:
    """The most flows one sample can have at the start of each of its ``lattice_depth - 1`` steps.

    A sample starts with ``initial_flows_per_sample`` flows; in a step each flow spawns at most one
    child, the sample at most ``max_spawn_per_step``, never past ``max_active_flows``. The bound is
    reached when no flow dies, every flow moves one cell in z per step and spawns whenever it may."""
    flows = [config.initial_flows_per_sample]
    for _ in range(config.lattice_depth - 2):
        n = flows[-1]
        flows.append(min(n + min(n, config.max_spawn_per_step), config.max_active_flows))
    return flows


def kept_bytes_per_flow_step(config: EnergyConfig) -> float:
    """Bytes a checkpointed flow-step keeps: its input state, position, energy, batch and id."""
    return 4.0 * (state_floats(config) + KEPT_FLOATS_PER_FLOW_STEP)


def plan_memory(config: EnergyConfig, num_parameters: int, batch_size: int, micro_batch_size: int,
                activation_checkpointing: bool, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> MemoryEstimate:
    """The worst-case memory of one given plan (no choice, no check): see the module docstring."""
    cfg, m = config, micro_batch_size
    if not 1 <= m <= batch_size:
        raise ValueError(f"micro_batch_size: must be in [1, {batch_size}], got {m}")
    per_step = flows_per_step_bound(cfg)
    flow_steps = m * sum(per_step)
    step_flows = m * max(per_step)  # the largest step
    injected = m * cfg.initial_flows_per_sample
    # every flow ends once (arrives, or dies and deposits the survival gradient); flows are the
    # injected ones and the children, spawned in steps 1..D-2 (a child needs another step)
    flows = m * (cfg.initial_flows_per_sample + max(cfg.lattice_depth - 2, 0) * cfg.max_spawn_per_step)
    deposits = min(flow_steps, flows)
    layer_state = cfg.carrier_num_layers * cfg.carrier_hidden_dim
    if cfg.readout == "face":  # per arrival: the interpolated keys, energy * value and their outer product
        deposit_floats = 2 * cfg.face_channels + 6 * cfg.readout_rank + 2 * cfg.readout_rank * cfg.face_channels + 64
        face_floats = cfg.readout_rank * cfg.face_channels
    else:  # per arrival: 4 corners of values, position codes and the per-cell MLP
        deposit_floats = 9 * cfg.face_channels + 4 * cfg.readout_hidden_dim + 64
        face_floats = cfg.readout_hidden_dim
    if cfg.injection == "face":  # per sample: the content field's coefficients [r, c]
        face_floats += cfg.injection_rank * cfg.face_channels
    sample_floats = cfg.input_dim + 2 * cfg.output_dim + face_floats
    injection_floats = INJECTION_FLOATS + (2 * (cfg.injection_rank + cfg.face_channels)
                                           if cfg.injection == "face" else 0)
    outside_steps = 4 * (injected * (layer_state + injection_floats) + deposits * deposit_floats + m * sample_floats)
    full_step = step_flows * activation_bytes_per_flow_step(cfg)
    gradients = 4 * step_flows * GRADIENT_STATES_PER_FLOW * state_floats(cfg)
    if activation_checkpointing:
        kept = flow_steps * kept_bytes_per_flow_step(cfg) + outside_steps
        backward = full_step + gradients
    else:
        kept = flow_steps * activation_bytes_per_flow_step(cfg) + outside_steps
        backward = gradients
    return MemoryEstimate(
        parameter_bytes=4 * num_parameters,
        optimizer_bytes=4 * (OPTIMIZER_COPIES - 1) * num_parameters,
        gradient_buffer_bytes=4 * GRADIENT_BUFFER_COPIES * num_parameters,
        kept_activation_bytes=int(kept),
        backward_peak_bytes=int(backward),
        flow_steps=flow_steps,
        activation_checkpointing=activation_checkpointing,
        micro_batch_size=m,
        batch_size=batch_size,
        limit_bytes=limit_bytes,
    )


def estimate_training_memory(config: EnergyConfig, num_parameters: int, batch_size: int | None = None,
                             limit_bytes: int | None = None, *, where: str = "limit_bytes") -> MemoryEstimate:
    """The plan a training step of ``config`` will use on one process, and its worst-case memory.

    Args:
        config: the model and training config; ``activation_checkpointing: true`` and
            ``micro_batch_size > 0`` are honoured, otherwise chosen (see the module docstring).
        num_parameters: the model's parameter count.
        batch_size: the rows this process runs per optimizer step (default: the config's).
        limit_bytes: the memory the plan must fit (default 80 GiB, one 80 GB GPU).
        where: what the limit is, for the error message (e.g. the device).

    Returns:
        The cheapest plan that fits: the whole batch without checkpointing, else with
        checkpointing, else checkpointing and the largest micro-batch that fits.

    Raises:
        ValueError: not even checkpointed micro-batches of one row (or of the explicit
            ``micro_batch_size``) fit; it names the fields to lower.
    """
    batch = config.batch_size if batch_size is None else batch_size
    if batch < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch}")
    limit = DEFAULT_LIMIT_BYTES if limit_bytes is None else int(limit_bytes)
    explicit_micro = config.micro_batch_size > 0
    micro = min(config.micro_batch_size, batch) if explicit_micro else batch
    candidates = [] if config.activation_checkpointing else [(micro, False)]
    candidates.append((micro, True))
    if not explicit_micro:
        candidates += [(m, True) for m in range(batch - 1, 0, -1)]
    for m, ckpt in candidates:
        estimate = plan_memory(config, num_parameters, batch, m, ckpt, limit)
        if estimate.total_bytes <= limit:
            if m < batch and not explicit_micro:  # as many micro-batches, of even sizes (fewer bytes)
                m = -(-batch // -(-batch // m))
                estimate = plan_memory(config, num_parameters, batch, m, ckpt, limit)
            return estimate
    smallest = estimate  # the last candidate: checkpointed, the smallest micro-batch allowed
    fields = "micro_batch_size, " if explicit_micro else ""
    raise ValueError(
        f"memory_check: a training step needs up to {human_bytes(smallest.total_bytes)} even with activation "
        f"checkpointing and micro-batches of {smallest.micro_batch_size} row(s), but {human_bytes(limit)} "
        f"are available ({where}): up to {smallest.flow_steps // smallest.micro_batch_size:,} flow-steps per row "
        f"(initial_flows_per_sample {config.initial_flows_per_sample}, growing by max_spawn_per_step "
        f"{config.max_spawn_per_step} a step up to max_active_flows {config.max_active_flows}, over "
        f"lattice_depth - 1 = {config.lattice_depth - 1} steps) of {kept_bytes_per_flow_step(config) / 1024:.1f} KiB kept (carrier {config.carrier_num_layers} x "
        f"{config.carrier_hidden_dim}), the largest step recomputed with its gradients {human_bytes(smallest.backward_peak_bytes)}, plus "
        f"{num_parameters:,} parameters with gradients and AdamW state. Lower {fields}max_active_flows, "
        f"lattice_depth, carrier_hidden_dim, carrier_num_layers or max_spawn_per_step, or set memory_check: false "
        f"to run anyway."
    )


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise RuntimeError("memory_check: cannot read the host's available memory (no /proc/meminfo); "
                       "set memory_check: false to skip the check")


def check_training_fits(config: EnergyConfig, num_parameters: int, device: torch.device,
                        batch_size: int | None = None, limit_bytes: int | None = None) -> MemoryEstimate:
    """The plan (:func:`estimate_training_memory`) for ``device``'s available memory (or
    ``limit_bytes``); raises ``ValueError`` with the estimate and the limit when none fits."""
    limit = available_memory_bytes(device) if limit_bytes is None else limit_bytes
    where = f"{device}, free memory" if limit_bytes is None else f"{device}, limit_bytes"
    return estimate_training_memory(config, num_parameters, batch_size, limit, where=where)
