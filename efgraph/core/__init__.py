"""The engine: the lattice's geometry, its input face, one step, its output face, and the processor
that runs a forward (inject -> step until empty -> read out). Imports nothing of the training code."""

from efgraph.core.energy_carrier import EnergyCarrier
from efgraph.core.energy_lattice import EnergyLattice
from efgraph.core.flow_processor import FlowProcessor
from efgraph.core.flow_state import FlowState
from efgraph.core.flow_step import FlowStep
from efgraph.core.input_face import InputFace
from efgraph.core.message_passing import FlowToCellConv
from efgraph.core.model_config import ModelConfig
from efgraph.core.readout import OutputFace
from efgraph.core.simple_neuron import SimpleNeuron
from efgraph.core.trace import FlowTrace

__all__ = ["EnergyCarrier", "EnergyLattice", "FlowProcessor", "FlowState", "FlowStep", "FlowToCellConv", "FlowTrace",
           "InputFace", "ModelConfig", "OutputFace", "SimpleNeuron"]
