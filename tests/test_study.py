"""Studies: variants x seeds on one split, shared baselines, the table, resuming, the bootstrap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from efgraph.config import EnergyConfig
from efgraph.training.study import (DATA_KEYS, Variant, build_variants, paired_bootstrap_ci, parse_variant,
                                    parse_variant_seeds, run_study)

TINY = [
    "dataset=synthetic", "synthetic_pairs=120", "input_dim=12", "output_dim=12", "residual=true", "lattice_width=5",
    "lattice_height=5", "lattice_depth=5", "initial_flows_per_sample=3", "max_active_flows=8",
    "carrier_hidden_dim=16", "carrier_num_layers=1", "face_channels=8", "readout_hidden_dim=16",
    "batch_size=16", "epochs=1", "eval_every=3", "log_every=2", "checkpoint_every=4", "warmup_steps=2",
]


def _tiny_base() -> EnergyConfig:
    return EnergyConfig.from_yaml(ROOT / "configs/debug.yaml").with_overrides(TINY)


# ---- bootstrap -------------------------------------------------------------------------------------
def test_paired_bootstrap_ci_brackets_a_known_difference():
    rng = np.random.default_rng(0)
    b = rng.normal(0.5, 0.2, size=2000)
    a = b + 0.05 + rng.normal(0.0, 0.1, size=2000)  # true mean difference 0.05, standard error ~0.002
    ci = paired_bootstrap_ci(a, b, resamples=1000, seed=3)
    assert ci.diff == pytest.approx(np.mean(a - b))
    assert ci.low < 0.05 < ci.high and ci.low > 0.0  # brackets the truth, excludes "no difference"
    assert ci.high - ci.low < 0.02
    assert paired_bootstrap_ci(a, b, resamples=1000, seed=3) == ci  # seeded: reproducible
    # pairing: a constant shift has no sampling spread at all, however noisy the pairs themselves are
    shifted = paired_bootstrap_ci(b + 0.1, b, resamples=200)
    assert shifted.low == pytest.approx(0.1) and shifted.high == pytest.approx(0.1)
    # with no true difference the interval covers 0
    null = paired_bootstrap_ci(b + rng.normal(0.0, 0.1, size=2000), b, resamples=1000)
    assert null.low < 0.0 < null.high


@pytest.mark.parametrize("kwargs, message", [
    (dict(a=np.zeros(3), b=np.zeros(4)), "a, b"),
    (dict(a=np.zeros(0), b=np.zeros(0)), "a, b"),
    (dict(a=np.array([0.0, np.nan]), b=np.zeros(2)), "NaN"),
    (dict(a=np.zeros(3), b=np.zeros(3), resamples=0), "resamples"),
    (dict(a=np.zeros(3), b=np.zeros(3), level=1.0), "level"),
])
def test_paired_bootstrap_ci_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap_ci(**kwargs)


# ---- variants --------------------------------------------------------------------------------------
def test_variant_specs_parse_and_bad_ones_name_the_variant():
    assert parse_variant("no-spawn:max_spawn_per_step=0, residual=false") == (
        "no-spawn", ["max_spawn_per_step=0", "residual=false"])
    assert parse_variant("full") == ("full", [])
    assert parse_variant_seeds("full=0,1,4") == ("full", [0, 1, 4])
    base = _tiny_base()
    variants = build_variants(base, ["full", "deep:lattice_depth=6"], [0, 1], ["deep=2,3,4"])
    assert variants == [Variant("full", (), (0, 1)), Variant("deep", ("lattice_depth=6",), (2, 3, 4))]
    assert build_variants(base, [], [0]) == [Variant("full", (), (0,))]
    for specs, seeds, extra, message in [
        (["a", "a"], [0], [], "duplicate"),
        (["bad name"], [0], [], "name 'bad name'"),
        (["baselines"], [0], [], "reserved"),
        (["x:lattice_depth"], [0], [], "not key=value"),
        (["x:seed=3"], [0], [], "--variant x: seed"),
        (["x:data_seed=3"], [0], [], r"--variant x: \['data_seed'\] change the data"),
        (["x:no_such_key=1"], [0], [], "--variant x: config: unknown keys"),
        (["x:lattice_depth=1"], [0], [], "--variant x: lattice_depth"),
        (["x"], [0, 0], [], "--seeds"),
        (["x"], [0], ["y=1"], "no variant named 'y'"),
        (["x"], [0], ["x=a"], "--variant-seeds"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_variants(base, specs, seeds, extra)
    assert "data_seed" in DATA_KEYS and "seed" not in DATA_KEYS


# ---- the script end to end -------------------------------------------------------------------------
def _study(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts/study.py"), "--config", str(ROOT / "configs/debug.yaml"),
           "--output-dir", str(out), "--wandb-mode", "disabled", "--no-progress",
           "--variant", "full", "--variant", "no-spawn:max_spawn_per_step=0", "--seeds", "0", "1", *extra]
    for item in TINY:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=out.parent)


def test_study_script_trains_variants_x_seeds_on_one_split_and_resumes(tmp_path):
    out = tmp_path / "study"
    first = _study(out)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = [out / v / f"seed{s}" for v in ("full", "no-spawn") for s in (0, 1)]
    for run_dir in runs:
        for name in ("results.json", "test_pairs.npz", "config.yaml", "checkpoints/best.pt"):
            assert (run_dir / name).exists(), run_dir / name
        assert (run_dir / "split.json").read_text() == (out / "split.json").read_text()
        assert "residual-ridge" not in json.loads((run_dir / "results.json").read_text())["test"]  # no per-run baselines
    assert {p.name for p in (out / "baselines").iterdir()} == {"seed0", "seed1"}  # once per seed, not per variant
    for line in ["run 1/4 full seed 0: training", "run 4/4 no-spawn seed 1: training", "baselines seed 1: fitting"]:
        assert line in first.stdout

    study = json.loads((out / "study.json").read_text())
    assert set(study) == {"name", "config_path", "base_config", "variants", "baseline_seeds", "split", "num_parameters",
                          "runs", "baselines", "summary", "bootstrap", "elapsed_seconds"}
    assert [(r["variant"], r["seed"]) for r in study["runs"]] == [("full", 0), ("full", 1), ("no-spawn", 0),
                                                                   ("no-spawn", 1)]
    run = study["runs"][0]
    assert set(run["test"]) == {"cosine", "mse", "r_at_1"} and set(run["validation"]) >= {"cosine", "step"}
    assert run["dead"] in (True, False) and "flows_energy_arrived_fraction" in run["test_dynamics"]
    assert study["summary"]["variants"]["no-spawn"]["spawned_per_sample"]["mean"] == 0.0  # the override took
    assert list(study["summary"]["baselines"]) == ["identity", "ridge", "residual-ridge", "residual-mlp"]
    assert study["bootstrap"]["against"] in study["summary"]["baselines"]
    table = (out / "study.md").read_text()
    for row in ["| full | 0,1 |", "| no-spawn | 0,1 |", "| identity (baseline) |", "| residual-ridge (baseline) |",
                "| residual-mlp (baseline) |", "Compare variants on the validation column"]:
        assert row in table
    assert table.count("/2 |") == 2  # dead runs k/n per variant

    # a second invocation reads every finished run and trains nothing
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    again = _study(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stdout and again.stdout.count("done already") == 6  # 4 runs + 2 baseline seeds
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == finished
    assert json.loads((out / "study.json").read_text())["runs"] == study["runs"]

    # a run stopped before its report resumes from its checkpoint and ends with the same numbers
    (out / "no-spawn/seed1/results.json").unlink()
    resumed = _study(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "run 4/4 no-spawn seed 1: resuming" in resumed.stdout and resumed.stdout.count("resuming") == 1
    after = json.loads((out / "study.json").read_text())["runs"][3]
    before = study["runs"][3]
    assert (after["test"], after["validation"], after["dead"]) == (before["test"], before["validation"], before["dead"])

    # the folder belongs to this study: another base config is refused, naming the field
    other = _study(out, "--set", "learning_rate=0.5")
    assert other.returncode != 0 and "learning_rate: study has" in other.stderr


def test_each_run_is_its_own_wandb_run_grouped_by_study_and_variant(tmp_path, monkeypatch):
    from efgraph.training import run as run_module

    filed = []
    real_create = run_module.RunLogger.create

    def recording_create(run_dir, **kwargs):
        filed.append({k: kwargs[k] for k in ("name", "group", "job_type", "tags")})
        return real_create(run_dir, **kwargs)

    monkeypatch.setattr(run_module.RunLogger, "create", staticmethod(recording_create))
    base = _tiny_base()
    variants = build_variants(base, ["full", "wide:readout_hidden_dim=20"], [0])
    lines: list[str] = []
    study = run_study(base, variants, tmp_path / "ablation", wandb_mode="disabled", progress=False,
                      report=lines.append, bootstrap_resamples=50)
    assert filed == [
        {"name": "ablation-full-seed0", "group": "ablation", "job_type": "full", "tags": ("full", "seed0")},
        {"name": "ablation-wide-seed0", "group": "ablation", "job_type": "wide", "tags": ("wide", "seed0")},
    ]
    assert all(line.startswith("[study ablation 0:") for line in lines)  # which study, elapsed time
    assert study["bootstrap"]["resamples"] == 50
    # the same folder with another meaning for a variant name is refused, not silently mixed
    with pytest.raises(ValueError, match="wide/seed0: holds a run of another config.*readout_hidden_dim"):
        run_study(base, build_variants(base, ["wide:readout_hidden_dim=24"], [0]), tmp_path / "ablation",
                  wandb_mode="disabled", progress=False, report=lines.append)


def test_study_script_help_documents_every_flag_and_refuses_a_bad_variant(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/study.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ["--config", "--variant", "--seeds", "--variant-seeds", "--set", "--wandb-mode", "--output-dir",
                 "--no-progress", "--name", "--device"]:
        assert flag in proc.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/study.py"), "--config", str(ROOT / "configs/debug.yaml"),
                          "--variant", "x:seed=1", "--output-dir", str(tmp_path / "s")], capture_output=True, text=True)
    assert bad.returncode != 0 and "error: --variant x: seed is set by --seeds" in bad.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was written
