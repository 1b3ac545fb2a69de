"""EnergyConfig: presets, YAML round trip, and a clear ValueError for every bad value."""

from __future__ import annotations

import pytest
import yaml

from efgraph import EnergyConfig, create_debug_config, create_experiment_config, create_optimized_config


@pytest.mark.parametrize(
    "factory, size, flows, batch",
    [
        (create_debug_config, (20, 20, 10), 100, 8),
        (create_experiment_config, (50, 50, 20), 500, 16),
        (create_optimized_config, (100, 100, 50), 1000, 32),
    ],
)
def test_presets_have_the_design_sizes(factory, size, flows, batch):
    c = factory()
    assert (c.lattice_width, c.lattice_height, c.lattice_depth) == size
    assert (c.max_active_flows, c.batch_size) == (flows, batch)
    assert (c.energy_threshold, c.spawn_threshold, c.max_spawn_per_step) == (0.1, 0.8, 10)
    assert (c.carrier_hidden_dim, c.carrier_num_layers, c.learning_rate) == (1024, 3, 1e-4)
    assert (c.neuron_input_dim, c.neuron_hidden_dim, c.neuron_output_dim) == (32, 64, 16)


def test_yaml_round_trip(tmp_path):
    c = create_debug_config(carrier_type="lstm", energy_threshold=0.2)
    path = tmp_path / "c.yaml"
    c.to_yaml(path)
    assert EnergyConfig.from_yaml(path) == c


def test_yaml_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lattice_width": 10, "lattice_widht": 3}))
    with pytest.raises(ValueError, match="lattice_widht"):
        EnergyConfig.from_yaml(path)


def test_yaml_is_parsed_safely(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lattice_width: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(yaml.constructor.ConstructorError):
        EnergyConfig.from_yaml(path)


def test_overrides_parse_yaml_scalars():
    c = create_debug_config().with_overrides(["lattice_depth=7", "carrier_type=lstm", "spawn_threshold=0.9"])
    assert (c.lattice_depth, c.carrier_type, c.spawn_threshold) == (7, "lstm", 0.9)
    with pytest.raises(ValueError, match="key=value"):
        create_debug_config().with_overrides(["lattice_depth"])


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"lattice_width": -1}, "lattice_width"),
        ({"lattice_height": 0}, "lattice_height"),
        ({"lattice_depth": 1}, "lattice_depth"),
        ({"carrier_hidden_dim": -5}, "carrier_hidden_dim"),
        ({"max_spawn_per_step": -1}, "max_spawn_per_step"),
        ({"energy_threshold": -0.1}, "energy_threshold"),
        ({"spawn_threshold": 1.5}, "spawn_threshold"),
        ({"energy_threshold": 0.5, "spawn_threshold": 0.5}, "spawn_threshold"),
        ({"initial_flows_per_sample": 20, "max_active_flows": 10}, "max_active_flows"),
        ({"initial_flows_per_sample": 401}, "initial_flows_per_sample"),
        ({"carrier_type": "rnn"}, "carrier_type"),
        ({"aggregation": "max"}, "aggregation"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"lattice_width": 2.5}, "lattice_width"),
        ({"lattice_width": True}, "lattice_width"),
        ({"energy_threshold": float("nan")}, "energy_threshold"),
        ({"max_lateral_step": -1.0}, "max_lateral_step"),
        ({"data_path": "pairs.npz"}, "data_path"),  # dataset is synthetic: the file would be ignored
        ({"num_threads": -1}, "num_threads"),
        ({"baseline_models": "mlp,gru"}, "baseline_models"),
        ({"baseline_models": "mlp,mlp"}, "baseline_models"),
        ({"transformer_width": 30}, "transformer_width"),
        ({"transformer_heads": 0}, "transformer_heads"),
        ({"composition_chain": 0}, "composition_chain"),
        ({"composition_hold_out": "tables"}, "composition_hold_out"),
    ],
)
def test_bad_values_raise_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        create_debug_config(**changes)


def test_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 3e-4\n")  # PyYAML alone would read this as a string
    assert EnergyConfig.from_yaml(path).learning_rate == 3e-4
    assert create_debug_config().with_overrides(["learning_rate=1e-3"]).learning_rate == 1e-3
    with pytest.raises(ValueError, match="learning_rate"):
        create_debug_config().with_overrides(["learning_rate=fast"])


def test_int_is_accepted_for_float_fields():
    c = create_debug_config(spawn_threshold=1)
    assert c.spawn_threshold == 1.0 and isinstance(c.spawn_threshold, float)


def test_the_training_loops_fields_are_the_run_configs_with_its_defaults_and_checks():
    from dataclasses import fields

    from efgraph.config import TrainingConfig

    run = {f.name: f.default for f in fields(EnergyConfig)}
    assert issubclass(EnergyConfig, TrainingConfig)
    assert {f.name: f.default for f in fields(TrainingConfig)}.items() <= run.items()
    config = EnergyConfig(batch_size=5, learning_rate=3e-3, seed=4)
    assert config.training == TrainingConfig(batch_size=5, learning_rate=3e-3, seed=4)
    for field_name, bad in (("batch_size", 0), ("grad_clip", 0.0), ("weight_decay_on", "some"), ("precision", "fp8")):
        with pytest.raises(ValueError, match=field_name):
            TrainingConfig(**{field_name: bad})
        with pytest.raises(ValueError, match=field_name):
            EnergyConfig(**{field_name: bad})
