"""Probe the step gates of trained ``residual_steps`` runs: what the later steps are worth.

For each run folder (a study's ``<variant>/seed<k>``) it reads the exported model and the run's
validation split and prints one JSON line: the learned raw gates; validation cosine and the
flows arriving at each step with the learned gates, with every later step closed (the one-step
model), half open (0.5) and open (1); and the gradient of the training loss on the first 512
validation pairs with respect to each raw gate at the trained point (negative: opening helps).

Examples::

    python scripts/probe_gates.py runs/study-composition-L3-4x-res/deep-res/seed*
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from efgraph.config import EnergyConfig
from efgraph.model_io import load_model
from efgraph.training.metrics import embedding_loss, evaluate_predictions
from efgraph.training.run import load_pairs

GRADIENT_PAIRS = 512


def probe(run_dir: Path) -> dict:
    """The probe of one run folder (see the module docstring)."""
    proc = load_model(run_dir / "model").eval()
    if proc.flow_step.gates is None:
        raise SystemExit(f"{run_dir}: the model has no step gates (residual_steps: false)")
    cfg = EnergyConfig.from_saved_yaml(run_dir / "config.yaml")  # the run's: its data and loss weights
    pairs = load_pairs(cfg, progress=False)
    val = json.loads((run_dir / "split.json").read_text())["validation"]
    src, tgt = pairs.src[val], pairs.tgt[val]
    learned = proc.flow_step.gates.detach().clone()
    record: dict = {"run": str(run_dir), "gates": [round(float(g), 3) for g in learned]}
    for name, gates in [("learned", learned), ("closed", torch.zeros_like(learned)),
                        ("half", torch.full_like(learned, 0.5)), ("open", torch.ones_like(learned))]:
        with torch.no_grad():
            proc.flow_step.gates.copy_(gates)
            cosine = evaluate_predictions(proc(src), tgt)["cosine"]
        record[name] = {"val_cosine": round(cosine, 4), "arrived_per_step": list(proc.last_trace.arrived)}
    with torch.no_grad():
        proc.flow_step.gates.copy_(learned)
    proc.zero_grad()
    embedding_loss(proc(src[:GRADIENT_PAIRS]), tgt[:GRADIENT_PAIRS], cfg.mse_weight, cfg.cosine_weight).backward()
    record["dloss_dgate"] = [round(float(g), 5) for g in proc.flow_step.gates.grad]
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders of residual_steps runs")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for run_dir in args.runs:
        print(json.dumps(probe(run_dir)), flush=True)


if __name__ == "__main__":
    main()
