"""Where training metrics go: a local JSONL file always, Weights & Biases when enabled.

The W&B mode is decided *before* ``wandb.init``: ``online`` needs an API key (``WANDB_API_KEY``
or an entry for the W&B host in ``$NETRC`` / ``~/.netrc``); without one the run is logged
``offline`` instead of failing or prompting. The key itself is never read into a config, a log
line or the run folder.

W&B's own environment variables win over our defaults, as W&B users expect: with
``--wandb-mode auto`` an exported ``WANDB_MODE`` decides the mode (arguments to ``wandb.init``
would override it, so none is passed), ``WANDB_DIR`` the folder of the W&B files (default: the
run folder), ``WANDB_ENTITY`` / ``WANDB_PROJECT`` / ``WANDB_RUN_GROUP`` / ``WANDB_TAGS`` apply
wherever we have no explicit value, and ``WANDB_SILENT`` the console output (offline runs print
W&B's ``wandb sync`` hint; :func:`efgraph.training.run.run_training` logs it too).

Summaries: validation metrics are defined with ``summary="min"`` / ``"max"``, so the run table
shows the best value, not the last; the run adds ``best/step`` and ``best/val_*``.
"""

from __future__ import annotations

import json
import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from efgraph.data._atomic import atomic_write_text
from efgraph.utils.logging import get_logger

logger = get_logger(__name__)
WANDB_MODES = ("auto", "online", "offline", "disabled")
# W&B's own WANDB_MODE values (dryrun = offline, run = online in older clients)
_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
              "disabled": "disabled", "shared": "online"}
# how the run summary reduces each validation metric: the best value, not the last
VAL_SUMMARIES = {"val/loss": "min", "val/mse": "min", "val/cosine": "max", "val/r_at_1": "max"}


