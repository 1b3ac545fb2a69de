"""One model config no part can contradict, and configs saved by older versions (issues 23, 35).

The processor and its parts share one frozen :class:`ModelConfig` (the model's fields of a run's
:class:`EnergyConfig`, nothing of its training or data): a lattice built from a config that differs
on what it reads is refused, naming the fields; a field cannot be assigned, nor a part's config
swapped; how the model is run (``compile``, read once when it is built; ``activation_checkpointing``,
read on every forward) is the processor's, not a config field.

A config saved by an older efgraph is read with the values that reproduce what that version
computed (``FIELD_DEFAULTS_BEFORE``), tested on a real run written at commit e5722ce
(tests/fixtures/run-e5722ce): it loads, computes that version's outputs and resumes as it did;
where it cannot be read as its run, one line says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from conftest import ROOT, build_processor, tiny_config
from efgraph import EnergyConfig, EnergyLattice, FlowProcessor, ModelConfig, SimpleNeuron, load_model
from efgraph.config import FIELD_DEFAULTS_BEFORE, SameAs, Unreproducible
from efgraph.core.flow_state import FlowState
from efgraph.training.checkpoint import load_checkpoint
from efgraph.training.trainer import EnergyTrainer


# ------------------------------------------------------------------------------------------------
# building from parts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, lattice_value, processor_value", [
    ("lattice_width", 6, 5),  # a 6-wide lattice under a 5-wide model would index the wrong cells
    ("lattice_depth", 5, 4),
    ("position_frequencies", 3, 2),
])
def test_a_lattice_whose_geometry_differs_is_refused_naming_the_field(field, lattice_value, processor_value):
    config = tiny_config(**{field: processor_value})
    lattice = EnergyLattice(config.replace(**{field: lattice_value}))
    with pytest.raises(ValueError, match=rf"lattice: built from another config.*{field} \(lattice "
                                         rf"{lattice_value!r}, processor {processor_value!r}\)"):
        FlowProcessor(lattice, SimpleNeuron(config), config)


def test_every_differing_geometry_field_is_named_and_only_those():
    config = tiny_config()
    lattice = EnergyLattice(config.replace(lattice_width=config.lattice_width + 1, lattice_height=config.lattice_height + 1,
                                           learning_rate=1e-3))
    with pytest.raises(ValueError) as err:
        FlowProcessor(lattice, SimpleNeuron(config), config)
    assert "lattice_width" in str(err.value) and "lattice_height" in str(err.value)
    assert "learning_rate" not in str(err.value)


@pytest.mark.parametrize("field, lattice_value", [("initial_flows_per_sample", 2), ("output_gate_init", 0.0),
                                                  ("learning_rate", 1e-3)])
def test_a_lattice_is_checked_only_on_what_it_reads_and_the_faces_follow_the_models_config(field, lattice_value):
    """The lattice is geometry: the faces that read these fields are built from the model's config."""
    config = tiny_config()
    proc = FlowProcessor(EnergyLattice(config.replace(**{field: lattice_value})), SimpleNeuron(config), config)
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        proc(x)
    assert proc.last_trace.initial_flows == 3 * config.initial_flows_per_sample
    assert float(proc.output_face.output_gate) == config.output_gate_init


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
    assert type(proc.config) is ModelConfig and proc.config == config.model
    assert proc.carrier.config is proc.config and proc.flow_step.config is proc.config
    assert proc.input_face.config is proc.config and proc.output_face.config is proc.config
    assert proc.lattice.config == proc.config


def test_the_model_holds_none_of_the_training_or_data_knobs():
    """A model built from a run's config keeps its model part only: two runs that differ in a
    training or data knob build equal models, and the model has no such field to read."""
    config = tiny_config()
    other_run = config.replace(learning_rate=1e-2, batch_size=5, dataset="routing", seed=7, epochs=3)
    assert build_processor(config).config == build_processor(other_run).config
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    run_fields = {f.name for f in dataclasses.fields(EnergyConfig)} - model_fields
    assert {"learning_rate", "batch_size", "dataset", "seed", "compile", "activation_checkpointing"} <= run_fields
    assert model_fields < {f.name for f in dataclasses.fields(EnergyConfig)}  # a run's config extends the model's
    for name in ("learning_rate", "compile", "activation_checkpointing", "seed"):
        assert not hasattr(build_processor(config).config, name)


def test_a_model_config_alone_builds_and_runs_the_same_model():
    config = tiny_config()
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(build_processor(config.model)(x), build_processor(config)(x))
    with pytest.raises(ValueError, match="learning_rate"):  # not a model field
        config.model.replace(learning_rate=1e-3)
    with pytest.raises(ValueError, match="spawn_threshold: must be > energy_threshold"):  # the model's own checks
        config.model.replace(spawn_threshold=0.05)


