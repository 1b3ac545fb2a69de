"""`EnergyConfig`: a run's every knob in one flat, validated dataclass: the model
(:class:`~efgraph.core.model_config.ModelConfig`, whose fields it extends; ``config.model``), the
training loop (:class:`TrainingConfig`, likewise; ``config.training``), how the run goes beyond
the loop, its data and its baselines.

The config is flat on purpose (one YAML mapping, no nesting) so that a dotted override such as
``--set lattice_depth=20`` names exactly one field, and so that a YAML file with a typo fails loudly:
:meth:`EnergyConfig.from_yaml` rejects unknown keys instead of ignoring them.

The model's fields and their checks are :class:`ModelConfig`'s, the loop's :class:`TrainingConfig`'s;
this module adds the rest, and the rules for configs saved by older versions
(:data:`FIELD_DEFAULTS_BEFORE`, :data:`REMOVED_FIELDS`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from efgraph.core.model_config import ModelConfig

DATASETS = ("synthetic", "bible", "pairs", "text", "routing", "composition", "lookup")
# the learned baselines a run trains beside the model (identity and ridge are closed-form and always fitted)
LEARNED_BASELINES = ("mlp", "transformer")
LINEAR_SKIP_INITS = ("zero", "ridge")  # where the linear skip's W starts
COMPOSITION_HOLD_OUTS = ("pairs", "inputs", "chains")  # what a composition split keeps out of training
# which parameters AdamW's weight decay pulls toward 0 (efgraph.training.optim)
WEIGHT_DECAY_ON = ("matrices", "all")
# Fields a resumed run may change: they do not affect which batches it sees or what it computes.
RESUME_MUTABLE_KEYS = ("log_every", "checkpoint_every", "wandb_project", "compile", "skip_nonfinite_steps",
                       "memory_check", "activation_checkpointing", "micro_batch_size", "num_threads",
                       "learning_diagnostics")
PRECISIONS = ("fp32", "bf16")
# fixed: the per-sample flow budget is max_active_flows; adaptive: a controller moves it between
# forwards, under the memory plan's cap and toward flow_budget_target (efgraph.training.flow_budget)
FLOW_BUDGETS = ("fixed", "adaptive")

# Fields of mechanisms that were tried, not kept and removed (git keeps them), with the value that
# switched each off: a config that has one at that value reads as before (the field is dropped), any
# other value is refused, since no setting of this efgraph computes what it asked for.
REMOVED_FIELDS: dict[str, tuple[Any, str]] = {
    "readout_key_blur": (0.0, "a blur of the readout keys in training forwards (removed after 233cbbe: it did not help)"),
    "readout_key_blur_fraction": (None, "the span of readout_key_blur's annealing"),
    "start_cell_noise": (0.0, "Gumbel noise on the start cells in training forwards (removed after 233cbbe: it slowed "
                              "learning)"),
    "start_cell_noise_fraction": (None, "the span of start_cell_noise's annealing"),
}


@dataclass(frozen=True)
class SameAs:
    """A :data:`FIELD_DEFAULTS_BEFORE` entry: before the field existed, the code used this other field."""

    field: str


@dataclass(frozen=True)
class Unreproducible:
    """A :data:`FIELD_DEFAULTS_BEFORE` entry: no value of today's fields computes what the code did
    before the field existed (``reason`` says what it did), so a saved config lacking it is refused."""

    reason: str


# For every field added after the first config (commit 02612cc), in the order the fields were
# added: the value that reproduces what efgraph computed before the field existed (for a field
# that changes nothing the model computes: its default when it was added). A *saved* config (a
# checkpoint's, a run folder's or an exported model's config.yaml: EnergyConfig.from_saved) that
# lacks a field was written before it and is read with this value, not today's default; a config a
# user writes gets today's defaults. A new field needs an entry here (tests/test_model_config.py).
FIELD_DEFAULTS_BEFORE: dict[str, Any] = {
    # 0f8684b: the trainer, the data and the run folder
    "residual": False, "log_every": 10, "checkpoint_every": 200, "dataset": "synthetic", "data_path": "",
    "source_version": "KJV", "target_version": "WEB", "max_pairs": 0, "synthetic_pairs": 2000,
    "embedding_model": "", "val_fraction": 0.1, "test_fraction": 0.1, "wandb_project": "efgraph",
    "verses_per_book": 0,  # 9859fd7: every verse of every book
    "skip_nonfinite_steps": False,  # d2a73f5: a non-finite step stopped the run
    "precision": "fp32",  # 2a407d9
    "compile": False,  # 54e0d72
    "memory_check": False,  # 37ea51e: nothing was checked
    # 80f32f7, read from a095cae (the live dynamics) on; before it a neuron heard only its own cell,
    # a dying flow sent no gradient and the split followed seed
    "interaction_radius": 0,
    "survival_gradient": False,
    "output_gate_init": Unreproducible("before the live dynamics of commit a095cae the carrier gated each flow's "
                                       "energy instead of setting it, and the output had no learned gate"),
    "data_seed": SameAs("seed"),
    "activation_checkpointing": False, "micro_batch_size": 0,  # 7c6dd6c: the whole batch, nothing recomputed
    # b61226d: the faces; before them every flow started from the whole embedding and one shared
    # per-cell MLP read the hit cells out
    "injection": "broadcast", "readout": "shared", "readout_rank": 16,
    "routing_slots": 4, "routing_token_dim": 8, "routing_noise": 0.0,
    "flow_budget": "fixed", "flow_budget_target": 0.0,  # 84fc7bc
    # 4b1ef34: before it a run used PyTorch's thread count and trained the MLP baseline only
    "num_threads": 0, "baseline_models": "mlp",
    "composition_values": 16, "composition_tables": 8, "composition_chain": 2, "composition_hold_out": "pairs",
    "transformer_tokens": 8, "transformer_layers": 2, "transformer_heads": 4, "transformer_width": 0,
    "learning_diagnostics": False,  # e0d5a3a: none were logged
    "residual_steps": False,  # 2a537ae: every step a full update
    "project_step_gates": False,  # added after 979f8b8: free gates read through a clamp
    "weight_decay_on": "all",  # before 4be4558 AdamW decayed every parameter, in one group
    "linear_skip": False,  # added after c8fa4d4: no linear path from x to y
    "composition_identity": False,  # added after c8fa4d4: every table a random permutation
    "linear_skip_init": "zero",  # added after c8fa4d4
    "input_sequence": False,  # added after 233cbbe: x was one vector
    "position_z_extent": 0,  # added after 233cbbe: z was normalised by the lattice's own depth
    "test_depth": 0,  # added after 233cbbe: the test split was read at the training depth
    "jump_init": 0.5,  # added after 233cbbe: the jump head's bias started at 0
}

# Fields that fix the shapes of the parameters or what the computation means: a checkpoint only
# loads into a model whose config agrees on all of them (training knobs may change on resume).
ARCHITECTURE_KEYS = (
    "lattice_width", "lattice_height", "lattice_depth", "input_dim", "output_dim", "carrier_type",
    "carrier_hidden_dim", "carrier_num_layers", "child_rank", "message_dim", "position_frequencies",
    "neuron_hidden_dim", "neuron_output_dim", "aggregation", "injection_rank", "face_channels",
    "readout_hidden_dim", "residual", "interaction_radius", "injection", "readout", "readout_rank",
    "residual_steps", "linear_skip", "input_sequence", "position_z_extent",
)


@dataclass(frozen=True)
class TrainingConfig:
    """What the training loop (:class:`efgraph.training.loop.Trainer`) reads: optimizer, schedule,
    loss, batches, intervals. :class:`EnergyConfig` has these fields (``config.training`` is this
    part alone); a learned baseline builds its own from its arguments.

    Frozen and validated when built: a field out of its range raises ``ValueError`` naming it.
    """

    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    # which parameters the decay pulls toward 0: matrices (dim >= 2; biases, gates and scalars are
    # not decayed, efgraph.training.optim) or all (what efgraph did before 2026-11-30, commit 4be4558)
    weight_decay_on: str = "matrices"
    warmup_steps: int = 100
    epochs: int = 10
    grad_clip: float = 1.0  # the gradient's largest norm (math.inf: no clipping)
    mse_weight: float = 1.0
    cosine_weight: float = 1.0
    eval_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 200
    precision: str = "fp32"  # fp32 | bf16 (autocast; the lattice's recurrent cell and positions stay fp32)
    skip_nonfinite_steps: bool = False  # skip (and count) a step with a NaN/inf loss or gradient instead of stopping
    seed: int = 0  # batch order and model initialisation

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field out of its allowed range (in a config that
        extends this one, after the checks of the classes that follow it)."""
        later = getattr(super(), "validate", None)
        if later is not None:  # EnergyConfig: the model's fields (types first) come before these
            later()
        for name in ("batch_size", "epochs", "eval_every", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "seed", "weight_decay", "mse_weight", "cosine_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.weight_decay_on not in WEIGHT_DECAY_ON:
            raise ValueError(f"weight_decay_on: must be one of {WEIGHT_DECAY_ON}, got {self.weight_decay_on!r}")
        if self.mse_weight + self.cosine_weight <= 0:
            raise ValueError("mse_weight, cosine_weight: at least one loss weight must be > 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass(frozen=True)
class EnergyConfig(TrainingConfig, ModelConfig):
    """A run's configuration: the model's fields (:class:`ModelConfig`, first), the training
    loop's (:class:`TrainingConfig`), then how the model is trained and run beyond the loop, its
    data and its baselines. ``config.model`` is the model alone, ``config.training`` the loop's part.

    Frozen: assigning a field raises ``dataclasses.FrozenInstanceError``. A changed config is a new
    one (:meth:`replace`); a built model's parts hold its :class:`ModelConfig`, and how the model is
    run (``compile``, ``activation_checkpointing``) is the processor's, read from here when it is
    built (:meth:`efgraph.core.flow_processor.FlowProcessor.from_config`).
    """

    # --- training, beyond the loop's fields ----------------------------------------------------
    # the per-sample cap on active flows that spawning respects. fixed: max_active_flows.
    # adaptive: the trainer moves it between training forwards (efgraph.training.flow_budget),
    # never above the largest budget whose worst case fits the device under the memory plan (and
    # never above max_active_flows), toward flow_budget_target; evaluation uses the same budget
    flow_budget: str = "fixed"
    # adaptive: the flow-steps per sample per forward (sum over lattice steps of the sample's
    # active flows) the budget steers toward; 0 = no compute target, the budget is the plan's cap
    flow_budget_target: float = 0.0
    # where the linear skip starts. zero: W = 0; ridge: the run pipeline (scripts/train.py, studies)
    # fits the ridge on the training pairs (on the residual y - x with residual: true), its penalty
    # chosen on validation as the ridge baseline's, and starts W and the readout bias there, so
    # that with output_gate_init: 0 the model at initialisation *is* that ridge and training starts
    # from the best linear map instead of spending its steps finding it (measured on the Bible: it
    # wins on the whole Bible's 778 steps and drifts below the ridge over bible.yaml's 970)
    linear_skip_init: str = "zero"
    # per-lattice-step gradients, output shares, landings and start-cell churn (diag/... keys) on
    # the logged training steps only (efgraph.core.diagnostics); the other steps pay nothing
    learning_diagnostics: bool = True
    # torch.compile the whole step: decide, compact and deposit, each one graph with static shapes
    # (flows padded to bucket sizes); Inductor compiles each bucket once, minutes on a CPU
    compile: bool = False
    # recompute each lattice step in backward instead of keeping its activations: the saved
    # activations fall to about the flows' hidden states, for ~1/3 more compute. true = always;
    # false = only when the trainer's memory plan needs it to fit (efgraph.utils.memory)
    activation_checkpointing: bool = False
    # rows per forward+backward; a batch is split into micro-batches whose gradients accumulate
    # (same update as the whole batch). 0 = the whole batch, or what the memory plan needs to fit
    micro_batch_size: int = 0
    memory_check: bool = True  # refuse a config whose worst-case training step cannot fit the device
    # CPU threads of this process (torch.set_num_threads), applied by the trainer; 0 = PyTorch's
    # default (every core). Give each of several runs sharing a machine cores / runs: two routing
    # runs at the default thread count on 2 cores took 2x as long per step as at one thread each
    # (scripts/bench_threads.py)
    num_threads: int = 0
    data_seed: int = 0  # the train / validation / test split, kept apart so that seeds share one test set
    # --- data (used by scripts/train.py) -------------------------------------------------------
    # synthetic | bible | pairs (embedding file) | text (text-pair file) | routing | composition |
    # lookup (the Neural Data Router's table lookup, efgraph.data.lookup: its own split, chains of
    # 1-5 lookups in training and 6-10 in test, tokens of width input_dim; output_dim 8)
    dataset: str = "synthetic"
    data_path: str = ""  # the file for dataset=pairs or dataset=text
    source_version: str = "KJV"  # bible: source translation
    target_version: str = "WEB"  # bible: target translation
    max_pairs: int = 0  # use at most this many pairs (0 = all)
    verses_per_book: int = 0  # bible: the first N verses of every book (0 = all), a fast subset of all books
    synthetic_pairs: int = 2000  # synthetic and routing: number of generated pairs
    # routing: slots x token width; the target puts each token into the slot its address names
    # (input_dim = routing_slots * (routing_token_dim + routing_slots), output_dim = slots * token)
    routing_slots: int = 4
    routing_token_dim: int = 8
    routing_noise: float = 0.0  # routing: target noise, relative to a token entry's size
    embedding_model: str = ""  # text/bible: local sentence-transformers folder ("" = packaged MiniLM)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    # composition: a start value and a chain of composition_chain lookups in composition_tables
    # random permutations of composition_values values; the target is the value the chain ends on
    # (input_dim = values + chain * tables, output_dim = values; efgraph.data.composition)
    composition_values: int = 16
    composition_tables: int = 8
    composition_chain: int = 2
    # composition: what the split holds out of training. pairs: nothing beyond the pairs (inputs
    # repeat, so short chains are memorised); for chains of >= 2 lookups, inputs: no test input
    # (start value and chain) is a training input; chains: no test chain is a training chain
    composition_hold_out: str = "pairs"
    # composition: table 0 is the identity, so the data also holds single lookups and shorter
    # chains (the atoms a held-out chain is composed of); needs composition_tables >= 2
    composition_identity: bool = False
    # the test split is read by the selected model at this lattice depth (FlowProcessor.at_depth:
    # the same parameters, deeper); 0 = lattice_depth. For data whose test asks for more steps than
    # training did (dataset: lookup's longer chains)
    test_depth: int = 0
    wandb_project: str = "efgraph"
    # --- baselines (fitted on the run's split, scored on its test pairs) ------------------------
    # comma-separated learned baselines to train beside the model, from LEARNED_BASELINES ("" = none;
    # identity and ridge are closed-form and always fitted). Each gets the model's parameter count,
    # steps, batch, learning rate, schedule and loss, and keeps its best validation state
    baseline_models: str = "mlp,transformer"
    # the Transformer baseline: x -> Linear -> transformer_tokens tokens of transformer_width ->
    # transformer_layers pre-norm encoder layers (transformer_heads heads, feed-forward 2 x width)
    # -> flatten -> Linear; width 0 = the multiple of heads whose count is closest to the model's
    transformer_tokens: int = 8
    transformer_layers: int = 2
    transformer_heads: int = 4
    transformer_width: int = 0

    @property
    def model(self) -> ModelConfig:
        """The model's part of this config (what the engine's parts read)."""
        return ModelConfig.of(self)

    @property
    def training(self) -> TrainingConfig:
        """What the training loop reads of this config (validated when built)."""
        return TrainingConfig(**{f.name: getattr(self, f.name) for f in fields(TrainingConfig)})

    @property
    def learned_baselines(self) -> tuple[str, ...]:
        """``baseline_models`` as a tuple of names, in the order given."""
        return tuple(m.strip() for m in self.baseline_models.split(",") if m.strip())

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of its allowed range: the
        model's fields (:meth:`ModelConfig.validate`), the loop's (:meth:`TrainingConfig.validate`),
        then the run's."""
        super().validate()
        for name in ["synthetic_pairs", "routing_slots", "routing_token_dim", "transformer_tokens",
                     "transformer_layers", "transformer_heads"]:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ["data_seed", "max_pairs", "verses_per_book", "num_threads", "transformer_width"]:
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.micro_batch_size <= self.batch_size:
            raise ValueError(f"micro_batch_size: must be in [0, batch_size={self.batch_size}] (0 = automatic), "
                             f"got {self.micro_batch_size}")
        if self.test_depth and self.test_depth < self.lattice_depth:
            raise ValueError(f"test_depth: must be 0 (the lattice's own depth) or >= lattice_depth "
                             f"({self.lattice_depth}), got {self.test_depth}")
        if self.routing_noise < 0:
            raise ValueError(f"routing_noise: must be >= 0, got {self.routing_noise}")
        for name, low in (("composition_values", 2), ("composition_tables", 1), ("composition_chain", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: must be >= {low}, got {getattr(self, name)}")
        if self.linear_skip_init not in LINEAR_SKIP_INITS:
            raise ValueError(f"linear_skip_init: must be one of {LINEAR_SKIP_INITS}, got {self.linear_skip_init!r}")
        if self.linear_skip_init != "zero" and not self.linear_skip:
            raise ValueError(f"linear_skip_init: {self.linear_skip_init!r} starts the linear skip, but linear_skip "
                             f"is false; set linear_skip: true or drop linear_skip_init")
        if self.composition_identity and self.dataset != "composition":
            raise ValueError(f"composition_identity: only read with dataset 'composition', but dataset is "
                             f"{self.dataset!r}; drop composition_identity")
        if self.composition_identity and self.composition_tables < 2:
            raise ValueError(f"composition_identity: needs composition_tables >= 2 (table 0 is the identity), "
                             f"got {self.composition_tables}")
        if self.composition_hold_out not in COMPOSITION_HOLD_OUTS:
            raise ValueError(f"composition_hold_out: must be one of {COMPOSITION_HOLD_OUTS}, "
                             f"got {self.composition_hold_out!r}")
        unknown = [m for m in self.learned_baselines if m not in LEARNED_BASELINES]
        if unknown or len(set(self.learned_baselines)) != len(self.learned_baselines):
            raise ValueError(f"baseline_models: a comma-separated list of distinct names from {LEARNED_BASELINES} "
                             f"(\"\" = none), got {self.baseline_models!r}")
        if self.transformer_width % self.transformer_heads:
            raise ValueError(f"transformer_width: must be a multiple of transformer_heads ({self.transformer_heads}) "
                             f"or 0 (sized to the model), got {self.transformer_width}")
        if self.flow_budget not in FLOW_BUDGETS:
            raise ValueError(f"flow_budget: must be one of {FLOW_BUDGETS}, got {self.flow_budget!r}")
        if self.flow_budget_target < 0:
            raise ValueError(f"flow_budget_target: must be >= 0 (flow-steps per sample per forward; "
                             f"0 = no compute target), got {self.flow_budget_target}")
        if self.flow_budget_target > 0 and self.flow_budget != "adaptive":
            raise ValueError(f"flow_budget_target: only used with flow_budget: adaptive, got "
                             f"{self.flow_budget_target} with flow_budget: {self.flow_budget!r}")
        if self.flow_budget_target > self.worst_case_flow_steps:
            raise ValueError(f"flow_budget_target: must be <= {self.worst_case_flow_steps}, the most flow-steps a "
                             f"sample can run in a forward (every flow spawning at every step up to "
                             f"max_active_flows), got {self.flow_budget_target}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset in ("pairs", "text") and not self.data_path:
            raise ValueError(f"data_path: required for dataset={self.dataset!r}")
        if self.data_path and self.dataset not in ("pairs", "text"):
            # read only for a file dataset: set alone it would be ignored and the run would train
            # on the built-in data without a word
            raise ValueError(f"data_path: only read with dataset 'pairs' (embeddings) or 'text' (text pairs), but "
                             f"dataset is {self.dataset!r}; add --set dataset=pairs (or text), or drop data_path")
        for name in ["val_fraction", "test_fraction"]:
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name}: must be in (0, 0.5), got {getattr(self, name)}")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EnergyConfig":
        """:meth:`ModelConfig.from_dict`, after dropping the :data:`REMOVED_FIELDS` at their off value."""
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a mapping of field names to values, got {type(data).__name__}")
        return super().from_dict(_without_removed_fields(data))

    def with_overrides(self, overrides: list[str]) -> "EnergyConfig":
        """Apply ``key=value`` strings (values parsed as YAML scalars), as ``--set`` does."""
        changes: dict[str, Any] = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r}: expected key=value")
            key, raw = item.split("=", 1)
            changes[key.strip()] = yaml.safe_load(raw)
        return self.replace(**changes)

    @classmethod
    def from_saved(cls, data: dict[str, Any], where: str) -> "EnergyConfig":
        """A config that efgraph saved (a checkpoint's, a run folder's or an exported model's),
        maybe by an older version: a field it lacks takes the value of
        :data:`FIELD_DEFAULTS_BEFORE` (what the version that wrote it computed), not today's default.

        Raises:
            ValueError: one line naming ``where``, the efgraph that wrote it, this one and what to
                do, when the config cannot be read as the run it describes: fields this version does
                not know, a lacking field whose old behaviour no setting reproduces, or a value this
                version refuses.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a saved config (a mapping of field names to values), "
                             f"got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known) - set(REMOVED_FIELDS))
        if unknown:
            raise ValueError(f"{where}: written by another (newer?) efgraph: its config has fields this one does not "
                             f"know ({', '.join(unknown)}); this is {_this_efgraph()}; read it with the efgraph "
                             f"that wrote it")
        filled = dict(data)
        for name in (n for n in known if n not in data):
            if name not in FIELD_DEFAULTS_BEFORE:
                raise ValueError(f"{where}: lacks the field {name!r}, and this efgraph records no value for configs "
                                 f"written before it existed (add it to FIELD_DEFAULTS_BEFORE in efgraph/config.py)")
            before = FIELD_DEFAULTS_BEFORE[name]
            if isinstance(before, Unreproducible):
                raise ValueError(f"{where}: written by {saved_config_writer(data)}; this is {_this_efgraph()}, which "
                                 f"cannot compute what that run computed ({before.reason}); read it with the efgraph "
                                 f"that wrote it, or train the run again with this one")
            filled[name] = data.get(before.field, getattr(cls, before.field)) if isinstance(before, SameAs) else before
        try:
            return cls.from_dict(filled)
        except ValueError as err:
            raise ValueError(f"{where}: written by {saved_config_writer(data)}; this is {_this_efgraph()}, which "
                             f"refuses its config: {err}") from None

    @classmethod
    def from_saved_yaml(cls, path: str | Path) -> "EnergyConfig":
        """:meth:`from_saved` of a saved ``config.yaml`` (a run folder's or an exported model's)."""
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        return cls.from_saved(data if data is not None else {}, str(path))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EnergyConfig":
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        try:
            return cls.from_dict(data if data is not None else {})
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def model_from_saved(cls, data: dict[str, Any], where: str) -> ModelConfig:
        """The model of a saved config: a run's (every field) or an exported model's (the model's
        fields only), read as :meth:`from_saved` reads it; the run's fields it lacks take today's
        defaults (the model does not read them)."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a saved config (a mapping of field names to values), "
                             f"got {type(data).__name__}")
        model_fields = {f.name for f in fields(ModelConfig)}
        run_defaults = {f.name: f.default for f in fields(cls) if f.name not in model_fields and f.name not in data}
        return cls.from_saved({**run_defaults, **data}, where).model


def _without_removed_fields(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the :data:`REMOVED_FIELDS` it holds at their off value; one at another value
    raises ``ValueError`` naming it (a fraction alone goes with its field)."""
    for name, (off, what) in REMOVED_FIELDS.items():
        if name in data and off is not None and data[name] != off:
            raise ValueError(f"{name}: removed from efgraph ({what}); only {off} (off) is still read, got "
                             f"{data[name]!r}: drop the field, or use the efgraph that had it")
    return {k: v for k, v in data.items() if k not in REMOVED_FIELDS}


def saved_config_writer(data: dict[str, Any]) -> str:
    """Which efgraph wrote a saved config, told by the fields it has: e.g. "an efgraph from before
    'injection' existed" (the oldest field of :data:`FIELD_DEFAULTS_BEFORE` that it lacks)."""
    lacking = next((name for name in FIELD_DEFAULTS_BEFORE if name not in data), None)
    return f"an efgraph from before {lacking!r} existed" if lacking else "an efgraph with this one's config fields"


def _this_efgraph() -> str:
    """This efgraph, for messages about configs saved by another: its version and newest field."""
    from efgraph import __version__  # efgraph/__init__.py imports this module: read at call time

    return f"efgraph {__version__} (config fields up to {next(reversed(FIELD_DEFAULTS_BEFORE))!r})"


def create_debug_config(**overrides: Any) -> EnergyConfig:
    """20x20x10 lattice, 100 flows per sample, batch 8: for tests and a quick look."""
    return EnergyConfig(
        lattice_width=20, lattice_height=20, lattice_depth=10,
        initial_flows_per_sample=8, max_active_flows=100, batch_size=8,
    ).replace(**overrides)


def create_experiment_config(**overrides: Any) -> EnergyConfig:
    """50x50x20 lattice, 500 flows per sample, batch 16."""
    return EnergyConfig(
        lattice_width=50, lattice_height=50, lattice_depth=20,
        initial_flows_per_sample=16, max_active_flows=500, batch_size=16,
    ).replace(**overrides)


def create_optimized_config(**overrides: Any) -> EnergyConfig:
    """100x100x50 lattice, 1000 flows per sample, batch 32: a GPU workload."""
    return EnergyConfig(
        lattice_width=100, lattice_height=100, lattice_depth=50,
        initial_flows_per_sample=32, max_active_flows=1000, batch_size=32,
    ).replace(**overrides)
