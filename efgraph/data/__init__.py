"""Where (source embedding, target embedding) pairs come from.

* :class:`EmbeddingPairs` - the validated container every loader returns (``pairs``).
* :func:`load_embedding_pairs` / :func:`save_embedding_pairs` - ``.pt``, ``.npz``,
  ``.safetensors``, ``.npy`` files of precomputed embeddings (``files``).
* :func:`load_text_pairs` / :func:`read_text_pairs` - JSONL/CSV/TSV text pairs (``text``),
  embedded offline by :func:`embed_texts` with a disk cache (``embed``, ``cache``).
* :func:`load_bible_pairs` - the built-in dataset: verses in two translations (``bible``),
  guarded by a text alignment check (``alignment``).
* :func:`make_teacher_pairs` - a seeded synthetic teacher task (``synthetic``).
* :func:`make_routing_pairs` - a seeded task that needs routing, with a known ceiling (``routing``).
* :func:`make_composition_pairs` - a seeded task that needs several sequential lookups (chains of
  permutation tables), with held-out chains and a known ceiling (``composition``).
* :func:`lookup_benchmark` - the Neural Data Router's compositional table lookup: train on chains
  of 1-5 lookups, test on 6-10, as token sequences (with a mask) and fixed-width vectors (``lookup``);
  :func:`lookup_pairs` gives it as one pair set with a per-row split column.
* :func:`make_split` / :func:`split_pairs` / :class:`Split` - deterministic, group-aware
  train/validation/test splits (``split``).
"""

from efgraph.data.alignment import AlignmentReport, GroupAlignment, alignment_report
from efgraph.data.bible import (
    BibleVerses,
    check_verse_alignment,
    installed_versions,
    load_bible_pairs,
    read_bible_verses,
)
from efgraph.data.cache import EmbeddingCache, resolve_cache_dir
from efgraph.data.embed import embed_texts, resolve_model_path
from efgraph.data.files import SUPPORTED_EXTENSIONS, load_embedding_pairs, save_embedding_pairs
from efgraph.data.pairs import EmbeddingPairs
from efgraph.data.split import Split, make_split, split_pairs
from efgraph.data.composition import (composition_answers, composition_dims, composition_oracle,
                                      make_composition_pairs)
from efgraph.data.lookup import LookupBenchmark, lookup_benchmark, lookup_oracle, lookup_pairs
from efgraph.data.routing import make_routing_pairs, routing_ceiling, routing_dims, routing_oracle
from efgraph.data.synthetic import make_teacher_pairs
from efgraph.data.text import TextPairs, load_text_pairs, read_text_pairs

__all__ = [
    "AlignmentReport",
    "BibleVerses",
    "EmbeddingCache",
    "EmbeddingPairs",
    "GroupAlignment",
    "SUPPORTED_EXTENSIONS",
    "Split",
    "TextPairs",
    "alignment_report",
    "check_verse_alignment",
    "composition_answers",
    "composition_dims",
    "composition_oracle",
    "embed_texts",
    "installed_versions",
    "load_bible_pairs",
    "load_embedding_pairs",
    "load_text_pairs",
    "LookupBenchmark",
    "lookup_benchmark",
    "lookup_oracle",
    "lookup_pairs",
    "make_composition_pairs",
    "make_routing_pairs",
    "make_split",
    "make_teacher_pairs",
    "read_bible_verses",
    "read_text_pairs",
    "resolve_cache_dir",
    "resolve_model_path",
    "routing_ceiling",
    "routing_dims",
    "routing_oracle",
    "save_embedding_pairs",
    "split_pairs",
]
