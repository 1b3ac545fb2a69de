"""Channel maps: arrivals traced back to their input-face origin (through spawns), and the
concentration numbers on maps whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import build_processor, force_spawning, tiny_config
from efgraph.core.trace import FlowTrace
from efgraph.training.channels import arrival_origins, channel_map, channel_metrics, channels_figure, concentration


def _trace(starts, arrivals, parent_of, batch_size=2):
    """starts: (flow_id, batch, x, y); arrivals: (flow_id, batch, x, y, energy)."""
    def record(rows, energy=None):
        return {"flow_id": torch.tensor([r[0] for r in rows]), "batch": torch.tensor([r[1] for r in rows]),
                "pos": torch.tensor([[r[2], r[3], 0.0] for r in rows]),
                "energy": torch.tensor(energy if energy is not None else [1.0] * len(rows))}
    return FlowTrace(batch_size=batch_size, initial_flows=len(starts), energy_injected=torch.tensor(1.0),
                     paths=[record(starts), record(arrivals, [r[4] for r in arrivals])], parent_of=parent_of)


def test_a_child_is_traced_to_its_grandparents_input_cell():
    config = tiny_config(lattice_width=6, lattice_height=6)
    trace = _trace(starts=[(0, 0, 0.0, 0.0), (1, 0, 5.0, 5.0)],
                   arrivals=[(7, 0, 5.0, 0.0, 0.5), (1, 0, 0.0, 5.0, 0.25)], parent_of={5: 0, 7: 5})
    a = arrival_origins(trace)
    assert a["origin"].tolist() == [[0.0, 0.0], [5.0, 5.0]]
    m = channel_map(trace, config, grid=2)  # regions: 0 bottom-left, 1 bottom-right, 2 top-left, 3 top-right
    expected = torch.zeros(4, 4)
    expected[0, 1], expected[3, 2] = 0.5, 0.25
    assert torch.equal(m, expected)


def test_concentration_is_one_for_fixed_channels_and_zero_for_an_even_spread():
    assert concentration(torch.eye(4) * 3) == pytest.approx(1.0)
    assert concentration(torch.ones(4, 4)) == pytest.approx(0.0, abs=1e-6)
    half = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]])
    assert concentration(half) == pytest.approx(1 - math.log(2) / math.log(4))


def test_routing_by_content_is_concentrated_within_samples_not_pooled():
    """Each sample sends its one input region to one place, but a different place per sample."""
    config = tiny_config(lattice_width=6, lattice_height=6)
    trace = _trace(starts=[(0, 0, 0.0, 0.0), (1, 1, 0.0, 0.0)],
                   arrivals=[(0, 0, 5.0, 0.0, 1.0), (1, 1, 0.0, 5.0, 1.0)], parent_of={})
    metrics = channel_metrics(trace, config, grid=2)
    assert metrics["channels/sample_concentration"] == pytest.approx(1.0)
    assert metrics["channels/concentration"] == pytest.approx(1 - math.log(2) / math.log(4))


def test_a_real_forward_with_spawning_draws_its_channels(tmp_path):
    config = tiny_config(energy_threshold=0.001, spawn_threshold=0.002)
    proc = build_processor(config)
    force_spawning(proc)
    proc.record_paths = True
    with torch.no_grad():
        proc(torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0)))
    trace = proc.last_trace
    assert trace.total_spawned > 0 and trace.parent_of
    a = arrival_origins(trace)
    assert (a["origin"][:, 0] >= 0).all() and a["origin"].size(0) == trace.total_arrived
    # the map books every arrival's energy
    assert float(channel_map(trace, config).sum()) == pytest.approx(float(a["energy"].sum()), rel=1e-6)
    assert channels_figure(trace, config, tmp_path / "channels.png").stat().st_size > 1000


def test_a_trace_without_paths_is_refused():
    config = tiny_config()
    proc = build_processor(config)
    with torch.no_grad():
        proc(torch.randn(2, config.input_dim))
    with pytest.raises(ValueError, match="record_paths"):
        channel_map(proc.last_trace, config)
