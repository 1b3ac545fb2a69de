"""Atomic, durable file writes: write a temporary file in the target folder, fsync it, then
``os.replace`` it onto the target and fsync the folder.

Shared by the pair files, the embedding cache, saved splits, ``config.yaml``, ``metrics.jsonl``
rewrites and ``results.json``. A crash or a concurrent reader must never see a half-written file:
a truncated cache entry would otherwise be loaded as if it were valid on the next run.

Why the fsyncs: ``os.replace`` is atomic for readers, but after a power loss or a kernel crash
the rename can reach the disk before the file's bytes do (ext4 ``data=writeback``, XFS), leaving
an empty or zero-filled file under the final name. Flushing the file before the rename and the
folder after it makes the new content durable in that order.
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
        # mkstemp creates the file 0600; give it the permissions of an ordinary new file
        # (0666 minus the umask), or config.yaml and results.json become unreadable to a group
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_file(tmp)  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # ... and the rename itself is on disk
    return path


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s contents to stable storage (the writer may have closed it already)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename inside ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    from efgraph.utils.device import proc_self_status

    value = proc_self_status("Umask")
    if value is not None:
        return int(value, 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask
