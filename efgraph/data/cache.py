"""Disk cache for text embeddings, keyed by (model identity, exact texts).

Embedding the full Bible takes minutes on a laptop CPU, and every training run needs the same
matrices, so :func:`efgraph.data.embed.embed_texts` stores each result here. The key is a SHA-256
of the model fingerprint and the texts in order, so any change to the model files or to a single
character of a single text gives a different entry instead of stale vectors.

Entries are ``<key>.safetensors`` files with one tensor ``embeddings`` ``[N, D]`` float32 (no
pickle, so a tampered cache cannot execute code), written atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from efgraph.data._atomic import atomic_write

logger = logging.getLogger(__name__)

#: Environment variable that overrides the default cache folder.
CACHE_DIR_ENV = "EFGRAPH_CACHE_DIR"
#: Cache folder used when neither an argument nor ``$EFGRAPH_CACHE_DIR`` is given.
DEFAULT_CACHE_DIR = Path("~/.cache/efgraph/embeddings")

# Bump when the meaning of a cached entry changes (e.g. a different normalisation), so old
# entries stop matching instead of being misread.
_CACHE_FORMAT = "efgraph-embeddings-v1"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Pick the cache folder: ``cache_dir`` if given, else ``$EFGRAPH_CACHE_DIR``, else
    ``~/.cache/efgraph/embeddings``. The folder is not created here (only on first write)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return DEFAULT_CACHE_DIR.expanduser()


def embedding_cache_key(model_id: str, texts: Sequence[str]) -> str:
    """SHA-256 hex digest identifying the embeddings of ``texts`` (in order) under ``model_id``.

    Each text is length-prefixed so that ``["ab", "c"]`` and ``["a", "bc"]`` differ.
    """
    h = hashlib.sha256()
    for part in (_CACHE_FORMAT, model_id):
        _update_with(h, part)
    h.update(len(texts).to_bytes(8, "little"))
    for text in texts:
        _update_with(h, text)
    return h.hexdigest()


class EmbeddingCache:
    """A folder of cached embedding matrices, one file per key."""

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = resolve_cache_dir(folder)

    def path(self, key: str) -> Path:
        """File that holds (or would hold) the entry for ``key``."""
        return self.folder / f"{key}.safetensors"

    def get(self, key: str, n_rows: int) -> Tensor | None:
        """Return the cached ``[n_rows, D]`` float32 matrix for ``key``, or None on a miss.

        A corrupt or wrongly shaped entry counts as a miss (with a warning) so the caller
        recomputes and overwrites it, rather than failing a run on a damaged cache.
        """
        path = self.path(key)
        if not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            emb = load_file(str(path), device="cpu")["embeddings"]
        except (SafetensorError, OSError, KeyError) as e:
            logger.warning("ignoring unreadable embedding cache entry %s: %s", path, e)
            return None
        if emb.dim() != 2 or emb.shape[0] != n_rows or emb.dtype != torch.float32:
            logger.warning("ignoring embedding cache entry %s: shape %s dtype %s, expected %d rows"
                           " of float32", path, tuple(emb.shape), emb.dtype, n_rows)
            return None
        return emb

    def put(self, key: str, embeddings: Tensor) -> Path:
        """Store ``embeddings`` ``[N, D]`` under ``key`` atomically; returns the file written."""
        from safetensors.torch import save_file

        tensor = embeddings.detach().to("cpu", torch.float32).contiguous()
        return atomic_write(
            self.path(key),
            lambda tmp: save_file({"embeddings": tensor}, str(tmp),
                                  metadata={"format": _CACHE_FORMAT}),
        )


def _update_with(h: "hashlib._Hash", text: str) -> None:
    data = text.encode("utf-8")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
