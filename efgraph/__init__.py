"""efgraph: energy-flow neural networks on a sparse 3D lattice, built on PyTorch Geometric.

Usage::

    from efgraph import EnergyLattice, SimpleNeuron, FlowProcessor, create_debug_config
    config = create_debug_config()
    lattice = EnergyLattice(config)
    neuron = SimpleNeuron(config)
    processor = FlowProcessor(lattice, neuron, config)
    y = processor(x)                 # x [B, input_dim] -> y [B, output_dim]
    processor.last_trace.summary()   # what the flows did
    EnergyTrainer(processor, config).train(inputs, targets, epochs=5)
"""

from typing import Any

from efgraph.config import EnergyConfig, create_debug_config, create_experiment_config, create_optimized_config
from efgraph.core import (EnergyCarrier, EnergyLattice, FlowProcessor, FlowState, FlowToCellConv, FlowTrace, ModelConfig,
                          SimpleNeuron)

__version__ = "0.1.0"

# the trainer and the model files (which read checkpoints) are imported when first used, so that
# importing the engine (efgraph, efgraph.core) loads no training code
_LAZY = {"EnergyTrainer": "efgraph.training", "export_model": "efgraph.model_io", "load_model": "efgraph.model_io"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'efgraph' has no attribute {name!r}")


__all__ = [
    "EnergyCarrier", "EnergyConfig", "EnergyLattice", "FlowProcessor", "FlowState", "FlowToCellConv", "FlowTrace",
    "ModelConfig",
    "EnergyTrainer", "SimpleNeuron", "create_debug_config", "export_model", "load_model", "create_experiment_config", "create_optimized_config",
]
