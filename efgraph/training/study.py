"""A study: named variants of one config x model seeds, on one split, against shared baselines.

Each (variant, seed) is an ordinary run of :func:`~efgraph.training.run.run_training` (its own run
folder and W&B run, grouped by the study's name, with the variant as job type), trained on the
same pairs and the same split (fixed by ``data_seed``). The baselines are fitted once per seed, not
once per variant; the MLP gets the parameter count of the *base* config (the full model, which no
variant changes).

Layout of the output folder::

    OUT/study_config.yaml          the base config (a rerun must use the same one)
    OUT/split.json                 the one split of every run
    OUT/baselines/seed<k>/         results.json (test and validation metrics) + test_pairs.npz
    OUT/<variant>/seed<k>/         a run folder (results.json, test_pairs.npz, checkpoints, ...)
    OUT/study.json                 every run's numbers, the summary and the bootstrap
    OUT/study.md                   the same as Markdown tables (see :func:`format_study_table`)

Resumable: a run folder with ``results.json`` is read, not retrained; one with only
``checkpoints/last.pt`` is resumed; baselines likewise. Variants may be added on a rerun.

Model selection happens on validation only: every run keeps its best-validation state and reads
the test split once, with that state. Variants should be compared on the validation columns; the
test columns and the bootstrap are the final report. The baseline the bootstrap compares with is
also chosen on validation (:func:`bootstrap_against_best_baseline`).
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import yaml

from efgraph.config import EnergyConfig
from efgraph.core.flow_processor import FlowProcessor
from efgraph.data import EmbeddingPairs, Split
from efgraph.data._atomic import atomic_write_text
from efgraph.training.metrics import load_pair_scores, save_pair_scores
from efgraph.training.run import (TEST_METRICS, WandbRunInfo, config_changes, load_pairs, make_run_split, run_training,
                                  score_baselines, score_predictions)
from efgraph.utils.device import apply_num_threads

# Config fields that decide the pairs or the split: shared by every run of a study, so a variant
# may not set them (use --set for all runs).
DATA_KEYS = ("dataset", "data_path", "source_version", "target_version", "max_pairs", "verses_per_book",
             "synthetic_pairs", "embedding_model", "val_fraction", "test_fraction", "data_seed", "input_dim",
             "output_dim", "routing_slots", "routing_token_dim", "routing_noise", "composition_values",
             "composition_tables", "composition_chain", "composition_hold_out", "composition_identity")
BASELINES_DIR = "baselines"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# scored on tasks with a finite set of answers (composition) beside TEST_METRICS
ANSWER_METRIC = "answer_accuracy"
# flows_<key> of a run's test evaluation shown in the table: (key, column header)
DYNAMICS_COLUMNS = (("energy_arrived_fraction", "energy arriving"), ("spawned_per_sample", "spawns / sample"),
                    ("neighbourhood_flows", "flows / neighbourhood"))


@dataclass(frozen=True)
class Variant:
    """A named set of config overrides (``key=value`` strings) trained with each of ``seeds``."""

    name: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]


# ---- command-line specs ----------------------------------------------------------------------------
def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``"NAME[:key=value,key=value]"`` -> ``(NAME, ["key=value", ...])``.

    Raises:
        ValueError: naming ``--variant`` and the spec, for a bad name or an item without ``=``.
    """
    name, _, rest = spec.partition(":")
    name = name.strip()
    _check_name(name, f"--variant {spec!r}")
    items = [item.strip() for item in rest.split(",") if item.strip()] if rest else []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--variant {spec!r}: {item!r} is not key=value")
    return name, items


def parse_variant_seeds(spec: str) -> tuple[str, list[int]]:
    """``"NAME=0,1,2"`` -> ``(NAME, [0, 1, 2])``.

    Raises:
        ValueError: naming ``--variant-seeds`` and the spec, unless it is a name, ``=`` and a
            comma-separated list of distinct integers >= 0.
    """
    name, eq, rest = spec.partition("=")
    name = name.strip()
    try:
        seeds = [int(s) for s in rest.split(",") if s.strip()] if eq else []
    except ValueError:
        seeds = []
    if not name or not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--variant-seeds {spec!r}: expected NAME=SEED,SEED,... with distinct seeds >= 0, "
                         f"e.g. full=0,1,2,3,4")
    return name, seeds


def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{what}: name {name!r} must start with a letter or digit and hold only letters, "
                         "digits, '.', '_' and '-' (it names a folder)")
    if name == BASELINES_DIR:
        raise ValueError(f"{what}: {BASELINES_DIR!r} is reserved for the baselines' folder")


