"""Stops that lose nothing: SIGTERM, SIGINT and SIGUSR1 end training after a whole step, saved.

A cluster scheduler sends SIGTERM before it pre-empts a job (Slurm can send SIGUSR1 earlier, as a
warning, with ``--signal=USR1@SECONDS``), and Ctrl-C sends SIGINT. While
:meth:`EnergyTrainer.train <efgraph.training.trainer.EnergyTrainer.train>` runs, these signals
only *request* a stop (:class:`StopRequest`): the trainer finishes the current optimizer step,
writes ``checkpoints/last.pt`` and raises :class:`TrainingInterrupted`, which exits with the
signal's conventional status (128 + signal number) when nobody catches it. A second Ctrl-C
during the stop stops at once (``KeyboardInterrupt``, the previous handlers restored).

The handlers are installed only while training runs, only from the main thread (Python delivers
signals there; elsewhere nothing is installed and the process keeps its own handling), never
over a signal the process ignores (a job started in the background by a shell ignores SIGINT),
and the previous handlers are put back afterwards, so a program that calls ``train`` keeps its
own handling of these signals outside it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

# what asks for a stop (SIGUSR1 does not exist on Windows)
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)
)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after a whole optimizer step, with its state saved.

    A :class:`SystemExit` whose ``code`` is 128 + the signal number (143 for SIGTERM, 130 for
    SIGINT, 138 for SIGUSR1): uncaught, the process exits with the status the signal itself
    would have given, without a traceback. A stop on SIGINT is also a ``KeyboardInterrupt``, so
    code that catches Ctrl-C around training still does.

    Attributes:
        signum: the signal that asked for the stop.
        step: the global step the state was saved at.
        checkpoint: the ``last.pt`` written (``None`` without a run folder, or on ranks other than 0).
    """

    def __new__(cls, signum: int, step: int, checkpoint: Any = None) -> TrainingInterrupted:
        if cls is TrainingInterrupted and signum == signal.SIGINT:
            cls = _KeyboardTrainingInterrupted
        return super().__new__(cls, 128 + signum)

    def __init__(self, signum: int, step: int, checkpoint: Any = None) -> None:
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint = int(signum), step, checkpoint

    @property
    def signal_name(self) -> str:
        return signal_name(self.signum)

    def __str__(self) -> str:
        saved = f"; state saved in {self.checkpoint}" if self.checkpoint is not None else ""
        return f"{self.signal_name}: training stopped after step {self.step}{saved}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (TrainingInterrupted, (self.signum, self.step, self.checkpoint))


class _KeyboardTrainingInterrupted(TrainingInterrupted, KeyboardInterrupt):
    """:class:`TrainingInterrupted` on SIGINT: also a ``KeyboardInterrupt``."""


class StopRequest:
    """While entered, :data:`STOP_SIGNALS` set :attr:`signum` (the first one) instead of ending the
    process; a second SIGINT restores the previous handlers and raises ``KeyboardInterrupt``.

    On exit the previous handlers are restored. Outside the main thread it installs nothing
    (:attr:`installed` is false) and :attr:`signum` stays ``None``.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            previous = signal.getsignal(sig)
            # an ignored signal stays ignored; a handler installed outside Python (None) could not be put back
            if previous is signal.SIG_IGN or previous is None:
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the previous handlers back (idempotent)."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            _say(f"\n{signal_name(signum)}: stopping after this step, saving checkpoints/last.pt{again}\n")
        elif signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt
        # a repeated SIGTERM or SIGUSR1 (e.g. Slurm's warning, then the SIGTERM) changes nothing: the stop is under way


def _say(text: str) -> None:
    """Write to stderr from a signal handler: ``os.write`` on the descriptor, not the (possibly
    mid-write, non-reentrant) buffered ``sys.stderr``."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):  # no real descriptor (e.g. captured): say nothing
        pass
