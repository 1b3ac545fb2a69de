"""Will a training step fit? An up-front, worst-case memory estimate and the device's limit.

The engine bounds a forward: at most ``max_active_flows`` flows per sample are alive in any step
and a forward takes at most ``lattice_depth - 1`` steps. So one training step keeps at most
``batch_size * max_active_flows * (lattice_depth - 1)`` flow-steps of activations for backward,
plus the parameters, their gradients and AdamW's two moments. That worst case is what a run can
reach once training drives flows to spawn up to the budget and to move one cell per step; if it
does not fit, the run would die of out-of-memory hours in, so it is refused before it starts.

The per-flow-step size is ``4 bytes * (k * layers * hidden + c)`` with ``k`` and ``c``
calibrated on this engine's saved tensors (``tests/test_memory.py`` checks that the estimate
bounds the measured activations from above, within 2x).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from efgraph.config import EnergyConfig

# floats saved for backward per flow-step, per unit of carrier state (layers x hidden), and the
# carrier-independent rest (neuron, messages, positions, heads): calibrated, see module docstring
# (measured: GRU 8.5 x state + 50..250, LSTM 31 x state + 220..720 floats; the constants below
# bound those from above)
FLOATS_PER_STATE_UNIT = {"gru": 9.0, "lstm": 33.0}
FLOATS_PER_FLOW_STEP = 400.0
OPTIMIZER_COPIES = 4  # parameter, gradient, AdamW exp_avg and exp_avg_sq


@dataclass(frozen=True)
class MemoryEstimate:
    """Worst-case bytes of one training step."""

    parameter_bytes: int
    optimizer_bytes: int  # gradients and AdamW moments
    activation_bytes: int
    flow_steps: int

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.optimizer_bytes + self.activation_bytes


@contextmanager
def saved_activation_bytes(params: Iterable[torch.Tensor] = ()) -> Iterator[list[int]]:
    """Count the bytes of the distinct tensors autograd saves for backward inside the block.

    Parameters are excluded (they exist anyway and are saved again at every step; counting them
    would inflate the activations). Yields a one-element list holding the running total.
    """
    total = [0]
    seen = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def activation_bytes_per_flow_step(config: EnergyConfig) -> float:
    state = config.carrier_num_layers * config.carrier_hidden_dim
    return 4.0 * (FLOATS_PER_STATE_UNIT[config.carrier_type] * state + FLOATS_PER_FLOW_STEP)


def estimate_training_memory(config: EnergyConfig, num_parameters: int, batch_size: int | None = None) -> MemoryEstimate:
    """Worst-case memory of one training step of ``config`` on one process (``batch_size``: the
    rows this process runs, by default the config's)."""
    batch = config.batch_size if batch_size is None else batch_size
    flow_steps = batch * config.max_active_flows * (config.lattice_depth - 1)
    return MemoryEstimate(
        parameter_bytes=4 * num_parameters,
        optimizer_bytes=4 * (OPTIMIZER_COPIES - 1) * num_parameters,
        activation_bytes=int(flow_steps * activation_bytes_per_flow_step(config)),
        flow_steps=flow_steps,
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
    """Raise ``ValueError`` with the estimate and the limit when the worst case does not fit."""
    estimate = estimate_training_memory(config, num_parameters, batch_size)
    limit = available_memory_bytes(device) if limit_bytes is None else limit_bytes
    if estimate.total_bytes > limit:
        gib = 2**30
        raise ValueError(
            f"memory_check: a training step may need up to {estimate.total_bytes / gib:.1f} GiB but {device} has "
            f"{limit / gib:.1f} GiB available: batch {batch_size or config.batch_size} x max_active_flows "
            f"{config.max_active_flows} x (lattice_depth - 1) {config.lattice_depth - 1} = {estimate.flow_steps:,} "
            f"flow-steps of {activation_bytes_per_flow_step(config) / 1024:.1f} KiB (carrier "
            f"{config.carrier_num_layers} x {config.carrier_hidden_dim}) plus {num_parameters:,} parameters with "
            f"gradients and AdamW state. Lower batch_size, max_active_flows, lattice_depth or carrier_hidden_dim, "
            f"or set memory_check: false to run anyway."
        )
    return estimate
