"""The up-front memory check: its estimate bounds the real activations, and it refuses clearly."""

from __future__ import annotations

import pytest
import torch

from conftest import build_processor, tiny_config
from efgraph import EnergyTrainer, FlowProcessor, create_optimized_config
from efgraph.utils import memory
from efgraph.utils.memory import (activation_bytes_per_flow_step, check_training_fits, estimate_training_memory,
                                  saved_activation_bytes)


def _measured_bytes_per_flow_step(config, batch=4) -> float:
    """Distinct tensors saved for backward (parameters excluded) per flow-step, with every sample
    at its flow budget for all D-1 steps: the worst case the estimate must cover."""
    proc = build_processor(config)
    with torch.no_grad():
        proc.carrier.displacement_head.weight.zero_()
        proc.carrier.displacement_head.bias[2] = -30.0  # one cell per step: D-1 steps
        proc.carrier.energy_head.weight.zero_()
        proc.carrier.energy_head.bias.fill_(30.0)  # nobody dies
    with saved_activation_bytes(proc.parameters()) as total:
        proc(torch.randn(batch, config.input_dim))
    flow_steps = batch * config.max_active_flows * (config.lattice_depth - 1)
    assert sum(proc.last_trace.active) == flow_steps
    return total[0] / flow_steps


@pytest.mark.parametrize("carrier_type", ["gru", "lstm"])
@pytest.mark.parametrize("hidden, layers", [(32, 1), (128, 2)])
def test_estimate_bounds_the_measured_activations_within_2x(carrier_type, hidden, layers):
    config = tiny_config(carrier_type=carrier_type, carrier_hidden_dim=hidden, carrier_num_layers=layers,
                         initial_flows_per_sample=6, max_active_flows=6, lattice_depth=6)
    measured = _measured_bytes_per_flow_step(config)
    estimated = activation_bytes_per_flow_step(config)
    assert measured <= estimated <= 2 * measured


def test_refusal_names_the_estimate_the_limit_and_the_knobs():
    config = create_optimized_config()
    est = estimate_training_memory(config, num_parameters=30_000_000)
    assert est.flow_steps == 32 * 1000 * 49
    with pytest.raises(ValueError, match=r"memory_check: .* GiB but cpu has 80\.0 GiB available.*max_active_flows"):
        check_training_fits(config, 30_000_000, torch.device("cpu"), limit_bytes=80 * 2**30)
    # a config within the limit passes and returns its estimate
    assert check_training_fits(tiny_config(), 1000, torch.device("cpu"), limit_bytes=2**30).total_bytes < 2**30


def test_trainer_refuses_before_training_and_memory_check_false_opts_out(monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 10 * 2**20)  # a 10 MiB device
    config = tiny_config(max_active_flows=12, batch_size=64)
    with pytest.raises(ValueError, match="memory_check"):
        EnergyTrainer(FlowProcessor.from_config(config), config, progress=False)
    relaxed = config.replace(memory_check=False)
    EnergyTrainer(FlowProcessor.from_config(relaxed), relaxed, progress=False)  # no error
