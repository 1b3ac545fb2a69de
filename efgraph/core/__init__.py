"""The engine: lattice, neuron, carrier, flow state and the processor that runs a forward."""

from efgraph.core.energy_carrier import EnergyCarrier
from efgraph.core.energy_lattice import EnergyLattice
from efgraph.core.flow_processor import FlowProcessor
from efgraph.core.flow_state import FlowState
from efgraph.core.message_passing import FlowToCellConv
from efgraph.core.simple_neuron import SimpleNeuron
from efgraph.core.trace import FlowTrace

__all__ = ["EnergyCarrier", "EnergyLattice", "FlowProcessor", "FlowState", "FlowToCellConv", "FlowTrace", "SimpleNeuron"]
