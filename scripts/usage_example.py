"""The seed's usage example: build a model from a config, run a batch, look at what the flows did.

    python scripts/usage_example.py
"""

from __future__ import annotations

import torch

from efgraph import EnergyLattice, FlowProcessor, SimpleNeuron, create_debug_config


def main() -> None:
    torch.manual_seed(0)
    # the debug preset with a smaller carrier so that this runs in a second on a laptop CPU
    config = create_debug_config(carrier_hidden_dim=128)
    lattice = EnergyLattice(config)
    neuron = SimpleNeuron(config)
    processor = FlowProcessor(lattice, neuron, config)

    x = torch.randn(config.batch_size, config.input_dim)
    y = processor(x)
    print(f"input {tuple(x.shape)} -> output {tuple(y.shape)}")

    trace = processor.last_trace
    print("per step:", {k: [round(v, 3) for v in vals] for k, vals in trace.as_dict().items()})
    print("summary:", {k: round(v, 3) for k, v in trace.summary().items()})

    loss = torch.nn.functional.mse_loss(y, torch.randn_like(y))
    loss.backward()
    print(f"loss {loss.item():.4f}; parameters: {sum(p.numel() for p in processor.parameters()):,}")


if __name__ == "__main__":
    main()
