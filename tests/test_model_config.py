"""One model config no part can contradict (issue 23).

The processor, its lattice and its carrier share one frozen :class:`EnergyConfig`: parts built
from configs that differ in any field are refused, naming the fields; a field cannot be assigned;
the runtime switches change through :meth:`FlowProcessor.reconfigure`, on every part at once;
``compile`` is read once, when the model is built.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import build_processor, tiny_config
from efgraph import EnergyLattice, FlowProcessor, SimpleNeuron
from efgraph.core.flow_state import FlowState
from efgraph.training.trainer import EnergyTrainer


# ------------------------------------------------------------------------------------------------
# building from parts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, lattice_value, processor_value", [
    ("initial_flows_per_sample", 4, 8),  # measured: 12 flows injected for a batch of 3, no error
    ("output_gate_init", 0.0, 1.0),
    ("learning_rate", 1e-3, 1e-4),  # not read by the lattice: the rule is one config, every field
])
def test_a_lattice_built_from_a_config_that_differs_in_any_field_is_refused_naming_it(field, lattice_value,
                                                                                        processor_value):
    config = tiny_config(**{field: processor_value})
    lattice = EnergyLattice(config.replace(**{field: lattice_value}))
    with pytest.raises(ValueError, match=rf"lattice: built from another config.*{field} \(lattice "
                                         rf"{lattice_value!r}, processor {processor_value!r}\)"):
        FlowProcessor(lattice, SimpleNeuron(config), config)


def test_every_differing_field_is_named():
    config = tiny_config()
    lattice = EnergyLattice(config.replace(initial_flows_per_sample=2, output_gate_init=0.5))
    with pytest.raises(ValueError) as err:
        FlowProcessor(lattice, SimpleNeuron(config), config)
    assert "initial_flows_per_sample" in str(err.value) and "output_gate_init" in str(err.value)


@pytest.mark.parametrize("field", ["neuron_hidden_dim", "neuron_output_dim", "message_dim"])
def test_a_neuron_built_for_other_widths_is_refused_naming_the_width(field):
    config = tiny_config()
    neuron = SimpleNeuron(config.replace(**{field: getattr(config, field) + 1}))
    named = "neuron_input_dim" if field == "message_dim" else field  # the neuron's input is message + position
    with pytest.raises(ValueError, match=rf"neuron: built for {named}"):
        FlowProcessor(EnergyLattice(config), neuron, config)


def test_parts_from_equal_configs_share_one_object():
    config = tiny_config()
    proc = FlowProcessor(EnergyLattice(config.replace()), SimpleNeuron(config), config)  # an equal copy is fine
    assert proc.config is config and proc.carrier.config is config
    assert proc.lattice.config == config


# ------------------------------------------------------------------------------------------------
# changing a field after construction
# ------------------------------------------------------------------------------------------------
def test_assigning_a_config_field_raises():
    config = tiny_config()
    proc = build_processor(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.initial_flows_per_sample = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        proc.config.activation_checkpointing = True
    assert config.initial_flows_per_sample == 4 and not proc.config.activation_checkpointing


def test_validation_still_makes_an_int_given_for_a_float_field_a_float():
    config = tiny_config(energy_threshold=0, spawn_threshold=1)
    assert type(config.energy_threshold) is float and type(config.spawn_threshold) is float


@pytest.mark.parametrize("part", ["processor", "lattice", "carrier"])
def test_swapping_a_parts_config_is_refused(part):
    proc = build_processor(tiny_config())
    target = {"processor": proc, "lattice": proc.lattice, "carrier": proc.carrier}[part]
    before = target.config
    with pytest.raises(AttributeError, match=r"config: set once.*reconfigure"):
        target.config = before.replace(activation_checkpointing=True)
    assert target.config is before


def test_reconfigure_sets_the_field_on_every_part_and_the_forward_follows(monkeypatch):
    proc = build_processor(tiny_config())
    x = torch.randn(3, proc.config.input_dim, generator=torch.Generator().manual_seed(0))
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *args, **kwargs: calls.append(1) or real_checkpoint(*args, **kwargs))
    y_plain = proc(x)
    assert not calls
    proc.reconfigure(activation_checkpointing=True)
    assert proc.config.activation_checkpointing
    assert proc.lattice.config is proc.config and proc.carrier.config is proc.config
    y_checkpointed = proc(x)
    assert len(calls) == proc.last_trace.num_steps  # every lattice step recomputed in backward
    torch.testing.assert_close(y_checkpointed, y_plain)


@pytest.mark.parametrize("change", [{"compile": True}, {"energy_threshold": 0.2}, {"lattice_width": 7},
                                    {"activation_checkpointing": True, "initial_flows_per_sample": 2}])
def test_reconfigure_refuses_every_field_but_the_runtime_switches_and_changes_nothing(change):
    proc = build_processor(tiny_config())
    before = proc.config
    refused = sorted(k for k in change if k != "activation_checkpointing")
    with pytest.raises(ValueError, match=rf"reconfigure: {', '.join(refused)} cannot change on a built model"):
        proc.reconfigure(**change)
    assert proc.config is before and proc.lattice.config is before and proc.carrier.config is before


def test_reconfigure_refuses_a_bad_value_naming_the_field():
    proc = build_processor(tiny_config())
    with pytest.raises(ValueError, match="activation_checkpointing: expected bool"):
        proc.reconfigure(activation_checkpointing="yes")


def test_the_trainer_turns_checkpointing_on_for_every_part_and_leaves_the_callers_config_as_given():
    config = tiny_config()
    proc = build_processor(config)
    # memory_check off: the trainer applies the flag it is given, through the processor
    trainer_config = config.replace(activation_checkpointing=True, memory_check=False)
    trainer = EnergyTrainer(proc, trainer_config, progress=False)
    assert trainer.processor is proc
    for part in (proc, proc.lattice, proc.carrier):
        assert part.config.activation_checkpointing
    assert not config.activation_checkpointing


# ------------------------------------------------------------------------------------------------
# compile: read once
# ------------------------------------------------------------------------------------------------
def test_compile_is_read_once_when_the_model_is_built(monkeypatch):
    """A config saying ``compile: true`` put on an eager model behind the guard (what swapping
    ``processor.config`` did) changes nothing: no graphs, no padding; the model was built eager."""
    config = tiny_config()
    proc = build_processor(config)
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = proc(x)
    swapped = config.replace(compile=True)
    for part in (proc, proc.lattice, proc.carrier):
        vars(part)["_config"] = swapped
    padded = []
    real_padded = FlowState.padded
    monkeypatch.setattr(FlowState, "padded", lambda self, *a, **k: padded.append(1) or real_padded(self, *a, **k))
    with torch.no_grad():
        again = proc(x)
        state = proc.inject(x)
        result = proc.step(state, x.size(0))
    assert not padded, "the forward padded the flows: it read compile from the config, not once at construction"
    assert result.next_state.valid is None  # compact made no padding rows either
    # one row per continuing flow and child, none of padding
    assert result.next_state.num_flows == state.num_flows - result.num_died - result.num_arrived + result.num_spawned
    torch.testing.assert_close(again, eager)