def wandb_api_key_configured() -> bool:
    """True when W&B could authenticate without a prompt (env var or netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    # W&B reads $NETRC when set (as curl does); Python's netrc module only knows ~/.netrc
    path = os.environ.get("NETRC") or None
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def env_wandb_mode() -> str | None:
    """The mode W&B's environment asks for (``WANDB_MODE``, or ``WANDB_DISABLED=true``), else None.

    Raises:
        ValueError: ``WANDB_MODE`` holds a value W&B does not know.
    """
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled"
    value = os.environ.get("WANDB_MODE", "").strip().lower()
    if not value:
        return None
    if value not in _ENV_MODES:
        raise ValueError(f"WANDB_MODE: must be one of {sorted(_ENV_MODES)}, got {value!r}")
    return _ENV_MODES[value]


def resolve_wandb_mode(requested: str) -> str:
    """``auto`` -> W&B's environment (``WANDB_MODE``) when set, else like ``online``;
    ``online`` -> ``online`` with a key else ``offline``; others as given."""
    if requested not in WANDB_MODES:
        raise ValueError(f"wandb mode: must be one of {WANDB_MODES}, got {requested!r}")
    if requested == "auto" and env_wandb_mode() is not None:
        return env_wandb_mode()
    if requested in ("auto", "online"):
        if wandb_api_key_configured():
            return "online"
        if requested == "online":
            logger.warning("wandb: no API key configured (WANDB_API_KEY or netrc); logging offline instead")
        return "offline"
    return requested


def read_metric_rows(path: str | Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (only those at steps <= ``up_to_step`` when given); a line
    cut short by a kill is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if up_to_step is None or ("step" in row and row["step"] <= up_to_step):
            rows.append(row)
    return rows


def write_metric_rows(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``rows`` atomically: a kill during the rewrite must not cost the rows
    kept (a plain ``write_text`` truncates the file first, then writes)."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


class RunLogger:
    """Logs metrics with an explicit, monotonic step to ``metrics.jsonl`` and (optionally) W&B.

    Args:
        run_dir: folder of the run; ``metrics.jsonl`` is appended there (``None``: nowhere).
        wandb_run: an initialised ``wandb`` run, or ``None``.
    """

    def __init__(self, run_dir: str | Path | None = None, wandb_run: Any = None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.wandb_run = wandb_run
        self._last_step = -1

    @classmethod
    def create(cls, run_dir: str | Path, *, mode: str, project: str, config: dict[str, Any], name: str | None = None,
               run_id: str | None = None, group: str | None = None, job_type: str | None = None,
               tags: Sequence[str] = (), entity: str | None = None) -> "RunLogger":
        """Start W&B in ``mode`` (already resolved) in ``run_dir``; resume ``run_id`` when given.

        ``group``, ``job_type`` and ``tags`` organise runs in the W&B UI: a study gives all its
        runs one group and each variant its own job type, so runs can be grouped by variant.
        ``None`` / empty values leave W&B's environment variables (``WANDB_ENTITY``,
        ``WANDB_RUN_GROUP``, ``WANDB_TAGS``, ...) in charge, and so does an exported
        ``WANDB_MODE`` equal to ``mode`` (no ``mode=`` is passed then).
        """
        if mode == "disabled":
            return cls(run_dir, None)
        import wandb

        run = wandb.init(
            project=project, entity=entity, name=name, config=config,
            # WANDB_DIR, when exported, decides where the W&B files go (wandb.init's dir= would override it)
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            mode=None if env_wandb_mode() == mode else mode, id=run_id,
            resume="allow" if run_id else None, group=group, job_type=job_type, tags=list(tags) or None,
            # console="off": our own log lines are the console; not silent, so that an offline run
            # still prints W&B's `wandb sync` hint (WANDB_SILENT=true silences it, as W&B documents)
            settings=wandb.Settings(console="off"),
        )
        # the run table shows each validation metric's best value; x-axis: the global step
        for key, summary in VAL_SUMMARIES.items():
            run.define_metric(key, summary=summary)
        return cls(run_dir, run)

    @property
    def wandb_id(self) -> str | None:
        return None if self.wandb_run is None else self.wandb_run.id

    def truncate_after(self, step: int) -> None:
        """Drop ``metrics.jsonl`` rows past ``step``: a run resumed from a checkpoint at ``step``
        logs those steps again, and a crashed run may have logged them already."""
        path = None if self.run_dir is None else self.run_dir / "metrics.jsonl"
        if path is None or not path.exists():
            return
        write_metric_rows(path, read_metric_rows(path, step))
        self._last_step = step

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._append({"step": step, **metrics}, step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def _append(self, row: dict[str, Any], step: int) -> None:
        """Append ``row`` to ``metrics.jsonl`` at ``step``, which must not go back past the last one."""
        if step < self._last_step:
            raise ValueError(f"step: must not go backwards ({step} < {self._last_step})")
        self._last_step = step
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def alert(self, title: str, text: str, *, step: int | None = None) -> None:
        """Raise a warning-level alert about the run.

        With a W&B run it is a ``run.alert`` at level WARN (online: mailed / posted as the W&B
        user's alert settings say; offline: kept in the run file and sent by ``wandb sync``).
        Without one nothing is sent. Either way the alert is a row of ``metrics.jsonl``,
        ``{"step": step, "alert": {"title", "text", "level"}}``, at ``step`` (default: the last
        logged step), so the run folder records it too.

        Raises:
            ValueError: if ``title`` is empty or 64 characters or longer (W&B's limit), or
                ``step`` goes back past the last logged step.
        """
        if not title or len(title) >= 64:
            raise ValueError(f"title: must be 1 to 63 characters (a W&B alert title), got {len(title)}: {title!r}")
        step = self._last_step if step is None else step
        self._append({"step": step, "alert": {"title": title, "text": text, "level": "WARN"}}, step)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.alert(title=title, text=text, level=wandb.AlertLevel.WARN)

    def log_histograms(self, values: dict[str, Any], step: int) -> None:
        """``values``: name -> 1-D array-like; W&B histograms (locally, figures cover them)."""
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({k: wandb.Histogram(v) for k, v in values.items()}, step=step)

    def log_images(self, paths: dict[str, str | Path], step: int) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({k: wandb.Image(str(p)) for k, p in paths.items()}, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def log_summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = v

    def log_artifact(self, path: str | Path, name: str, kind: str = "model",
                     metadata: dict[str, Any] | None = None) -> None:
        """A W&B artifact of a file or a whole folder (e.g. the exported ``model/``)."""
        if self.wandb_run is not None:
            import wandb

            artifact = wandb.Artifact(name, type=kind, metadata=metadata)
            if Path(path).is_dir():
                artifact.add_dir(str(path))
            else:
                artifact.add_file(str(path))
            self.wandb_run.log_artifact(artifact)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
