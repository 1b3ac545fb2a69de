"""What the flows of a trained lookup model do, per chain length (issue 34's diagnostics).

For each run folder of ``dataset: lookup`` (``scripts/train.py --config configs/lookup.yaml`` or a
study's ``runs/study-lookup/<variant>/seed<k>``), the selected model reads the validation chains
(lengths 2-5, at the training depth) and the test chains (lengths 6-10, at the run's ``test_depth``),
and this prints, per length: the answer accuracy, the lattice steps a forward took, the steps a flow
took (flow-steps / flows injected: does the work grow with the chain?), the share of flows that
died, arrived in the first half of the steps and arrived at all, the mean lateral move per step and
the flows a flow heard. It draws the flow paths of one length-8 chain (``flow_paths_len8.png`` in
the run folder) and writes the table as JSON with ``--json``.

    python scripts/lookup_flows.py runs/study-lookup/lattice/seed0 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from efgraph import EnergyConfig, load_model  # noqa: E402
from efgraph.core.flow_processor import FlowProcessor  # noqa: E402
from efgraph.core.trace import FlowTrace  # noqa: E402
from efgraph.training.figures import flow_paths_figure  # noqa: E402
from efgraph.training.metrics import answer_accuracy  # noqa: E402
from efgraph.training.run import lookup_data  # noqa: E402


def _traced(model: FlowProcessor, seq: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, FlowTrace]:
    """One evaluation forward with every flow's path recorded: ``(y, its trace)``."""
    model.eval()
    model.record_paths = True
    try:
        with torch.no_grad():
            return model(seq, mask), model.last_trace
    finally:
        model.record_paths = False


def flow_statistics(trace: FlowTrace) -> dict[str, float]:
    """Per-flow averages of one traced forward: steps taken, died / arrived shares, lateral move."""
    positions: dict[int, list[list[float]]] = defaultdict(list)
    for record in trace.paths[:-1]:  # the steps' flows (the last record is the landings)
        for flow, pos in zip(record["flow_id"].tolist(), record["pos"].tolist()):
            positions[flow].append(pos)
    moves = [abs(b[0] - a[0]) + abs(b[1] - a[1]) for ps in positions.values() for a, b in zip(ps, ps[1:])]
    flows = trace.initial_flows + trace.total_spawned
    half = max(trace.num_steps // 2, 1)
    return {
        "steps": float(trace.num_steps),
        "steps_per_flow": sum(trace.active) / max(flows, 1),
        "died": trace.total_died / max(flows, 1),
        "arrived_first_half": sum(trace.arrived[:half]) / max(flows, 1),
        "arrived": trace.total_arrived / max(flows, 1),
        "lateral_move_per_step": sum(moves) / max(len(moves), 1),
        "flows_heard": trace.summary()["neighbourhood_flows"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of dataset: lookup")
    parser.add_argument("--json", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for run in args.runs:
        config = EnergyConfig.from_saved_yaml(run / "config.yaml")
        if config.dataset != "lookup":
            parser.error(f"{run}: dataset is {config.dataset!r}, not lookup")
        bench = lookup_data(config)
        model = load_model(run)
        deep = model.at_depth(config.test_depth) if config.test_depth else model
        rows: dict[str, dict[str, float]] = {}
        for split, reader in ((bench.validation, model), (bench.test, deep)):
            for length in sorted(set(split.lengths.tolist())):
                part = split.rows((split.lengths == length).nonzero().squeeze(1))
                pred, trace = _traced(reader, part.seq, part.mask)
                stats = flow_statistics(trace)
                stats["accuracy"] = answer_accuracy(pred, part.tgt, bench.answers)
                rows[f"L{length}"] = stats
                if length == 8:
                    flow_paths_figure({f"trained, a length-8 test chain at depth {deep.config.lattice_depth}": trace},
                                      deep.config, run / "flow_paths_len8.png", samples=(0,))
        table[str(run)] = rows
        print(f"\n{run} (depth {config.lattice_depth}, test at {deep.config.lattice_depth})\n")
        columns = list(next(iter(rows.values())))
        print("| length | " + " | ".join(columns) + " |")
        print("|---|" + "---:|" * len(columns))
        for name, stats in rows.items():
            print(f"| {name} | " + " | ".join(f"{stats[c]:.3f}" for c in columns) + " |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
