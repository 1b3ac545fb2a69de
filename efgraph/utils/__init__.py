"""Logging and device helpers."""

from efgraph.utils.device import get_device, memory_report, process_rss_mb
from efgraph.utils.logging import DEBUG_CONVERGENCE, DEBUG_ENERGY, DEBUG_SPAWN, get_logger, setup_logging

__all__ = [
    "DEBUG_CONVERGENCE", "DEBUG_ENERGY", "DEBUG_SPAWN", "get_device", "get_logger", "memory_report",
    "process_rss_mb", "setup_logging",
]
