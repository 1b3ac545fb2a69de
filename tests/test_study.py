"""Studies: variants x seeds on one split, shared baselines, the table, resuming, the bootstrap."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from efgraph.config import EnergyConfig
from efgraph.training.study import (DATA_KEYS, StudyFile, Variant, bootstrap_against_best_baseline, build_variants,
                                    paired_bootstrap_ci, parse_variant, parse_variant_seeds,
                                    run_study, summarize, two_level_bootstrap_ci, variant_config)

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


def test_two_level_bootstrap_widens_when_seeds_disagree():
    """Seeds that agree and seeds that disagree with the same seed mean: the pair bootstrap of the
    seed means cannot tell them apart; resampling the seeds first must."""
    rng = np.random.default_rng(1)
    n = 800
    b = rng.normal(0.5, 0.2, size=n)
    a_mean = b + 0.01 + rng.normal(0.0, 0.05, size=n)  # per pair: standard error of the mean ~0.002
    agree = np.stack([a_mean, a_mean, a_mean])
    disagree = agree + np.array([[-0.03], [0.0], [0.03]])  # seed offsets: the same seed mean, std 0.03
    np.testing.assert_allclose(disagree.mean(axis=0), a_mean)
    kwargs = dict(resamples=2000, seed=5)
    pairs = paired_bootstrap_ci(a_mean, b, **kwargs)
    calm = two_level_bootstrap_ci(agree, b[None], **kwargs)
    wild = two_level_bootstrap_ci(disagree, b[None], **kwargs)
    assert calm.diff == pytest.approx(pairs.diff) and wild.diff == pytest.approx(pairs.diff)
    # agreeing seeds add nothing: about the pair interval (same statistic, other draws)
    assert calm.high - calm.low == pytest.approx(pairs.high - pairs.low, rel=0.15)
    # disagreeing seeds: the seed level dominates (seed-mean spread ~0.03 * sqrt(2/3) / sqrt(3) ~ 0.014)
    assert wild.high - wild.low > 3 * (pairs.high - pairs.low)
    assert wild.low < 0.0 < 0.01 < wild.high and pairs.low > 0.0  # only the pair interval excludes 0
    # the baseline's seeds count too: a baseline whose seeds disagree widens it as well
    noisy_baseline = np.stack([b - 0.03, b + 0.03])
    assert two_level_bootstrap_ci(agree, noisy_baseline, **kwargs).high - calm.high > 0.01
    assert two_level_bootstrap_ci(disagree, b, **kwargs) == wild  # 1-D is one seed; seeded: reproducible
    with pytest.raises(ValueError, match="same items"):
        two_level_bootstrap_ci(agree, b[:-1])


def _pair_scores(cosine: np.ndarray) -> dict[str, np.ndarray]:
    return {"cosine": cosine, "hit": (cosine > 0.5).astype(np.float64)}


def test_the_baseline_compared_with_is_the_best_on_validation_not_on_test():
    """Two baselines: ``val-best`` is best on validation, ``test-best`` on test. The comparison must
    be with ``val-best`` (a choice on test would flatter or hurt the variants after the fact)."""
    rng = np.random.default_rng(0)
    n, seeds = 300, (0, 1, 2)
    common = rng.uniform(0.3, 0.9, size=n)  # how hard each pair is
    scores = {name: common + shift + rng.normal(0.0, 0.01, size=n) for name, shift in
              (("val-best", 0.0), ("test-best", 0.05), ("full", 0.02))}

    def record(val: float, test: float, **key) -> dict:
        return {**key, "validation": {"cosine": val}, "test": {"cosine": test, "mse": 0.1, "r_at_1": 0.5}}

    baselines = [record(0.90, float(scores["val-best"].mean()), model="val-best", seed=s) for s in seeds]
    baselines += [record(0.80, float(scores["test-best"].mean()), model="test-best", seed=s) for s in seeds]
    runs = [{**record(0.85, float(scores["full"].mean()), variant="full", seed=s), "dead": False,
             "test_dynamics": {}} for s in seeds]
    summary = summarize(runs, baselines)
    assert (summary["baselines"]["test-best"]["test_cosine"]["mean"]
            > summary["baselines"]["val-best"]["test_cosine"]["mean"])  # the trap: test would pick the other
    baseline_pairs = {name: {s: _pair_scores(scores[name]) for s in seeds} for name in ("val-best", "test-best")}
    run_pairs = {"full": {s: _pair_scores(scores["full"] + 0.01 * (s - 1)) for s in seeds}}
    boot = bootstrap_against_best_baseline(summary, run_pairs, baseline_pairs, resamples=200)
    assert boot["against"] == "val-best" and boot["chosen_by"] == "mean validation cosine"
    cos = boot["variants"]["full"]["cosine"]
    assert cos["diff"] == pytest.approx(scores["full"].mean() - scores["val-best"].mean())
    assert cos["diff"] > 0.0  # against the test-best one it would be negative
    assert cos["seed_margins"] == pytest.approx({s: cos["diff"] + 0.01 * (s - 1) for s in seeds})
    assert cos["seed_margin"]["std"] == pytest.approx(0.01)
    assert cos["pairs_ci"][0] < cos["diff"] < cos["pairs_ci"][1]
    assert set(boot["variants"]["full"]) == {"cosine", "r_at_1"}
    # a baseline that lacks a variant's seed is refused, naming it
    del baseline_pairs["val-best"][2]
    with pytest.raises(ValueError, match=r"'val-best': no scores for seed\(s\) \[2\]"):
        bootstrap_against_best_baseline(summary, run_pairs, baseline_pairs, resamples=10)


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
    assert list(study["summary"]["baselines"]) == ["identity", "ridge", "residual-ridge", "residual-mlp",
                                                   "residual-transformer"]
    assert study["bootstrap"]["against"] in study["summary"]["baselines"]
    table = (out / "study.md").read_text()
    for row in ["| full | 0,1 |", "| no-spawn | 0,1 |", "| identity (baseline) |", "| residual-ridge (baseline) |",
                "| residual-mlp (baseline) |", "| residual-transformer (baseline) |",
                "Compare variants on the validation column",
                "Difference to the best baseline on validation", "| full | cosine |", "| no-spawn | R@1 |",
                "seeds + pairs 95% CI"]:
        assert row in table
    assert study["bootstrap"]["against"] == max(study["summary"]["baselines"], key=lambda m: study["summary"][
        "baselines"][m]["val_cosine"]["mean"])
    assert table.count("/2 |") == 2  # dead runs k/n per variant
    # every model's training time beside its scores: a run's and a baseline's fit, seconds over the seeds
    assert "| train s |" in table
    for name in ("full", "residual-mlp"):
        stats = {**study["summary"]["variants"], **study["summary"]["baselines"]}[name]
        assert stats["train_seconds"]["mean"] > 0
        row = next(line for line in table.splitlines() if line.startswith(f"| {name}"))
        assert f"| {stats['train_seconds']['mean']:.0f} ± " in row

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

    # the same study two runs at a time (each its own process, cores / 2 threads): the same numbers
    parallel = _study(tmp_path / "parallel", "--jobs", "2")
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert "(queued, 2 at a time)" in parallel.stdout
    side_by_side = json.loads((tmp_path / "parallel" / "study.json").read_text())
    key = lambda r: (r["variant"], r["seed"], r["test"], r["validation"])  # noqa: E731
    assert [key(r) for r in side_by_side["runs"]] == [key(r) for r in study["runs"]]
    scores = lambda rows: [{**r, "test": {k: v for k, v in r["test"].items() if k != "train_seconds"}}  # noqa: E731
                           for r in rows]  # a wall time is no number to reproduce
    assert scores(side_by_side["baselines"]) == scores(study["baselines"])
    thread_counts = {EnergyConfig.from_yaml(tmp_path / "parallel" / v / f"seed{s}" / "config.yaml").num_threads
                     for v in ("full", "no-spawn") for s in (0, 1)}
    assert thread_counts == {max(1, (os.cpu_count() or 1) // 2)}
    assert _study(tmp_path / "bad", "--jobs", "0").stderr.strip().endswith("--jobs: must be >= 1, got 0")


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


def test_baselines_only_fits_every_seeds_baselines_trains_no_run_and_keeps_the_studys_table(tmp_path):
    base = _tiny_base().replace(baseline_models="mlp", residual=False)
    variants = build_variants(base, ["full"], [0, 1])
    out = tmp_path / "study"
    (out).mkdir()
    (out / "study.md").write_text("the study's own table\n")
    study = run_study(base, variants, out, wandb_mode="disabled", progress=False, report=lambda line: None,
                      bootstrap_resamples=20, baselines_only=True)
    assert study["runs"] == [] and not (out / "full").exists()  # no run trained
    assert {(r["model"], r["seed"]) for r in study["baselines"]} >= {("mlp", 0), ("mlp", 1), ("ridge", 0)}
    assert study["summary"]["baselines"]["mlp"]["runs"] == 2
    assert (out / "study.md").read_text() == "the study's own table\n"  # not overwritten
    table = (out / "baselines.md").read_text()
    assert "| mlp (baseline) | 0,1 |" in table and "Difference to the best baseline" not in table
    assert (out / "baselines.json").exists()


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


def test_parallel_runs_share_the_cores_and_an_explicit_thread_count_is_kept(monkeypatch):
    from efgraph.training.study import threads_per_job

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert threads_per_job(0, 1) == 0  # one run at a time: PyTorch's default, as configured
    assert threads_per_job(0, 2) == 4 and threads_per_job(0, 3) == 2 and threads_per_job(0, 16) == 1
    assert threads_per_job(3, 2) == 3  # the config says so


# ---- study files -----------------------------------------------------------------------------------
STUDY_FILES = sorted((ROOT / "configs" / "studies").glob("*.yaml"))


def test_the_studies_page_runs_every_study_file_by_its_name():
    """configs/studies/README.md, the findings, gives the command of every study."""
    assert len(STUDY_FILES) >= 20
    readme = (ROOT / "configs" / "studies" / "README.md").read_text(encoding="utf-8")
    for path in STUDY_FILES:
        assert re.search(rf"^python scripts/study\.py {re.escape(path.stem)}(?= |$)", readme, re.M), path.stem
    outputs = [StudyFile.read(p).output_dir for p in STUDY_FILES]
    assert len(set(outputs)) == len(outputs)  # no two studies write into one folder


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.stem)
def test_every_study_file_parses_and_builds_its_configs(path):
    """Like a check of every config: the file's keys, its base config (a file in configs/), its
    --set and every variant's config at every seed build without error; nothing trains."""
    spec = StudyFile.read(path)
    config = spec.config_path(ROOT)
    assert config.is_file() and config.parent == ROOT / "configs", spec.config
    assert spec.output_dir.startswith("runs/")
    base = spec.base(ROOT)
    variants = spec.variants(base)
    assert variants and spec.jobs >= 1
    for variant in variants:
        for seed in variant.seeds:
            assert variant_config(base, variant, seed).seed == seed


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("config: configs/debug.yaml\noutput_dir: runs/x\nvariant: {a: {}}\n",
     r"s.yaml: unknown keys \['variant'\]; allowed keys are \['config', 'set', 'variants', 'seeds', "
     r"'variant_seeds', 'jobs', 'output_dir'\]"),
    ("config: configs/debug.yaml\n", r"missing \['output_dir'\]"),
    ("config: configs/debug.yaml\noutput_dir: x\nvariants:\n  a: {}\n  a: {lattice_depth: 4}\n", "given twice"),
    ("config: configs/debug.yaml\noutput_dir: x\nseeds: 0\n", "seeds: expected a list of integer seeds"),
    ("config: configs/debug.yaml\noutput_dir: x\njobs: 0\n", "jobs: expected an integer >= 1"),
    ("config: configs/debug.yaml\noutput_dir: x\nset: {epochs: [1, 2]}\n", "set: epochs: expected a single value"),
    ("- config\n", "expected a mapping"),
])
def test_a_bad_study_file_is_refused_naming_the_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        StudyFile.read(_write(tmp_path, text))


