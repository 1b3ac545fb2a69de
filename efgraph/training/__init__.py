"""Training: the loop, its loss and metrics, baselines, checkpoints, logging and figures."""

from efgraph.training.baselines import (IdentityBaseline, MLPBaseline, ResidualRidgeBaseline, RidgeBaseline,
                                        fit_baselines, format_results_table, run_baselines)
from efgraph.training.checkpoint import load_checkpoint, save_checkpoint
from efgraph.training.loop import Trainer
from efgraph.training.metrics import embedding_loss, evaluate_predictions
from efgraph.training.run_logger import RunLogger, resolve_wandb_mode
from efgraph.training.trainer import EnergyTrainer, TrainResult

__all__ = [
    "EnergyTrainer", "IdentityBaseline", "MLPBaseline", "ResidualRidgeBaseline", "RidgeBaseline", "RunLogger",
    "TrainResult", "Trainer", "embedding_loss", "evaluate_predictions", "fit_baselines", "format_results_table", "load_checkpoint", "resolve_wandb_mode",
    "run_baselines", "save_checkpoint",
]
