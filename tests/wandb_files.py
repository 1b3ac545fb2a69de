"""Read back what a W&B run logged, from its local ``.wandb`` file (offline runs included).

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks
of records, each ``crc32c (4) | length (2, little endian) | type (1) | payload``, where a payload
split across blocks is marked FIRST / MIDDLE / LAST. Each reassembled payload is a
``wandb_internal_pb2.Record``. We read it ourselves because the SDK no longer ships a Python
reader (its internals moved to the Go ``wandb-core``), and the tests check what a
run recorded without uploading it. Only the tests use it, so it lives beside them, not in the package.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yield every ``Record`` protobuf stored in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if len(data) < 7 or data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (bad header)")
    pos, pending = 7, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        pos += HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:  # zero padding at the end of a file being written
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos - length - HEADER}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        yield record
        pending = b""


def logged_history(path: str | Path) -> list[dict[str, Any]]:
    """Every ``wandb.log`` row as a dict (values JSON-decoded), with ``_step``."""
    rows = []
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            if record.history.HasField("step"):
                row.setdefault("_step", record.history.step.num)
            rows.append(row)
    return rows


def logged_keys(path: str | Path) -> set[str]:
    """All history keys, plus ``summary:<key>`` for summary updates and ``artifact:<name>``."""
    keys: set[str] = set()
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
        elif kind == "summary":
            keys.update("summary:" + (item.key or "/".join(item.nested_key)) for item in record.summary.update)
        elif kind == "artifact":
            keys.add("artifact:" + record.artifact.name)
        elif kind == "config":
            keys.update("config:" + (item.key or "/".join(item.nested_key)) for item in record.config.update)
    return keys


def logged_alerts(path: str | Path) -> list[dict[str, str]]:
    """Every ``run.alert`` of the run, in order: ``{"title", "text", "level"}``."""
    return [{"title": r.alert.title, "text": r.alert.text, "level": r.alert.level}
            for r in iter_records(path) if r.WhichOneof("record_type") == "alert"]


def run_grouping(path: str | Path) -> dict[str, Any]:
    """How the run is filed in the W&B UI: ``{"name", "group", "job_type", "tags"}`` (last run record)."""
    info: dict[str, Any] = {}
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            info = {"name": run.display_name, "group": run.run_group, "job_type": run.job_type,
                    "tags": list(run.tags)}
    if not info:
        raise ValueError(f"{path}: no run record")
    return info


def find_run_file(run_dir: str | Path) -> Path:
    """The ``.wandb`` file of the (single, latest) W&B run under ``run_dir/wandb``."""
    files = sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{run_dir}: no wandb/*run-*/run-*.wandb file")
    return files[-1]


def logged_metric_summaries(path: str | Path) -> dict[str, str]:
    """How each ``define_metric``'d key is summarised: ``{"val/loss": "min", ...}`` (the last
    definition of a key wins; several reductions are joined with ``","``)."""
    out: dict[str, str] = {}
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "metric" and record.metric.name:
            summary = record.metric.summary
            chosen = [f.name for f in summary.DESCRIPTOR.fields if getattr(summary, f.name)]
            out[record.metric.name] = ",".join(chosen)
    return out