def test_a_study_file_builds_what_the_same_flags_build(tmp_path):
    sets = "\n".join(f"  {item.split('=', 1)[0]}: {item.split('=', 1)[1]}" for item in TINY)
    spec = StudyFile.read(_write(tmp_path, f"config: configs/debug.yaml\nset:\n{sets}\n  baseline_models: ''\n"
                                           "variants:\n  full:\n  deep: {lattice_depth: 6, readout: shared}\n"
                                           "seeds: [0, 1]\nvariant_seeds: {deep: [2]}\noutput_dir: runs/x\n"))
    base = spec.base(ROOT)
    flags = _tiny_base().with_overrides(['baseline_models=""'])
    assert base == flags
    assert spec.variants(base) == build_variants(flags, ["full", "deep:lattice_depth=6,readout=shared"], [0, 1],
                                                 ["deep=2"])
    for text, message in [("variants: {x: {seed: 3}}", "variants: x: seed is set by seeds"),
                          ("variants: {x: {data_seed: 3}}", r"variants: x: \['data_seed'\] change the data"),
                          ("variants: {x: {no_such_key: 1}}", "variants: x: config: unknown keys"),
                          ("variants: {x: }\nvariant_seeds: {y: [1]}", "variant_seeds: no variant named 'y'"),
                          ("set: {lattice_depth: 1}", "s.yaml: set: lattice_depth")]:
        bad = StudyFile.read(_write(tmp_path, f"config: configs/debug.yaml\noutput_dir: x\n{text}\n"))
        with pytest.raises(ValueError, match=message):
            bad.variants(bad.base(ROOT))


