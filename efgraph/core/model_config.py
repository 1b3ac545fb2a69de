"""`ModelConfig`: what the energy-flow model is, apart from how it is trained, run or fed.

Every field here is read by the engine's parts (the geometry, the faces, the step, the carrier):
sizes that fix the parameters, and the rules of the flows (thresholds, budgets, moves, the step
gates). What a run adds (optimizer, schedule, data, baselines, logging; how the model is run:
``compile``, ``activation_checkpointing``, ``precision``) is
:class:`~efgraph.config.EnergyConfig`'s, which extends this class with those fields: a run's YAML
is one flat mapping, and ``config.model`` is its model.

Frozen: the processor and its parts share one :class:`ModelConfig` (:func:`config_attribute`), so
no part can disagree with another; a changed model is a new one (:meth:`ModelConfig.replace`).
Budgets are *per sample*: ``max_active_flows`` and ``max_spawn_per_step`` bound the flows of one
input embedding, so a sample's output never depends on what else shares its batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

CARRIER_TYPES = ("gru", "lstm")
AGGREGATIONS = ("mean", "sum")
# how the input embedding enters the lattice / how the output embedding leaves it
INJECTIONS = ("face", "broadcast")
READOUTS = ("face", "shared")

# the YAML types of the fields, for the type check (annotations are strings: `from __future__`)
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}

Config = TypeVar("Config", bound="ModelConfig")


@dataclass(frozen=True)
class ModelConfig:
    """The model: lattice geometry (``lattice_width`` x ``lattice_height`` x ``lattice_depth``
    cells; z=0 the input face, z=depth-1 the output face), the flows' rules, the carrier, neuron and
    faces. Validated when made: a field out of its range raises ``ValueError`` naming it.
    """

    # --- lattice -------------------------------------------------------------------------------
    lattice_width: int = 20
    lattice_height: int = 20
    lattice_depth: int = 10
    # --- embeddings ----------------------------------------------------------------------------
    input_dim: int = 768
    output_dim: int = 768
    # false: x is one embedding [B, input_dim], laid across the input face; true: x is a sequence
    # [B, T, input_dim] of embeddings (tokens) with a mask [B, T], and each token starts its own flow
    # on face cell t (raster order), T <= initial_flows_per_sample (efgraph.core.input_face)
    input_sequence: bool = False
    # --- flows (budgets are per sample) --------------------------------------------------------
    initial_flows_per_sample: int = 8
    max_active_flows: int = 100
    max_spawn_per_step: int = 10
    energy_threshold: float = 0.1
    spawn_threshold: float = 0.8
    max_lateral_step: float = 2.0
    # the fraction of the depth left that a flow jumps beyond its one cell a step at initialisation
    # (the jump head's bias is its logit; training moves it): 0.5 reaches the output face in about
    # log2(D) steps; near 0 a flow first takes every step, one cell at a time, and learns to jump
    # ahead when it is done
    jump_init: float = 0.5
    # a flow's neuron sees the flows of its own sample in the cells within this Chebyshev radius
    # (3-D, in cells); 0 = only the flows of its own cell
    interaction_radius: int = 1
    # depth that starts as one step: the first lattice step is the one-step model's (full update,
    # no spawning) and every later step t is a residual update of each flow gated by a learned
    # scalar g_t in [0, 1] started at 0 (ReZero): state h += g_t (GRU(h) - h), lateral move and
    # child offsets x g_t, energy += g_t (new - old), and a step spawns only while g_t > 0. With
    # every gate at 0 a deep lattice computes the one-step lattice's output; training opens them
    residual_steps: bool = False
    # residual_steps: after every optimizer step the trainer puts each gate back into [0, 1]
    # (projected gradient descent), so a closed gate sits at 0 and opens as soon as its gradient
    # asks; false = the gates are free parameters read through a straight-through clamp, and a
    # closed one sinks below 0 (measured: -1 to -3) where reopening takes hundreds of steps.
    # Like residual_steps at depth 2, it does nothing where there are no gates, so a config that
    # sets it can be run as a one-step lattice (--set lattice_depth=2 --set residual_steps=false)
    project_step_gates: bool = False
    # a dying flow sends a surrogate gradient ("had you lived, you would have deposited this"),
    # so death is no gradient cliff; false = hard death with no gradient (an ablation)
    survival_gradient: bool = True
    # --- carrier (shared recurrent cell) -------------------------------------------------------
    carrier_type: str = "gru"
    carrier_hidden_dim: int = 1024
    carrier_num_layers: int = 3
    child_rank: int = 32
    # --- neuron and messages -------------------------------------------------------------------
    message_dim: int = 20
    position_frequencies: int = 2
    # the z that the position code's z axis spans: 0 = lattice_depth - 1 (z in [0, 1] of the
    # lattice's own depth); N > 0 = z / N whatever the depth, so a model run deeper than it was
    # trained (FlowProcessor.at_depth) reads the same code at the same z and continues it beyond
    position_z_extent: int = 0
    neuron_hidden_dim: int = 64
    neuron_output_dim: int = 16
    aggregation: str = "mean"
    # --- injection and readout -----------------------------------------------------------------
    # face: the embedding is laid across the input face (each cell holds its own face_channels-wide
    # part, a rank-injection_rank field) and each flow carries its start cell's part;
    # broadcast: every flow starts from the whole embedding plus its cell's position code
    injection: str = "face"
    # face: each output-face cell owns its readout weights (rank readout_rank), so where a flow
    # lands decides which part of y it writes; shared: one per-cell MLP summed over the hit cells,
    # blind to where the flows land (position enters only as an additive code)
    readout: str = "face"
    injection_rank: int = 16
    face_channels: int = 64
    readout_rank: int = 16  # readout: face
    readout_hidden_dim: int = 256  # readout: shared
    residual: bool = False  # y = x + f(x); needs input_dim == output_dim
    # a learned linear path from x to y beside the lattice, y = [x +] W x + lattice(x), W started
    # at 0 (so the model at initialisation is the model without it): the linear part of a map is
    # then learned by one matrix instead of by where flows land, and the lattice is left what a
    # linear map cannot do. Costs input_dim x output_dim parameters and one matmul per forward
    linear_skip: bool = False
    # initial value of the learned scalar gate on the flows' contribution to the output
    # (y = [x +] gate * lattice(x) + bias). With residual: true, 0 scales the lattice in from zero,
    # so silencing an untrained lattice (y = x) is never the shortcut to a lower loss (the bible
    # configs). Without a residual there is no such shortcut and 0 is a saddle: the lattice gets
    # gradient only through the gate, whose sign wanders around 0 (measured on routing: val
    # cosine 0.0004 after 250 steps from 0, 0.22 from 1), so the default starts it open.
    output_gate_init: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def of(cls, config: "ModelConfig") -> "ModelConfig":
        """The model part of ``config`` (an :class:`~efgraph.config.EnergyConfig` or a ModelConfig)."""
        if type(config) is cls:
            return config
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    # ------------------------------------------------------------------------------------------
    @property
    def position_encoding_dim(self) -> int:
        """Width of the sinusoidal encoding of (x, y, z): sin and cos per axis per frequency."""
        return 6 * self.position_frequencies

    @property
    def neuron_input_dim(self) -> int:
        """The neuron sees [aggregated message, cell position encoding] (32 by default)."""
        return self.message_dim + self.position_encoding_dim

    @property
    def num_cells(self) -> int:
        return self.lattice_width * self.lattice_height * self.lattice_depth

    @property
    def face_cells(self) -> int:
        return self.lattice_width * self.lattice_height

    @property
    def worst_case_flow_steps(self) -> int:
        """The most flow-steps one sample can run in a forward: ``initial_flows_per_sample`` flows
        that each spawn one child a step (at most ``max_spawn_per_step`` a sample), never past
        ``max_active_flows``, over ``lattice_depth - 1`` steps (the sum of
        :func:`efgraph.utils.memory.flows_per_step_bound`)."""
        flows, total = self.initial_flows_per_sample, 0
        for _ in range(self.lattice_depth - 1):
            total += flows
            flows = min(flows + min(flows, self.max_spawn_per_step), self.max_active_flows)
        return total

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of its allowed range (every
        field's type, then the model's ranges; a subclass adds its own after these)."""
        for f in fields(self):
            value = getattr(self, f.name)
            expected = _TYPES[f.type]
            # bool is an int subclass; a YAML `true` for a size is a mistake, not 1.
            wrong_bool = isinstance(value, bool) and expected is not bool
            if wrong_bool or not isinstance(value, (int, float) if expected is float else expected):
                raise ValueError(f"{f.name}: expected {f.type}, got {value!r} ({type(value).__name__})")
            if expected is float:
                if not math.isfinite(value):
                    raise ValueError(f"{f.name}: must be finite, got {value!r}")
                object.__setattr__(self, f.name, float(value))  # frozen: 3 -> 3.0 once, while validating

        positive = [
            "lattice_width", "lattice_height", "input_dim", "output_dim", "initial_flows_per_sample",
            "max_active_flows", "carrier_hidden_dim", "carrier_num_layers", "child_rank", "message_dim",
            "position_frequencies", "neuron_hidden_dim", "neuron_output_dim", "injection_rank",
            "face_channels", "readout_hidden_dim", "readout_rank",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lattice_depth < 2:
            raise ValueError(f"lattice_depth: must be >= 2 (an input and an output face), got {self.lattice_depth}")
        for name in ["max_spawn_per_step", "interaction_radius"]:
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ["energy_threshold", "spawn_threshold"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.spawn_threshold <= self.energy_threshold:
            raise ValueError(
                f"spawn_threshold: must be > energy_threshold ({self.energy_threshold}), got {self.spawn_threshold}"
            )
        if self.max_active_flows < self.initial_flows_per_sample:
            raise ValueError(
                f"max_active_flows: must be >= initial_flows_per_sample ({self.initial_flows_per_sample}), "
                f"got {self.max_active_flows}"
            )
        if self.initial_flows_per_sample > self.face_cells:
            raise ValueError(
                f"initial_flows_per_sample: must be <= lattice_width * lattice_height ({self.face_cells}), "
                f"got {self.initial_flows_per_sample}"
            )
        if not 0.0 < self.jump_init < 1.0:
            raise ValueError(f"jump_init: must be in (0, 1) (a fraction of the depth left), got {self.jump_init}")
        if self.max_lateral_step < 0:
            raise ValueError(f"max_lateral_step: must be >= 0, got {self.max_lateral_step}")
        if self.carrier_type not in CARRIER_TYPES:
            raise ValueError(f"carrier_type: must be one of {CARRIER_TYPES}, got {self.carrier_type!r}")
        if self.injection not in INJECTIONS:
            raise ValueError(f"injection: must be one of {INJECTIONS}, got {self.injection!r}")
        if self.readout not in READOUTS:
            raise ValueError(f"readout: must be one of {READOUTS}, got {self.readout!r}")
        if self.position_z_extent < 0:
            raise ValueError(f"position_z_extent: must be >= 0 (0 = lattice_depth - 1), got {self.position_z_extent}")
        if self.input_sequence:
            for name in ("linear_skip", "residual"):
                if getattr(self, name):
                    raise ValueError(f"{name}: reads x as one vector [B, input_dim], but input_sequence is true "
                                     f"(x is [B, T, input_dim]); set {name}: false")
            if self.injection != "face":
                raise ValueError(f"injection: {self.injection!r} lays one vector across the face, but input_sequence "
                                 f"is true (each token starts its own flow); set injection: face")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.residual and self.input_dim != self.output_dim:
            raise ValueError(
                f"residual: needs input_dim == output_dim, got {self.input_dim} and {self.output_dim}"
            )

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[Config], data: dict[str, Any]) -> Config:
        """A validated config of the fields in ``data`` (the others at their defaults); an unknown
        key raises ``ValueError`` listing the allowed ones."""
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a mapping of field names to values, got {type(data).__name__}")
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; allowed keys are {sorted(known)}")
        data = dict(data)
        for name, value in data.items():
            # PyYAML reads `3e-4` (no dot) as a string; for a float field that is plainly a number.
            if known[name] == "float" and isinstance(value, str):
                try:
                    data[name] = float(value)
                except ValueError:
                    pass  # validate() reports it with the field name
        return cls(**data)

    def replace(self: Config, **changes: Any) -> Config:
        """A validated copy with some fields changed (unknown names raise ``ValueError``)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def config_attribute() -> property:
    """The ``config`` attribute of a model part (processor, geometry, faces, step, carrier, neuron),
    kept as ``_config``: the :class:`ModelConfig` of what it is given (an
    :class:`~efgraph.config.EnergyConfig`'s model part).

    Assigned once, in ``__init__``; assigning it again raises ``AttributeError``: a part given a new
    config alone would disagree with the parts that keep the old one.
    """

    def get(part: Any) -> ModelConfig:
        return part._config

    def set_once(part: Any, config: ModelConfig) -> None:
        if "_config" in vars(part):
            raise AttributeError(f"{type(part).__name__}.config: set once, when the model is built; build a new model "
                                 f"from config.replace(...)")
        vars(part)["_config"] = ModelConfig.of(config)

    return property(get, set_once, doc="The part's ModelConfig: frozen, set once (efgraph.core.model_config).")
