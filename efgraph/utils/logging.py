"""Logging with three extra levels for the engine's internals.

``DEBUG_ENERGY`` (energy per step), ``DEBUG_SPAWN`` (spawn/death/arrival counts) and
``DEBUG_CONVERGENCE`` (how flows converge on the output face: per training step, the arrivals
per lattice step, the mean step of arrival and the share of injected energy that arrived, see
:func:`efgraph.training.trainer.arrival_statistics`) sit just below ``DEBUG``. Callers guard
every such call with ``logger.isEnabledFor(level)`` so that a disabled level costs one integer
comparison and never formats a message or copies a tensor to the host.
"""

from __future__ import annotations

import logging

DEBUG_ENERGY = 9
DEBUG_SPAWN = 8
DEBUG_CONVERGENCE = 7

for _level, _name in [(DEBUG_ENERGY, "DEBUG_ENERGY"), (DEBUG_SPAWN, "DEBUG_SPAWN"), (DEBUG_CONVERGENCE, "DEBUG_CONVERGENCE")]:
    logging.addLevelName(_level, _name)

ROOT_LOGGER = "efgraph"


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``efgraph`` namespace (``name`` is usually ``__name__``)."""
    return logging.getLogger(name if name.startswith(ROOT_LOGGER) else f"{ROOT_LOGGER}.{name}")


def setup_logging(level: int | str = logging.INFO) -> logging.Logger:
    """Configure the ``efgraph`` logger once: a stderr handler with timestamps.

    ``level`` may be a number or a name, including ``"DEBUG_ENERGY"`` and friends.
    """
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(f"level: unknown logging level {level!r}")
        level = resolved
    logger = logging.getLogger(ROOT_LOGGER)
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    return logger