# ------------------------------------------------------------------------------------------------
# changing a field after construction
# ------------------------------------------------------------------------------------------------
def test_assigning_a_config_field_raises():
    config = tiny_config()
    proc = build_processor(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.initial_flows_per_sample = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        proc.config.energy_threshold = 0.3
    assert config.initial_flows_per_sample == 4 and proc.config.energy_threshold == config.energy_threshold


def test_validation_still_makes_an_int_given_for_a_float_field_a_float():
    config = tiny_config(energy_threshold=0, spawn_threshold=1)
    assert type(config.energy_threshold) is float and type(config.spawn_threshold) is float


@pytest.mark.parametrize("part", ["processor", "lattice", "carrier", "flow_step"])
def test_swapping_a_parts_config_is_refused(part):
    proc = build_processor(tiny_config())
    target = {"processor": proc, "lattice": proc.lattice, "carrier": proc.carrier, "flow_step": proc.flow_step}[part]
    before = target.config
    with pytest.raises(AttributeError, match=r"config: set once, when the model is built"):
        target.config = before.replace(energy_threshold=0.2)
    assert target.config is before


def test_checkpointing_is_the_processors_switch_and_the_forward_follows(monkeypatch):
    proc = build_processor(tiny_config())
    assert not proc.activation_checkpointing
    x = torch.randn(3, proc.config.input_dim, generator=torch.Generator().manual_seed(0))
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *args, **kwargs: calls.append(1) or real_checkpoint(*args, **kwargs))
    y_plain = proc(x)
    assert not calls
    proc.activation_checkpointing = True
    y_checkpointed = proc(x)
    assert len(calls) == proc.last_trace.num_steps  # every lattice step recomputed in backward
    torch.testing.assert_close(y_checkpointed, y_plain)
    # a run's config carries its choice into the model it builds; a model config has none
    assert FlowProcessor.from_config(tiny_config(activation_checkpointing=True)).activation_checkpointing
    assert not FlowProcessor.from_config(tiny_config(activation_checkpointing=True).model).activation_checkpointing


def test_the_trainer_turns_checkpointing_on_and_leaves_the_callers_config_as_given():
    config = tiny_config()
    proc = build_processor(config)
    # memory_check off: the trainer applies the flag it is given, through the processor
    trainer_config = config.replace(activation_checkpointing=True, memory_check=False)
    trainer = EnergyTrainer(proc, trainer_config, progress=False)
    assert trainer.processor is proc and proc.activation_checkpointing
    assert not config.activation_checkpointing


# ------------------------------------------------------------------------------------------------
# compile: read once
# ------------------------------------------------------------------------------------------------
def test_compile_is_read_once_when_the_model_is_built(monkeypatch):
    """``compile`` is fixed when the model is built: an eager model stays eager (no graphs, no
    padding), and the model's config has no ``compile`` to change."""
    config = tiny_config()
    proc = build_processor(config)
    assert not proc.compiled and FlowProcessor.from_config(config, compile=True).compiled
    assert FlowProcessor.from_config(config.replace(compile=True)).compiled  # a run's config carries it
    x = torch.randn(3, config.input_dim, generator=torch.Generator().manual_seed(0))
    padded = []
    real_padded = FlowState.padded
    monkeypatch.setattr(FlowState, "padded", lambda self, *a, **k: padded.append(1) or real_padded(self, *a, **k))
    with torch.no_grad():
        proc(x)
        state = proc.inject(x)
        result = proc.step(state, x.size(0))
    assert not padded, "an eager model padded the flows"
    assert result.next_state.valid is None  # compact made no padding rows either
    assert result.next_state.num_flows == state.num_flows - result.num_died - result.num_arrived + result.num_spawned


# ------------------------------------------------------------------------------------------------
# configs saved by older versions
# ------------------------------------------------------------------------------------------------
OLD_RUN = Path(__file__).parent / "fixtures" / "run-e5722ce"  # how it was made: its HOW_MADE.md

# The fields of the first config (commit 02612cc): every field added since has an entry in
# FIELD_DEFAULTS_BEFORE. Fixed here, not in the package, so that adding a field cannot pass unnoticed.
FIRST_CONFIG_FIELDS = (
    "lattice_width", "lattice_height", "lattice_depth", "input_dim", "output_dim", "initial_flows_per_sample",
    "max_active_flows", "max_spawn_per_step", "energy_threshold", "spawn_threshold", "max_lateral_step",
    "carrier_type", "carrier_hidden_dim", "carrier_num_layers", "child_rank", "message_dim", "position_frequencies",
    "neuron_hidden_dim", "neuron_output_dim", "aggregation", "injection_rank", "face_channels", "readout_hidden_dim",
    "batch_size", "learning_rate", "weight_decay", "warmup_steps", "epochs", "grad_clip", "mse_weight",
    "cosine_weight", "eval_every", "seed",
)