def test_study_script_runs_a_study_file_and_refuses_flags_that_the_file_says(tmp_path):
    study = _write(tmp_path, "config: configs/debug.yaml\nset:\n" + "".join(
        f"  {item.split('=', 1)[0]}: {item.split('=', 1)[1]}\n" for item in TINY)
        + "  baseline_models: ''\nvariants: {one: {}}\nseeds: [0]\njobs: 1\noutput_dir: from-file\n")
    script = [sys.executable, str(ROOT / "scripts/study.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra, message in [(["--set", "epochs=2"], "error: --set: the study file"),
                           (["--seeds", "1", "--variant", "x"], "error: --variant, --seeds: the study file")]:
        bad = subprocess.run([*script, str(study), *extra], capture_output=True, text=True, cwd=tmp_path, env=env)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr
    unknown = subprocess.run([*script, "no-such-study"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert unknown.returncode != 0 and "routing-final3" in unknown.stderr  # names the studies there are
    assert not (tmp_path / "from-file").exists()
    # --output-dir may move it: the study runs there, with the file's config, variants and seeds
    proc = subprocess.run([*script, str(study), "--output-dir", "moved", "--wandb-mode", "disabled", "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "moved" / "study.json").read_text())
    assert saved["config_path"] == "configs/debug.yaml"
    assert saved["variants"] == [{"name": "one", "overrides": [], "seeds": [0]}]
    assert saved["base_config"] == _tiny_base().with_overrides(['baseline_models=""']).to_dict()
