"""Atomic file writes: write to a temporary file in the target folder, then ``os.replace``.

Shared by the pair files, the embedding cache and saved splits. A crash or a concurrent reader
must never see a half-written file: a truncated cache entry would otherwise be loaded as if it
were valid on the next run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one atomic step.

    The temporary file lives in the destination folder because ``os.replace`` is only atomic
    within one filesystem. The temp name keeps ``path``'s suffix since some writers (e.g.
    ``numpy.savez``) append an extension when it is missing.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}",
                                    dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
