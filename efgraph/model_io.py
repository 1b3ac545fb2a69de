"""Using a trained model: load it from a run folder or checkpoint, export it as safetensors + YAML.

The per-sample flow budget the model ran under (``FlowProcessor.active_flow_budget``; with
``flow_budget: adaptive`` the trainer's, below ``max_active_flows``) travels with the weights: in the
checkpoint's ``extra["active_flow_budget"]`` and in the safetensors metadata, so a loaded model
computes the function that was trained and evaluated.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
import yaml

from efgraph.config import EnergyConfig, saved_config_writer
from efgraph.core.flow_processor import FlowProcessor
from efgraph.training.checkpoint import load_checkpoint

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def export_model(processor: FlowProcessor, folder: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.yaml`` (the model's :class:`ModelConfig`) into
    ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in processor.state_dict().items()}
    metadata = {"active_flow_budget": str(int(processor.active_flow_budget))}
    safetensors.torch.save_file(state, str(folder / WEIGHTS_FILE), metadata=metadata)
    processor.config.to_yaml(folder / CONFIG_FILE)
    return folder


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> FlowProcessor:
    """A ready model in eval mode, with its config at ``model.config``.

    ``path`` may be a run folder (uses ``checkpoints/best.pt``, else ``checkpoints/last.pt``, else
    an exported ``model.safetensors``), a checkpoint ``.pt`` (loaded with ``weights_only=True``),
    or a ``.safetensors`` file with ``config.yaml`` beside it.

    The saved config may come from an older efgraph: a field it lacks takes the value that
    reproduces what that version computed (:meth:`EnergyConfig.from_saved`); where nothing does, or
    the weights do not fit this version's model, ``ValueError`` says so in one line.
    """
    path = Path(path)
    if path.is_dir():
        for candidate in [path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt", path / WEIGHTS_FILE]:
            if candidate.exists():
                return load_model(candidate, map_location)
        raise FileNotFoundError(f"{path}: no checkpoints/best.pt, checkpoints/last.pt or {WEIGHTS_FILE} in this folder")
    if path.suffix == ".safetensors":
        config_path = path.with_name(CONFIG_FILE)
        if not config_path.exists():
            raise FileNotFoundError(f"{path}: expected its config at {config_path}")
        saved = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        config = EnergyConfig.model_from_saved(saved, str(config_path))
        state = safetensors.torch.load_file(str(path), device=str(map_location))
        with safetensors.safe_open(str(path), framework="pt") as fh:
            budget = (fh.metadata() or {}).get("active_flow_budget")
    else:
        ckpt = load_checkpoint(path, map_location=map_location)
        saved = ckpt["config"]
        config = EnergyConfig.model_from_saved(saved, str(path))
        state = ckpt["model"]
        budget = (ckpt.get("extra") or {}).get("active_flow_budget")
    model = FlowProcessor.from_config(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        problem = f"missing {missing[:5]}, unexpected {unexpected[:5]}" if missing or unexpected else ""
    except RuntimeError as err:  # a tensor of another shape
        problem = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
    if problem:
        raise ValueError(f"{path}: its weights do not fit this efgraph's model of its config ({problem}); written by "
                         f"{saved_config_writer(saved)}: load it with the efgraph that wrote it")
    if budget is not None:  # files written before the budget was saved ran under max_active_flows
        model.active_flow_budget = min(int(budget), config.max_active_flows)
    return model.to(map_location).eval()
