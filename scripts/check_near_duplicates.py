"""Count the test verses of a Bible run that have a near-duplicate in its train or validation part.

The split of a ``dataset: bible`` run is by book, so no verse's own book straddles the parts, but
parallel passages in other books (the synoptic gospels, Kings and Chronicles, the prophets'
formulas) can. This reads the verses exactly as the run does (``read_bible_verses`` with the
config's versions, ``max_pairs`` and ``verses_per_book``; the installed ``pythonbible`` packages,
nothing is downloaded, nothing is embedded) and splits them with the run's own
``make_run_split`` (by book, ``data_seed``, ``val_fraction``, ``test_fraction``).

Near-duplicate: the word-set Jaccard similarity ``|A & B| / |A | B|`` of two verses is at least
``--threshold``, with words the lower-case runs of letters and apostrophes. It is computed on the
source text, on the target text, and a test verse counts under "either" when one of them passes.

Examples::

    python scripts/check_near_duplicates.py                                # configs/bible.yaml
    python scripts/check_near_duplicates.py --config configs/bible-full.yaml --threshold 0.8
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse

from efgraph.config import EnergyConfig
from efgraph.data.bible import read_bible_verses
from efgraph.training.run import make_run_split

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORD = re.compile(r"[a-z']+")


def word_sets(texts: Sequence[str]) -> scipy.sparse.csr_matrix:
    """``[N, V]`` 0/1 matrix: row ``i`` marks the distinct words of ``texts[i]``."""
    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, text in enumerate(texts):
        for word in set(WORD.findall(text.lower())):
            rows.append(i)
            cols.append(vocab.setdefault(word, len(vocab)))
    return scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), max(len(vocab), 1)))


def nearest_by_jaccard(texts: Sequence[str], queries: Sequence[int], pool: Sequence[int],
                       chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``queries``: the highest word-set Jaccard to any of ``pool`` and which one.

    Returns ``(best [Q], index into texts [Q])``; a query with no words scores 0.
    """
    x = word_sets(texts)
    sizes = np.asarray(x.sum(axis=1)).ravel()
    pool = np.asarray(pool, dtype=np.int64)
    queries = np.asarray(queries, dtype=np.int64)
    pool_x = x[pool].T.tocsc()
    best, which = np.zeros(len(queries)), np.zeros(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk):  # [chunk, pool] dense at a time
        q = queries[start:start + chunk]
        inter = (x[q] @ pool_x).toarray()
        union = sizes[q][:, None] + sizes[pool][None, :] - inter
        jaccard = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        arg = jaccard.argmax(axis=1)
        best[start:start + len(q)] = jaccard[np.arange(len(q)), arg]
        which[start:start + len(q)] = pool[arg]
    return best, which


def check(config: EnergyConfig, threshold: float) -> dict:
    """The counts and every near-duplicate test verse (see the module docstring)."""
    if config.dataset != "bible":
        raise ValueError(f"dataset: {config.dataset!r}; this check reads Bible verses (dataset: bible)")
    verses = read_bible_verses(config.source_version, config.target_version, max_verses=config.max_pairs or None,
                               verses_per_book=config.verses_per_book or None)
    split = make_run_split(config, verses)  # uses len() and .groups, as for the embedded pairs
    test, seen = list(split.test), sorted([*split.train, *split.validation])
    sides = {verses.source_version: verses.source_texts, verses.target_version: verses.target_texts}
    scores = {code: nearest_by_jaccard(texts, test, seen) for code, texts in sides.items()}
    hits = {code: best >= threshold for code, (best, _) in scores.items()}
    either = np.logical_or.reduce(list(hits.values()))
    found = []
    for i in np.flatnonzero(either):
        entry = {"test": verses.keys[test[i]]}
        for code, (best, which) in scores.items():
            entry[code] = {"nearest": verses.keys[which[i]], "jaccard": round(float(best[i]), 3)}
        found.append(entry)
    return {
        "config": {k: getattr(config, k) for k in ("source_version", "target_version", "max_pairs", "verses_per_book",
                                                    "data_seed", "val_fraction", "test_fraction")},
        "verses": len(verses), "train": len(split.train), "validation": len(split.validation), "test": len(test),
        "threshold": threshold,
        "test_with_near_duplicate": {**{code: int(h.sum()) for code, h in hits.items()}, "either": int(either.sum())},
        "near_duplicates": found,
    }


def report(result: dict, show: int = 20) -> str:
    cfg, counts = result["config"], result["test_with_near_duplicate"]
    src, tgt = cfg["source_version"], cfg["target_version"]
    lines = [
        f"{src} -> {tgt}: {result['verses']} verses (verses_per_book {cfg['verses_per_book']}, max_pairs "
        f"{cfg['max_pairs']}), split by book with data_seed {cfg['data_seed']}: {result['train']} train / "
        f"{result['validation']} validation / {result['test']} test",
        f"test verses with a near-duplicate in train or validation (word Jaccard >= {result['threshold']}): "
        f"{src} text {counts[src]}, {tgt} text {counts[tgt]}, either {counts['either']} of {result['test']}",
    ]
    for entry in result["near_duplicates"][:show]:
        lines.append(f"  {entry['test']}: {src} {entry[src]['jaccard']:.3f} ({entry[src]['nearest']}), "
                     f"{tgt} {entry[tgt]['jaccard']:.3f} ({entry[tgt]['nearest']})")
    if len(result["near_duplicates"]) > show:
        lines.append(f"  ... and {len(result['near_duplicates']) - show} more (--show, --json)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "bible.yaml"),
                   help="a dataset: bible config (default: configs/bible.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set data_seed=1 (repeatable)")
    p.add_argument("--threshold", type=float, default=0.7, help="word Jaccard at or above which two verses are "
                   "near-duplicates (default: %(default)s)")
    p.add_argument("--show", type=int, default=20, help="list at most this many of them (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write every count and pair as JSON")
    args = p.parse_args(argv)
    try:
        config = EnergyConfig.from_yaml(args.config).with_overrides(args.overrides)
        if not 0.0 < args.threshold <= 1.0:
            raise ValueError(f"--threshold: must be in (0, 1], got {args.threshold}")
        result = check(config, args.threshold)
    except (ValueError, ImportError) as err:
        raise SystemExit(f"error: {err}") from None
    print(report(result, args.show))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
