"""Pick a device and report memory use."""

from __future__ import annotations

import resource
import sys

import torch


def get_device(preference: str | None = None) -> torch.device:
    """``"auto"``/``None`` -> CUDA when available, else CPU; otherwise the named device.

    Raises ``ValueError`` for an unknown name or a CUDA device that is not present.
    """
    if preference in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as err:
        raise ValueError(f"device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {preference!r} requested but CUDA is not available")
    return device


def proc_self_status(field: str) -> str | None:
    """The value of ``field`` (``"VmRSS"``, ``"VmHWM"``, ``"Umask"``, ...) in ``/proc/self/status``,
    or ``None`` where there is none (not Linux). The one reader of that file."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return line.split(maxsplit=1)[1].strip()
    except OSError:
        pass
    return None


def process_rss_mb(peak: bool = False) -> float:
    """This process's resident set size in MiB: now, or with ``peak`` its high-water mark.

    Linux: ``VmRSS`` (``VmHWM`` for the peak) of ``/proc/self/status``; elsewhere ``ru_maxrss``,
    which is the peak, for both. The one RSS reader of the package and its scripts.
    """
    value = proc_self_status("VmHWM" if peak else "VmRSS")
    if value is not None:
        return int(value.split()[0]) / 2**10  # "1234 kB"
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2**20 if sys.platform == "darwin" else max_rss / 2**10  # bytes on macOS, else KiB


def memory_report(device: torch.device | str | None = None) -> dict[str, float]:
    """Memory in MiB: CUDA allocated / peak on a CUDA device, process RSS otherwise (and always)."""
    device = torch.device(device) if device is not None else get_device()
    report = {"rss_mb": process_rss_mb()}
    if device.type == "cuda":
        report["cuda_allocated_mb"] = torch.cuda.memory_allocated(device) / 2**20
        report["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return report


def apply_num_threads(num_threads: int) -> int:
    """Set this process's CPU threads (``torch.set_num_threads``) when ``num_threads > 0`` (a
    config's ``num_threads``; 0 leaves PyTorch's default); returns the count now in force."""
    if num_threads < 0:
        raise ValueError(f"num_threads: must be >= 0 (0 = PyTorch's default), got {num_threads}")
    if num_threads > 0 and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()