def test_every_field_added_since_the_first_config_says_what_it_was_before():
    fields_now = [f.name for f in dataclasses.fields(EnergyConfig)]
    lacking = [name for name in fields_now if name not in FIRST_CONFIG_FIELDS and name not in FIELD_DEFAULTS_BEFORE]
    assert not lacking, (
        f"EnergyConfig fields with no entry in FIELD_DEFAULTS_BEFORE (efgraph/config.py): {lacking}. A saved config "
        f"written before a field existed is read with that table's value, so add, at the end of the table, "
        + ", ".join(f'"{name}": <the value that reproduces what efgraph computed before {name} existed>'
                    for name in lacking)
        + " (for a switch of new behaviour: the setting that turns it off; Unreproducible(reason) if no value does)")
    stale = [name for name in FIELD_DEFAULTS_BEFORE if name not in fields_now or name in FIRST_CONFIG_FIELDS]
    assert not stale, f"FIELD_DEFAULTS_BEFORE entries that are no field added since the first config: {stale}"
    for name, before in FIELD_DEFAULTS_BEFORE.items():  # every plain entry is a value the field accepts
        if not isinstance(before, (SameAs, Unreproducible)):
            EnergyConfig(**{name: before})


def test_a_saved_config_takes_the_old_values_a_users_yaml_todays_defaults(tmp_path):
    saved = yaml.safe_load((OLD_RUN / "config.yaml").read_text())
    assert "injection" not in saved and "readout" not in saved
    old = EnergyConfig.from_saved_yaml(OLD_RUN / "config.yaml")
    assert (old.injection, old.readout, old.baseline_models, old.weight_decay_on) == ("broadcast", "shared", "mlp",
                                                                                     "all")
    assert {k: getattr(old, k) for k in saved} == saved  # what it holds is kept
    users = EnergyConfig.from_yaml(OLD_RUN / "config.yaml")  # the same file given as --config: a user's config
    assert (users.injection, users.readout, users.weight_decay_on) == ("face", "face", "matrices")
    assert EnergyConfig.from_saved(EnergyConfig(seed=3).to_dict(), "x") == EnergyConfig(seed=3)  # today's: as is


def test_a_field_that_came_from_another_takes_its_value():
    saved = {k: v for k, v in EnergyConfig(seed=5).to_dict().items() if k != "data_seed"}
    assert FIELD_DEFAULTS_BEFORE["data_seed"] == SameAs("seed")
    # before data_seed the split followed seed; such a config is also from before the live dynamics
    with pytest.raises(ValueError):
        EnergyConfig.from_saved({k: v for k, v in saved.items() if k != "output_gate_init"}, "x")
    assert EnergyConfig.from_saved(saved, "x").data_seed == 5


@pytest.mark.parametrize("change, message", [
    # from before the live dynamics (a095cae): no field reproduces the carrier's gated energies
    (lambda d: {k: v for k, v in d.items() if k not in ("interaction_radius", "survival_gradient",
                                                        "output_gate_init", "data_seed")},
     r"run/config\.yaml: written by an efgraph from before 'interaction_radius' existed; this is efgraph \S+ "
     r"\(config fields up to '\w+'\), which cannot compute what that run computed \(before the live dynamics.*"
     r"read it with the efgraph that wrote it, or train the run again"),
    ({"comet_project": "x"}, r"run/config\.yaml: written by another \(newer\?\) efgraph: its config has fields "
                             r"this one does not know \(comet_project\); this is efgraph .*read it with the efgraph"),
    ({"data_path": "pairs.pt"}, r"run/config\.yaml: written by an efgraph from before 'injection' existed; this is "
                                r"efgraph .*, which refuses its config: data_path: only read with dataset"),
])
def test_a_saved_config_that_cannot_be_read_as_its_run_is_one_line_naming_both_versions(change, message):
    saved = yaml.safe_load((OLD_RUN / "config.yaml").read_text())
    saved = change(saved) if callable(change) else {**saved, **change}
    with pytest.raises(ValueError, match=message) as err:
        EnergyConfig.from_saved(saved, "run/config.yaml")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("checkpoint", ["best", "last"])
def test_load_model_on_the_old_run_reproduces_its_outputs_and_flows(checkpoint):
    old = torch.load(OLD_RUN / "old_outputs.pt")
    model = load_model(OLD_RUN / "checkpoints" / f"{checkpoint}.pt")
    assert (model.config.injection, model.config.readout) == ("broadcast", "shared")
    with torch.no_grad():
        y = model(old["x"])
    torch.testing.assert_close(y, old[checkpoint], rtol=1e-5, atol=1e-6)
    trace = model.last_trace
    assert torch.tensor([trace.active, trace.spawned, trace.died, trace.arrived]).tolist() == \
        old[f"{checkpoint}_counts"].tolist()
    assert load_model(OLD_RUN).config == model.config  # the run folder: best.pt