def build_variants(base: EnergyConfig, specs: Sequence[str], seeds: Sequence[int],
                   variant_seeds: Sequence[str] = ()) -> list[Variant]:
    """Variants from ``--variant`` specs (none: one variant ``full`` with no overrides).

    Every variant runs ``seeds`` unless ``variant_seeds`` (``NAME=S,S``) names it. Each variant's
    config is built here, so a bad override fails before anything trains.

    Raises:
        ValueError: naming the variant for a duplicate name, an override of ``seed`` (that is
            what the seeds are for), of a data or split field (see :data:`DATA_KEYS`; use
            ``--set`` for all runs), or an unknown / invalid field; naming ``--seeds`` or
            ``--variant-seeds`` for bad seeds or a seed list of an unknown variant.
    """
    parsed = [parse_variant(spec) for spec in specs]
    names = [name for name, _ in parsed] or ["full"]
    per_variant: dict[str, list[int]] = {}
    for spec in variant_seeds:
        name, own = parse_variant_seeds(spec)
        if name not in names:
            raise ValueError(f"--variant-seeds {spec!r}: no variant named {name!r} (variants: {names})")
        per_variant[name] = own
    return _variants(base, parsed, seeds, per_variant, _FLAGS)


# how build_variants' errors name what was wrong: command-line flags, or a study file's keys
_FLAGS = {"variant": "--variant", "seeds": "--seeds", "variant_seeds": "--variant-seeds", "set": "--set"}
_FILE_KEYS = {"variant": "variants:", "seeds": "seeds", "variant_seeds": "variant_seeds", "set": "set"}


