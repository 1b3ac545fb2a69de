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

from efgraph.config import EnergyConfig, create_debug_config, create_experiment_config, create_optimized_config
from efgraph.core import EnergyCarrier, EnergyLattice, FlowProcessor, FlowState, FlowToCellConv, FlowTrace, SimpleNeuron
from efgraph.model_io import export_model, load_model
from efgraph.training import EnergyTrainer

__version__ = "0.1.0"

__all__ = [
    "EnergyCarrier", "EnergyConfig", "EnergyLattice", "FlowProcessor", "FlowState", "FlowToCellConv", "FlowTrace",
    "EnergyTrainer", "SimpleNeuron", "create_debug_config", "export_model", "load_model", "create_experiment_config", "create_optimized_config",
]