def test_weights_that_do_not_fit_the_config_are_one_line_not_a_state_dict_error(tmp_path):
    """The old run's weights under a config that claims the face readout (what reading the old
    config with today's defaults did: a raw size mismatch for lattice.readout_out.weight)."""
    saved = yaml.safe_load((OLD_RUN / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**saved, "readout": "face"}))
    state = load_checkpoint(OLD_RUN / "checkpoints" / "last.pt")["model"]
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: its weights do not fit this efgraph's model of its "
                                         r"config \(.*readout_out.*\); written by an efgraph from before 'injection' "
                                         r"existed: load it with the efgraph that wrote it") as err:
        load_model(tmp_path / "model.safetensors")
    assert "\n" not in str(err.value)


def _train_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args, "--wandb-mode", "disabled",
                           "--no-progress"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_resuming_the_old_run_continues_it_as_that_version_did(tmp_path):
    """``train.py --resume`` of the old run (no --config, no --set) runs its last two steps and
    logs and tests what the old version's resume did (old_resumed.json)."""
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    done = _train_script("--resume", str(run), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    old = json.loads((OLD_RUN / "old_resumed.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    later = [{k: r[k] for k in r if k in ("step", "train/loss", "val/loss", "val/cosine")} for r in rows
             if r["step"] > 2]
    assert [r["step"] for r in later] == [r["step"] for r in old["metrics_after_step_2"]] == [3, 3, 4, 4]
    for ours, theirs in zip(later, old["metrics_after_step_2"]):
        assert ours == pytest.approx(theirs, rel=1e-5), (ours, theirs)
    results = json.loads((run / "results.json").read_text())
    assert results["best_step"] == old["best_step"]
    assert results["test"].keys() == old["test"].keys()  # the model's and the old version's baselines
    for name, scores in old["test"].items():  # its scores (this version adds each model's train_seconds)
        assert {k: results["test"][name][k] for k in scores} == pytest.approx(scores, rel=1e-5), name
        assert results["test"][name]["train_seconds"] >= 0
    rewritten = EnergyConfig.from_yaml(run / "config.yaml")  # the folder now holds the whole config
    assert (rewritten.injection, rewritten.readout, rewritten.weight_decay_on) == ("broadcast", "shared", "all")


def test_resuming_a_run_from_before_the_live_dynamics_is_one_clear_line(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    older = {k: v for k, v in saved.items() if k not in ("interaction_radius", "survival_gradient",
                                                         "output_gate_init", "data_seed")}
    (run / "config.yaml").write_text(yaml.safe_dump(older, sort_keys=False))
    done = _train_script("--resume", str(run), cwd=tmp_path)
    assert done.returncode == 2
    assert re.fullmatch(r"train\.py: error: --resume: \S+config\.yaml: written by an efgraph from before "
                        r"'interaction_radius' existed; this is efgraph .*, which cannot compute what that run "
                        r"computed .*train the run again with this one\n", done.stderr), done.stderr


def test_a_removed_field_reads_at_its_off_value_and_is_refused_at_any_other():
    """readout_key_blur and start_cell_noise were removed (tried, not kept): a config that has them
    off still reads as before; one that asks for them is refused naming the field."""
    saved = {**EnergyConfig().to_dict(), "readout_key_blur": 0.0, "readout_key_blur_fraction": 0.5,
             "start_cell_noise": 0.0, "start_cell_noise_fraction": 0.5}
    assert EnergyConfig.from_saved(saved, "run/config.yaml") == EnergyConfig()
    assert EnergyConfig.from_dict({"start_cell_noise": 0.0}) == EnergyConfig()
    with pytest.raises(ValueError, match=r"start_cell_noise: removed from efgraph .*got 0\.05"):
        EnergyConfig.from_dict({"start_cell_noise": 0.05})
    with pytest.raises(ValueError, match=r"run/config\.yaml: .*readout_key_blur: removed from efgraph"):
        EnergyConfig.from_saved({**saved, "readout_key_blur": 2.0}, "run/config.yaml")


def test_the_fields_a_checkpoint_must_agree_on_are_model_fields():
    """A checkpoint loads only into a model that agrees on ARCHITECTURE_KEYS: each is a field of the
    model (a training or data knob may change on resume), and the model's config rejects the others."""
    from efgraph.config import ARCHITECTURE_KEYS, RESUME_MUTABLE_KEYS

    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(ARCHITECTURE_KEYS) <= model_fields
    assert not set(RESUME_MUTABLE_KEYS) & model_fields  # what a resume may change is never the model
