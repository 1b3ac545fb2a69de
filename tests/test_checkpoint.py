"""Checkpoints: exact resume, weights_only loading, corruption detection, atomic writes."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from efgraph.config import EnergyConfig
from efgraph.training.checkpoint import (
    ARCHITECTURE_KEYS,
    check_compatible,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)  # consumes torch RNG during training, so RNG restore matters
        # A buffer with distinctive bytes, to locate tensor data inside the file.
        self.register_buffer("marker", torch.arange(64, dtype=torch.float32) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.lin(x))


def _setup(seed: int):
    torch.manual_seed(seed)
    model = _Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched, steps: int) -> None:
    """Steps whose data, dropout masks and noise all come from the global RNGs."""
    for _ in range(steps):
        x = torch.randn(8, 4) + float(np.random.rand()) + random.random()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()), torch.rand(3)


def _save(path: Path, model, opt=None, sched=None, step: int = 3, **kw) -> Path:
    return save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, step=step, epoch=1,
                           config={"lattice_width": 4, "lr": 0.05}, **kw)


def test_round_trip_resumes_exactly(tmp_path: Path) -> None:
    model, opt, sched = _setup(0)
    _train(model, opt, sched, 3)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state: it must survive too
    np.random.randn()
    path = _save(tmp_path / "ckpt.pt", model, opt, sched, extra={"best_val": 0.25})
    saved_params = {k: v.clone() for k, v in model.state_dict().items()}
    saved_lr = opt.param_groups[0]["lr"]
    expected_draws = _draws()
    _train(model, opt, sched, 3)
    expected_params = {k: v.clone() for k, v in model.state_dict().items()}

    # A fresh process's view: other init, other RNG state.
    model2, opt2, sched2 = _setup(99)
    random.seed(7)
    np.random.seed(7)
    ckpt = load_checkpoint(path)
    assert (ckpt["step"], ckpt["epoch"]) == (3, 1)
    assert ckpt["config"] == {"lattice_width": 4, "lr": 0.05}
    assert ckpt["extra"] == {"best_val": 0.25}
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    for k, v in saved_params.items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert opt2.param_groups[0]["lr"] == saved_lr and sched2.last_epoch == 3
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], ckpt["optimizer"]["state"][0]["exp_avg"])

    restore_rng_state(ckpt)
    got = _draws()
    assert got[:4] == expected_draws[:4]
    assert torch.equal(got[4], expected_draws[4])

    # Resuming (same draws, then the same steps) is bit-identical to never having stopped.
    _train(model2, opt2, sched2, 3)
    for k, v in expected_params.items():
        assert torch.equal(model2.state_dict()[k], v), k


def test_file_loads_with_plain_weights_only(tmp_path: Path) -> None:
    model, opt, sched = _setup(0)
    _train(model, opt, sched, 1)
    path = _save(tmp_path / "c.pt", model, opt, sched, extra={"arr": torch.ones(2), "tag": ("a", 1)})
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw["rng"]["python"]["state"], list)
    assert isinstance(raw["rng"]["numpy"]["keys"], torch.Tensor)
    assert raw["extra"]["tag"] == ("a", 1)


def test_config_dataclass_and_numpy_scalars_are_stored_plain(tmp_path: Path) -> None:
    model = _Net()
    cfg = EnergyConfig()
    save_checkpoint(tmp_path / "c.pt", model=model, step=np.int64(2), epoch=0, config=cfg,
                    extra={"score": np.float32(0.5), "dir": tmp_path})
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["config"] == cfg.to_dict()
    assert EnergyConfig.from_dict(ckpt["config"]) == cfg
    assert ckpt["extra"] == {"score": 0.5, "dir": str(tmp_path)}
    assert type(ckpt["extra"]["score"]) is float and ckpt["step"] == 2
    assert ckpt["optimizer"] is None and ckpt["scheduler"] is None


def test_wrapped_model_saves_unprefixed_keys(tmp_path: Path) -> None:
    model = _Net()
    save_checkpoint(tmp_path / "c.pt", model=nn.DataParallel(model), step=0, epoch=0, config={})
    assert set(load_checkpoint(tmp_path / "c.pt")["model"]) == set(model.state_dict())


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0])
def test_truncated_file_raises_clear_error(tmp_path: Path, keep: float) -> None:
    path = _save(tmp_path / "c.pt", _Net())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"c\.pt.*(truncated|corrupted)"):
        load_checkpoint(path)


def test_flipped_byte_in_tensor_data_is_detected(tmp_path: Path) -> None:
    model = _Net()
    path = _save(tmp_path / "c.pt", model)
    data = bytearray(path.read_bytes())
    where = data.find(model.marker.numpy().tobytes())
    assert where > 0
    data[where + 10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"c\.pt.*corrupted"):
        load_checkpoint(path)


def test_foreign_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.save(_Net().state_dict(), path)
    with pytest.raises(ValueError, match="not an efgraph checkpoint"):
        load_checkpoint(path)


def test_interrupted_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _Net()
    path = _save(tmp_path / "c.pt", model, step=1)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        _save(path, model, step=2)
    with pytest.raises(RuntimeError, match="disk full"):
        _save(tmp_path / "new.pt", model, step=2)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]  # no temp file left, no half-written new.pt


def test_unloadable_values_are_refused_before_writing(tmp_path: Path) -> None:
    model = _Net()
    path = _save(tmp_path / "c.pt", model, step=1)

    for extra, where in [({"ids": {1, 2}}, "extra"), ({"obj": object()}, "extra"), ({"a": np.zeros(2)}, "extra")]:
        with pytest.raises(TypeError, match=rf"checkpoint\['{where}'\]"):
            _save(path, model, step=2, extra=extra)
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


def test_check_compatible_names_differing_keys() -> None:
    saved = EnergyConfig().to_dict()
    current = EnergyConfig(lattice_width=30, learning_rate=1e-3)
    check_compatible(saved, EnergyConfig().to_dict(), ARCHITECTURE_KEYS)  # same architecture: fine
    check_compatible(saved, EnergyConfig(learning_rate=1e-3), ARCHITECTURE_KEYS)  # training knob: fine
    with pytest.raises(ValueError, match=r"lattice_width: checkpoint=20, current=30") as err:
        check_compatible(saved, current, ARCHITECTURE_KEYS)
    assert "learning_rate" not in str(err.value) and "lattice_height" not in str(err.value)
    with pytest.raises(ValueError, match=r"carrier_type: checkpoint=<missing>, current='gru'"):
        check_compatible({k: v for k, v in saved.items() if k != "carrier_type"}, current, ["carrier_type"])
    with pytest.raises(TypeError, match="keys"):
        check_compatible(saved, current, "lattice_width")


def test_architecture_keys_are_config_fields() -> None:
    fields = {f.name for f in dataclasses.fields(EnergyConfig)}
    assert set(ARCHITECTURE_KEYS) <= fields