def _variants(base: EnergyConfig, parsed: Sequence[tuple[str, list[str]]], seeds: Sequence[int],
              per_variant: dict[str, list[int]], say: dict[str, str]) -> list[Variant]:
    """:func:`build_variants` of parsed ``(name, overrides)``; ``say`` names the flags or keys."""
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"{say['seeds']}: expected distinct seeds >= 0, got {list(seeds)}")
    parsed = list(parsed) or [("full", [])]
    names = [name for name, _ in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{say['variant']}: duplicate name(s) {duplicates}")
    variants = []
    for name, overrides in parsed:
        _check_name(name, f"{say['variant']} {name}")
        keys = [item.split("=", 1)[0].strip() for item in overrides]
        if "seed" in keys:
            raise ValueError(f"{say['variant']} {name}: seed is set by {say['seeds']} / {say['variant_seeds']}, "
                             "not by a variant")
        try:
            config = base.with_overrides(list(overrides))
        except ValueError as err:
            raise ValueError(f"{say['variant']} {name}: {err}") from None
        changed = [k for k in DATA_KEYS if getattr(config, k) != getattr(base, k)]
        if changed:
            raise ValueError(f"{say['variant']} {name}: {changed} change the data or the split, which all runs of a "
                             f"study share; set them for every run with {say['set']}")
        variants.append(Variant(name, tuple(overrides), tuple(per_variant.get(name, seeds))))
    return variants


# ---- study files -----------------------------------------------------------------------------------
#: The keys of a study file: ``config`` and ``output_dir`` are required.
STUDY_KEYS = ("config", "set", "variants", "seeds", "variant_seeds", "jobs", "output_dir")


@dataclass(frozen=True)
class StudyFile:
    """One study as a file (``configs/studies/<name>.yaml``): what a ``scripts/study.py`` command
    line says, so that a study is run by its name::

        config: configs/routing.yaml      # the base config, relative to the project's root
        set: {num_threads: 1}             # --set for every run
        variants:                         # --variant NAME:KEY=VALUE,... (in this order)
          one-step: {}
          deep: {lattice_depth: 5}
        seeds: [0, 1, 2]                  # --seeds (default 0 1 2)
        variant_seeds: {deep: [0, 1]}     # --variant-seeds NAME=S,S
        jobs: 2                           # --jobs (default 1)
        output_dir: runs/study-x          # --output-dir, relative to where the study runs

    Values are YAML scalars, as a config file's; each becomes the ``key=value`` override the
    command line would pass. Build it with :meth:`read`, then :meth:`base` and :meth:`variants`.
    """

    path: Path
    config: str
    sets: tuple[str, ...]
    variant_specs: tuple[tuple[str, tuple[str, ...]], ...]
    seeds: tuple[int, ...]
    variant_seeds: tuple[tuple[str, tuple[int, ...]], ...]
    jobs: int
    output_dir: str

    @classmethod
    def read(cls, path: str | Path) -> "StudyFile":
        """Parse and check a study file's shape (not yet its configs: see :meth:`base`).

        Raises:
            ValueError: naming the file and the key: an unknown key (with the allowed ones), a
                duplicated key, a missing ``config`` / ``output_dir``, a value of the wrong type.
        """
        path = Path(path)
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with the keys {list(STUDY_KEYS)}")
        unknown = sorted(set(data) - set(STUDY_KEYS), key=str)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; allowed keys are {list(STUDY_KEYS)}")
        missing = [k for k in ("config", "output_dir") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing {missing} (required: config, output_dir)")

        def fail(key: str, expected: str) -> ValueError:
            return ValueError(f"{path}: {key}: expected {expected}, got {data[key]!r}")

        def text(key: str) -> str:
            if not isinstance(data[key], str) or not data[key].strip():
                raise fail(key, "a path")
            return data[key]

        def seed_list(value: Any, key: str) -> tuple[int, ...]:
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"{path}: {key}: expected a list of integer seeds, got {value!r}")
            return tuple(value)

        def mapping(value: Any, key: str) -> dict[str, Any]:
            if value is None:
                return {}
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{path}: {key}: expected a mapping of names to values, got {value!r}")
            return value

        sets = tuple(_override(k, v, f"{path}: set") for k, v in mapping(data.get("set"), "set").items())
        variant_specs = tuple((name, tuple(_override(k, v, f"{path}: variants: {name}")
                                           for k, v in mapping(overrides, f"variants: {name}").items()))
                              for name, overrides in mapping(data.get("variants"), "variants").items())
        variant_seeds = tuple((name, seed_list(own, f"variant_seeds: {name}"))
                              for name, own in mapping(data.get("variant_seeds"), "variant_seeds").items())
        jobs = data.get("jobs", 1)
        if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
            raise fail("jobs", "an integer >= 1")
        return cls(path, text("config"), sets, variant_specs, seed_list(data.get("seeds", [0, 1, 2]), "seeds"),
                   variant_seeds, jobs, text("output_dir"))

    def config_path(self, root: str | Path) -> Path:
        """The base config: ``config`` as written when absolute, else under ``root`` (the project)."""
        return Path(root) / self.config

    def base(self, root: str | Path) -> EnergyConfig:
        """The base config with the file's ``set`` applied (raises ``ValueError`` naming the file)."""
        path = self.config_path(root)
        if not path.is_file():
            raise ValueError(f"{self.path}: config: no file {path}")
        try:
            return EnergyConfig.from_yaml(path).with_overrides(list(self.sets))
        except ValueError as err:
            raise ValueError(f"{self.path}: set: {err}") from None

    def variants(self, base: EnergyConfig) -> list[Variant]:
        """The variants, each config built (see :func:`build_variants`; errors name the file)."""
        names = [name for name, _ in self.variant_specs] or ["full"]
        for name, _ in self.variant_seeds:
            if name not in names:
                raise ValueError(f"{self.path}: variant_seeds: no variant named {name!r} (variants: {names})")
        try:
            return _variants(base, [(n, list(o)) for n, o in self.variant_specs], self.seeds,
                             {n: list(s) for n, s in self.variant_seeds}, _FILE_KEYS)
        except ValueError as err:
            raise ValueError(f"{self.path}: {err}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (a second variant of the
    same name would silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"key(s) {twice} given twice", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _override(key: str, value: Any, where: str) -> str:
    """A study file's ``key: value`` as the ``key=value`` override ``--set`` would pass (the value
    read back by :meth:`EnergyConfig.with_overrides` is ``value``)."""
    if isinstance(value, (dict, list)):
        raise ValueError(f"{where}: {key}: expected a single value, got {value!r}")
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value and "\n" not in value:
                return f"{key}={value}"
        except yaml.YAMLError:
            pass
    return f"{key}={json.dumps(value)}"  # JSON is YAML: "" stays "", true stays true


def variant_config(base: EnergyConfig, variant: Variant, seed: int) -> EnergyConfig:
    """The config of one run: the base, the variant's overrides, then the seed."""
    return base.with_overrides(list(variant.overrides)).replace(seed=seed)


# ---- statistics ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BootstrapCI:
    """Mean paired difference ``mean(a - b)`` and its bootstrap percentile interval."""

    diff: float
    low: float
    high: float


def _check_scores(a: np.ndarray, b: np.ndarray, resamples: int, level: float) -> None:
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("a, b: contain NaN or infinite values")
    if resamples < 1:
        raise ValueError(f"resamples: must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: must be in (0, 1), got {level}")


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, *, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> BootstrapCI:
    """Percentile bootstrap CI of ``mean(a - b)`` over paired items (e.g. test pairs).

    Items are resampled with replacement, the *same* items for ``a`` and ``b`` (paired), so the
    interval reflects which pairs were drawn for the test, not the spread between the two models
    (nor between their seeds: see :func:`two_level_bootstrap_ci`). This is
    ``scipy.stats.bootstrap`` with ``paired=True`` and ``method="percentile"``.

    Args:
        a, b: ``[N]`` per-item scores of two models on the same items (e.g. cosine, or R@1 hits
            as 0/1 or as a fraction of seeds).
        resamples: number of bootstrap resamples (>= 1).
        seed: seeds the resampling, so a report is reproducible.
        level: coverage of the interval, in (0, 1).

    Raises:
        ValueError: naming the argument for mismatched or empty arrays, non-finite values, or
            ``resamples`` / ``level`` out of range.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"a, b: expected two non-empty 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
    _check_scores(a, b, resamples, level)
    diff = float((a - b).mean())
    if a.size == 1:  # every resample is the one item (scipy refuses a sample of one)
        return BootstrapCI(diff, diff, diff)
    result = scipy.stats.bootstrap(
        (a, b), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True, vectorized=True,
        n_resamples=resamples, batch=max(1, (1 << 22) // a.size),  # at most ~4M drawn items at a time
        confidence_level=level, method="percentile", rng=np.random.default_rng(seed),
    )
    return BootstrapCI(diff, float(result.confidence_interval.low), float(result.confidence_interval.high))


def two_level_bootstrap_ci(a: np.ndarray, b: np.ndarray, *, resamples: int = 1000, seed: int = 0,
                           level: float = 0.95) -> BootstrapCI:
    """Percentile bootstrap CI of ``mean(a) - mean(b)`` resampling seeds, then paired items.

    Each resample draws ``a``'s seeds (rows) with replacement, ``b``'s seeds independently with
    replacement (a seed of one model has nothing in common with the same seed of the other), and
    the items (columns) with replacement, the *same* items for both models (paired). Its
    statistic is the difference of the two models' means over the drawn seeds and items. So the
    interval holds both sources of uncertainty: which test pairs were drawn and which training
    seeds. With equal rows (seeds that agree) it is :func:`paired_bootstrap_ci` of the row
    means; the more the seeds disagree, the wider it gets. With few seeds (3-5) the seed level
    is a rough resampling: the interval is only as good as those few seeds' spread.

    ``scipy.stats.bootstrap`` has no nested resampling, so this draws counts itself: seed weights
    ``Wa [R, Sa]``, ``Wb [R, Sb]`` and item counts ``C [R, N]`` from multinomials, and the
    statistic of resample ``r`` is ``sum_j C[r, j] (Wa[r] @ a - Wb[r] @ b)[j] / N``.

    Args:
        a, b: ``[Sa, N]`` and ``[Sb, N]`` per-seed, per-item scores of two models on the same
            ``N`` items (a 1-D array is one seed).
        resamples, seed, level: as in :func:`paired_bootstrap_ci`.

    Raises:
        ValueError: naming the argument for arrays of other item counts, empty or non-finite
            ones, or ``resamples`` / ``level`` out of range.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.size == 0 or b.size == 0:
        raise ValueError(f"a, b: expected [seeds, items] arrays with the same items, got shapes {a.shape} and {b.shape}")
    _check_scores(a, b, resamples, level)
    (sa, n), sb = a.shape, b.shape[0]
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    chunk = max(1, (1 << 22) // n)  # at most ~4M item counts at a time
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        wa = rng.multinomial(sa, np.full(sa, 1.0 / sa), size=r) / sa
        wb = rng.multinomial(sb, np.full(sb, 1.0 / sb), size=r) / sb
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=r)
        stats[start:start + r] = (counts * (wa @ a - wb @ b)).sum(axis=1) / n
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return BootstrapCI(float(a.mean() - b.mean()), float(low), float(high))


def mean_std(values: Sequence[float]) -> dict[str, float | None]:
    """``{"mean", "std"}`` over seeds; ``std`` is the sample std (ddof 1), ``None`` for one value."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else None}


def summarize(runs: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and std over seeds per variant and per baseline.

    Args:
        runs: one record per (variant, seed): ``variant``, ``test`` and ``validation`` metric
            dicts, ``test_dynamics`` (``flows_<key>``) and ``dead``.
        baselines: one record per (baseline, seed): ``model``, ``test``, ``validation``.

    Returns:
        ``{"variants": {name: stats}, "baselines": {name: stats}}`` in first-seen order. Stats:
        ``runs``, ``test_<metric>``, ``val_cosine`` and ``train_seconds`` (the training's wall
        time; ``None`` when a record lacks it) as :func:`mean_std`; variants also have
        ``<dynamics key>`` (``None`` when the runs' engine did not report it) and ``dead_runs``.
    """
    def stats(records: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"runs": len(records)}
        for metric in TEST_METRICS:
            out[f"test_{metric}"] = mean_std([r["test"][metric] for r in records])
        if all(ANSWER_METRIC in r["test"] for r in records):
            out[f"test_{ANSWER_METRIC}"] = mean_std([r["test"][ANSWER_METRIC] for r in records])
        out["val_cosine"] = mean_std([r["validation"]["cosine"] for r in records])
        # a run's wall time of training, a baseline's of its fit (None: a folder written before it was kept)
        seconds = [r.get("train_seconds", r["test"].get("train_seconds")) for r in records]
        out["train_seconds"] = mean_std(seconds) if all(s is not None for s in seconds) else None
        return out

    variants: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        variants.setdefault(run["variant"], []).append(run)
    models: dict[str, list[dict[str, Any]]] = {}
    for record in baselines:
        models.setdefault(record["model"], []).append(record)
    summary: dict[str, dict[str, Any]] = {"variants": {}, "baselines": {}}
    for name, records in variants.items():
        entry = stats(records)
        for key, _ in DYNAMICS_COLUMNS:
            values = [r["test_dynamics"].get(f"flows_{key}") for r in records]
            # a key the engine does not report is missing from every run; say so rather than invent 0
            entry[key] = mean_std(values) if all(v is not None for v in values) else None
        entry["dead_runs"] = sum(bool(r["dead"]) for r in records)
        summary["variants"][name] = entry
    for name, records in models.items():
        summary["baselines"][name] = stats(records)
    return summary


def bootstrap_against_best_baseline(summary: dict[str, dict[str, Any]],
                                    run_pairs: dict[str, dict[int, dict[str, np.ndarray]]],
                                    baseline_pairs: dict[str, dict[int, dict[str, np.ndarray]]], *,
                                    resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Each variant minus the best baseline on *validation* (highest mean validation cosine).

    The baseline is chosen on the validation split, as every other choice of a study is; the
    test split only reports the difference to it.

    Args:
        summary: from :func:`summarize` (its baselines' ``val_cosine``).
        run_pairs: variant -> seed -> :func:`~efgraph.training.metrics.pair_scores` on the test split.
        baseline_pairs: baseline -> seed -> the same; it must hold every seed of every variant.

    For cosine and R@1 (a hit is 0 or 1), per variant:

    * ``diff``: the variant's mean over its seeds and the test pairs minus the baseline's;
    * ``pairs_ci``: :func:`paired_bootstrap_ci` of the seed-averaged per-pair scores, i.e. the
      uncertainty from which test pairs were drawn, for *these* trained models;
    * ``seeds_and_pairs_ci``: :func:`two_level_bootstrap_ci`, resampling each model's seeds and
      then the test pairs, i.e. also the uncertainty from which seeds were trained;
    * ``seed_margins``: seed -> the variant's mean over the test pairs minus the baseline's of the
      same seed, and ``seed_margin``: their :func:`mean_std`.

    Returns:
        ``{"against", "chosen_by", "resamples", "seed", "level", "variants": {name: {metric: ...}}}``.

    Raises:
        ValueError: without baselines, when a baseline lacks a variant's seed, or when seeds were
            scored on different numbers of pairs.
    """
    if not summary["baselines"]:
        raise ValueError("baselines: none to compare with")
    best = max(summary["baselines"], key=lambda name: summary["baselines"][name]["val_cosine"]["mean"])
    reference = baseline_pairs[best]

    def matrix(per_seed: dict[int, dict[str, np.ndarray]], what: str) -> np.ndarray:
        lengths = {len(p[what]) for p in per_seed.values()}
        if len(lengths) != 1:
            raise ValueError(f"test pairs: seeds were scored on different numbers of pairs {sorted(lengths)}")
        return np.stack([p[what].astype(np.float64) for p in per_seed.values()])

    out: dict[str, Any] = {"against": best, "chosen_by": "mean validation cosine", "resamples": resamples,
                           "seed": seed, "level": level, "variants": {}}
    for name, per_seed in run_pairs.items():
        missing = sorted(set(per_seed) - set(reference))
        if missing:
            raise ValueError(f"baseline {best!r}: no scores for seed(s) {missing} of variant {name!r}")
        out["variants"][name] = {}
        for metric, what in (("cosine", "cosine"), ("r_at_1", "hit")):
            a, b = matrix(per_seed, what), matrix(reference, what)
            pairs = paired_bootstrap_ci(a.mean(axis=0), b.mean(axis=0), resamples=resamples, seed=seed, level=level)
            both = two_level_bootstrap_ci(a, b, resamples=resamples, seed=seed, level=level)
            margins = {s: float(p[what].astype(np.float64).mean() - reference[s][what].astype(np.float64).mean())
                       for s, p in per_seed.items()}
            out["variants"][name][metric] = {
                "diff": pairs.diff, "pairs_ci": [pairs.low, pairs.high], "seeds_and_pairs_ci": [both.low, both.high],
                "seed_margins": margins, "seed_margin": mean_std(list(margins.values())),
            }
    return out


# ---- the table -------------------------------------------------------------------------------------
def _fmt(stat: dict[str, float | None] | None, spec: str) -> str:
    if stat is None:
        return "n/a"
    if stat["std"] is None:
        return format(stat["mean"], spec)
    return f"{format(stat['mean'], spec)} ± {format(stat['std'], spec)}"


def format_study_table(study: dict[str, Any]) -> str:
    """Markdown report of a study (the payload of ``study.json``)."""
    split = study["split"]
    lines = [
        f"# Study `{study['name']}`",
        "",
        f"Config `{study['config_path']}`; {split['train']} train / {split['validation']} validation / "
        f"{split['test']} test pairs, one split for every run (data_seed {split['data_seed']}). "
        f"The learned baselines (MLP, Transformer) are sized to the full model's {study['num_parameters']:,} "
        "parameters.",
        "",
        "**Compare variants on the validation column.** Every run keeps its best-validation state and reads the "
        "test split once, with that state (no selection on test); the test columns are the final report. "
        "Mean ± std over seeds; the dynamics are measured on the test split; a run is dead when its last "
        "evaluation saw no flow arrive.",
        "",
    ]
    everything = [*study["summary"]["variants"].values(), *study["summary"]["baselines"].values()]
    answers = all(f"test_{ANSWER_METRIC}" in stats for stats in everything)  # composition: the nearest value
    lines += [
        "| model | seeds | val cosine | test cosine | test MSE | test R@1 | " + ("test answer acc. | " if answers else "")
        + "train s | " + " | ".join(header for _, header in DYNAMICS_COLUMNS) + " | dead runs |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * (len(DYNAMICS_COLUMNS) + answers + 1) + "---:|",
    ]
    seeds = {v["name"]: v["seeds"] for v in study["variants"]}

    def row(label: str, stats: dict[str, Any], seed_list: Sequence[int], extra: list[str]) -> str:
        cells = [label, ",".join(map(str, seed_list)), _fmt(stats["val_cosine"], ".4f"),
                 _fmt(stats["test_cosine"], ".4f"), _fmt(stats["test_mse"], ".4g"), _fmt(stats["test_r_at_1"], ".4f"),
                 *([_fmt(stats[f"test_{ANSWER_METRIC}"], ".4f")] if answers else []),
                 _fmt(stats.get("train_seconds"), ".0f"), *extra]
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    for name, stats in study["summary"]["variants"].items():
        dynamics = [_fmt(stats[key], ".3g") for key, _ in DYNAMICS_COLUMNS]
        lines.append(row(name, stats, seeds[name], [*dynamics, f"{stats['dead_runs']}/{stats['runs']}"]))
    for name, stats in study["summary"]["baselines"].items():
        lines.append(row(f"{name} (baseline)", stats, study["baseline_seeds"], ["–"] * (len(DYNAMICS_COLUMNS) + 1)))
    if not study["runs"]:  # the baselines alone (--baselines-only): no variant to compare
        return "\n".join(lines) + "\n"

    boot = study["bootstrap"]
    level = f"{boot['level']:.0%}"
    best_val = study["summary"]["baselines"][boot["against"]]["val_cosine"]["mean"]
    lines += [
        "",
        f"## Difference to the best baseline on validation, `{boot['against']}` (mean validation cosine "
        f"{best_val:.4f})",
        "",
        "The baseline is the one with the highest mean validation cosine over its seeds (chosen on validation, "
        f"never on test). Δ is the variant's mean over its seeds and the {split['test']} test pairs minus the "
        "baseline's (R@1: the fraction of pairs whose nearest target is their own). Its uncertainty, three ways "
        f"({level} percentile intervals, {boot['resamples']} resamples, seed {boot['seed']}):",
        "",
        "- **pairs**: paired bootstrap over the test pairs (`scipy.stats.bootstrap`, `paired=True`): each "
        "model's per-pair scores are first averaged over its seeds, then pairs are drawn with replacement, the "
        "same pairs for both models. It is the uncertainty of which pairs make up the test set, for *these* "
        "trained models; it leaves out the seed-to-seed variance.",
        "- **seeds + pairs**: two-level bootstrap: each model's seeds are drawn with replacement (the "
        "variant's and the baseline's independently), then the test pairs (the same for both models), and the "
        "statistic is the difference of the means over the drawn seeds and pairs. It adds the seed-to-seed "
        "variance; with 3-5 seeds that level is a rough resampling of those few seeds.",
        "- **per-seed Δ**: the variant's seed *k* against the baseline's seed *k* (a baseline without "
        "randomness, e.g. ridge, is the same for every seed), mean ± sample std over the seeds.",
        "",
        "An interval above 0 means the variant beats the baseline: on this test set (pairs), or also across "
        "the seeds it could have been given (seeds + pairs).",
        "",
        f"| variant | metric | Δ | pairs {level} CI | seeds + pairs {level} CI | per-seed Δ |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, metrics in boot["variants"].items():
        for metric, label in (("cosine", "cosine"), ("r_at_1", "R@1")):
            m = metrics[metric]
            (p_low, p_high), (s_low, s_high) = m["pairs_ci"], m["seeds_and_pairs_ci"]
            margin = m["seed_margin"]
            per_seed = f"{margin['mean']:+.4f}" + ("" if margin["std"] is None else f" ± {margin['std']:.4f}")
            lines.append(f"| {name} | {label} | {m['diff']:+.4f} | [{p_low:+.4f}, {p_high:+.4f}] | "
                         f"[{s_low:+.4f}, {s_high:+.4f}] | {per_seed} |")
    return "\n".join(lines) + "\n"


# ---- running ---------------------------------------------------------------------------------------
def run_study(base: EnergyConfig, variants: Sequence[Variant], output_dir: str | Path, *, name: str | None = None,
              config_path: str | None = None, wandb_mode: str = "auto", device: str | None = None,
              progress: bool = True, report: Callable[[str], None] = print, bootstrap_resamples: int = 1000,
              bootstrap_seed: int = 0, jobs: int = 1, baselines_only: bool = False) -> dict[str, Any]:
    """Train every (variant, seed) and the baselines of every seed, then write study.json / study.md.

    Args:
        base: the config every variant starts from (data, split and the full model).
        variants: from :func:`build_variants`.
        output_dir: the study folder (see the module docstring); may hold an earlier, partial run
            of the same study, which is continued.
        name: the study's name and W&B group (default: the folder's name).
        config_path: where ``base`` came from, for the report.
        report: receives one progress line per step (which run, elapsed time).
        jobs: runs (and seeds' baselines) trained side by side, each in a process of its own. Where
            ``base.num_threads`` is 0, each gets ``cores // jobs`` threads (at least 1), so that
            parallel runs never oversubscribe the cores (two routing runs at the default thread
            count on 2 cores took 2x as long per step: scripts/bench_threads.py); an explicit
            ``num_threads`` is kept.
        baselines_only: fit the baselines of every seed and train no run; the table of the
            baselines alone goes to baselines.md / baselines.json (a study's own table stays): a
            change to the baselines' training re-measured without the runs.

    Returns:
        The ``study.json`` payload.

    Raises:
        ValueError: when ``output_dir`` holds a study of another base config or split, or a run
            folder whose config is not the one this study would train there.
    """
    out = Path(output_dir)
    name = name or out.resolve().name
    _check_name(name, "study name")
    if not variants:
        raise ValueError("variants: at least one")
    if jobs < 1:
        raise ValueError(f"--jobs: must be >= 1, got {jobs}")
    start = time.perf_counter()

    def say(message: str) -> None:
        report(f"[study {name} {_clock(time.perf_counter() - start)}] {message}")

    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_base(out / "study_config.yaml", base)
    say("loading the data")
    pairs = load_pairs(base, progress=progress)
    split = _check_or_write_split(out / "split.json", make_run_split(base, pairs))
    train, val, test = split.apply(pairs)
    if val is None or test is None:
        raise ValueError("val_fraction, test_fraction: the split left the validation or test part empty")
    num_parameters = sum(p.numel() for p in FlowProcessor.from_config(base).parameters())

    seeds = sorted({s for v in variants for s in v.seeds})
    pending = [(v, s) for v in variants for s in v.seeds]
    # (variant, seed, run folder, label) of every run
    todo = [(v, s, out / v.name / f"seed{s}", f"run {i}/{len(pending)} {v.name} seed {s}")
            for i, (v, s) in enumerate(pending, 1) if not baselines_only]
    # what is left to compute: the baselines of a seed, then the runs (each one task of its own)
    tasks: list[tuple[str, str, Callable[..., Any], tuple[Any, ...]]] = []
    for seed in seeds:
        folder = out / BASELINES_DIR / f"seed{seed}"
        if (folder / "results.json").exists():
            say(f"baselines seed {seed}: done already, reading {folder}")
        else:
            config = base.replace(seed=seed, num_threads=threads_per_job(base.num_threads, jobs))
            tasks.append((f"baselines seed {seed}", "fitting", _fit_baselines,
                          (config, train, val, test, num_parameters, folder)))
    for variant, seed, run_dir, label in todo:
        config = variant_config(base, variant, seed)
        config = config.replace(num_threads=threads_per_job(config.num_threads, jobs))
        _check_run_config(run_dir, config)
        if (run_dir / "results.json").exists():
            say(f"{label}: done already, reading {run_dir}")
            continue
        resume = run_dir if (run_dir / "checkpoints" / "last.pt").exists() else None
        if resume is None and (run_dir / "metrics.jsonl").exists():
            # a run killed before its first checkpoint starts over: drop its metric rows
            (run_dir / "metrics.jsonl").unlink()
        info = WandbRunInfo(name=f"{name}-{variant.name}-seed{seed}", group=name, job_type=variant.name,
                            tags=(variant.name, f"seed{seed}"))
        tasks.append((label, f"{'resuming' if resume else 'training'} in {run_dir}", _train_run,
                      (config, run_dir, wandb_mode, device, resume, progress and jobs == 1, pairs, info)))
    _execute(tasks, jobs, say)

    baseline_records: list[dict[str, Any]] = []
    baseline_pairs: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for seed in seeds:
        folder = out / BASELINES_DIR / f"seed{seed}"
        saved = json.loads((folder / "results.json").read_text(encoding="utf-8"))
        for model, metrics in saved["test"].items():
            baseline_records.append({"model": model, "seed": seed, "test": metrics,
                                     "validation": saved["validation"][model]})
        for model, scores in load_pair_scores(folder / "test_pairs.npz").items():
            baseline_pairs.setdefault(model, {})[seed] = scores

    runs: list[dict[str, Any]] = []
    run_pairs: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for variant, seed, run_dir, label in todo:
        if Split.from_json(run_dir / "split.json") != split:
            raise ValueError(f"{run_dir}/split.json: differs from the study's split {out / 'split.json'}")
        record = _run_record(run_dir, variant.name, seed)
        runs.append(record)
        run_pairs.setdefault(variant.name, {})[seed] = load_pair_scores(run_dir / "test_pairs.npz")["energy-flow"]
        say(f"{label}: val cosine {record['validation']['cosine']:.4f}, test cosine {record['test']['cosine']:.4f}"
            f"{', DEAD (no flow arrives)' if record['dead'] else ''}")

    summary = summarize(runs, baseline_records)
    study: dict[str, Any] = {
        "name": name,
        "config_path": config_path,
        "base_config": base.to_dict(),
        "variants": [{"name": v.name, "overrides": list(v.overrides), "seeds": list(v.seeds)} for v in variants],
        "baseline_seeds": seeds,
        "split": {"data_seed": base.data_seed, "train": len(train), "validation": len(val), "test": len(test)},
        "num_parameters": num_parameters,
        "runs": runs,
        "baselines": baseline_records,
        "summary": summary,
        "bootstrap": bootstrap_against_best_baseline(summary, run_pairs, baseline_pairs,
                                                     resamples=bootstrap_resamples, seed=bootstrap_seed),
        "elapsed_seconds": time.perf_counter() - start,
    }
    # the baselines alone go beside a study's own table, never over it
    stem = "baselines" if baselines_only else "study"
    atomic_write_text(out / f"{stem}.json", json.dumps(study, indent=2) + "\n")
    atomic_write_text(out / f"{stem}.md", format_study_table(study))
    say(f"wrote {out / f'{stem}.md'} and {out / f'{stem}.json'}")
    return study


def threads_per_job(num_threads: int, jobs: int) -> int:
    """The ``num_threads`` each of ``jobs`` parallel runs gets: the config's own where it sets one
    (> 0), else this machine's cores shared out (at least 1); one job keeps the config's value."""
    if num_threads > 0 or jobs == 1:
        return num_threads
    return max(1, (os.cpu_count() or 1) // jobs)


def _train_run(config: EnergyConfig, run_dir: Path, wandb_mode: str, device: str | None, resume: Path | None,
               progress: bool, pairs: EmbeddingPairs, info: WandbRunInfo) -> None:
    """One study run: :func:`run_training` without baselines (the study fits them once per seed)."""
    run_training(config, run_dir, wandb_mode=wandb_mode, device=device, resume=resume, progress=progress,
                 pairs=pairs, baselines=False, wandb_info=info)


def _execute(tasks: list[tuple[str, str, Callable[..., Any], tuple[Any, ...]]], jobs: int,
             say: Callable[[str], None]) -> None:
    """Run ``(label, what, function, args)`` tasks one after another, or ``jobs`` at a time in
    worker processes (spawned: no CUDA or thread-pool state is inherited). The first failure stops
    the tasks not yet started and is raised."""
    if jobs == 1 or len(tasks) <= 1:
        for label, what, function, args in tasks:
            say(f"{label}: {what}")
            task_start = time.perf_counter()
            function(*args)
            say(f"{label}: done in {_clock(time.perf_counter() - task_start)}")
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        started = time.perf_counter()
        futures = {}
        for label, what, function, args in tasks:
            futures[pool.submit(function, *args)] = label
            say(f"{label}: {what} (queued, {jobs} at a time)")
        for future in concurrent.futures.as_completed(futures):
            try:
                future.result()
            except BaseException:
                for other in futures:
                    other.cancel()
                raise
            say(f"{futures[future]}: done ({_clock(time.perf_counter() - started)} into the batch)")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _check_or_write_base(path: Path, base: EnergyConfig) -> None:
    """Refuse to continue a study folder that was started with another base config."""
    if path.exists():
        saved = EnergyConfig.from_saved_yaml(path).to_dict()  # maybe an older efgraph's: as that version ran it
        changed = config_changes(saved, base, "study has", "now")
        if changed:
            raise ValueError(f"--config/--set: {path.parent} holds a study of another base config ("
                             + "; ".join(changed) + "); use another --output-dir")
    else:
        base.to_yaml(path)


def _check_or_write_split(path: Path, split: Split) -> Split:
    if path.exists():
        if Split.from_json(path) != split:
            raise ValueError(f"{path}: the study's saved split differs from the one the data gives now")
    else:
        split.to_json(path)
    return split


def _check_run_config(run_dir: Path, config: EnergyConfig) -> None:
    """A run folder from an earlier session must hold this run's config, or reading it would lie."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    saved = EnergyConfig.from_saved_yaml(path).to_dict()  # maybe an older efgraph's: as that version ran it
    changed = config_changes(saved, config, "folder has", "study wants")
    if changed:
        raise ValueError(f"{run_dir}: holds a run of another config (" + "; ".join(changed)
                         + "); remove the folder or use another --output-dir")


def _fit_baselines(config: EnergyConfig, train: EmbeddingPairs, val: EmbeddingPairs, test: EmbeddingPairs,
                   num_parameters: int, folder: Path) -> None:
    """Fit the baselines of one seed and write their validation and test scores to ``folder``."""
    apply_num_threads(config.num_threads)
    folder.mkdir(parents=True, exist_ok=True)
    baselines, test_results, per_pair = score_baselines(config, train, val, test, num_parameters)
    results = {"seed": config.seed, "test": test_results,
               "validation": {b.name: score_predictions(config, b.predict(val.src), val.tgt) for b in baselines},
               "num_parameters": {b.name: b.num_parameters for b in baselines}}
    save_pair_scores(folder / "test_pairs.npz", per_pair)
    # written last: its presence marks the seed's baselines as done
    atomic_write_text(folder / "results.json", json.dumps(results, indent=2) + "\n")


def _run_record(run_dir: Path, variant: str, seed: int) -> dict[str, Any]:
    """What the study keeps of a finished run folder."""
    path = run_dir / "results.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    for key in ("validation", "final_validation"):
        if saved.get(key) is None:  # only a run resumed from a checkpoint older than the saved history
            raise ValueError(f"{path}: no {key!r} metrics (written by an older efgraph); remove {run_dir} "
                             "to train it again")
    final = saved["final_validation"]
    return {
        "variant": variant,
        "seed": seed,
        "run_dir": str(run_dir),
        "test": {k: v for k, v in saved["test"]["energy-flow"].items() if k in (*TEST_METRICS, ANSWER_METRIC)},
        "validation": {k: saved["validation"][k] for k in (*TEST_METRICS, "loss", "step")},
        "test_dynamics": saved["test_dynamics"],
        # dead: the last evaluation of training (at the final step) saw no flow reach the output face
        "dead": final["flows_arrived_per_sample"] == 0,
        "train_seconds": saved["train_seconds"],
        "best_step": saved["best_step"],
    }

