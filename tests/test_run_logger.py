"""RunLogger: alerts (W&B offline and metrics.jsonl) and how a run is filed (group, job type, tags)."""

from __future__ import annotations

import json

import pytest

from efgraph.training.run_logger import RunLogger
from wandb_files import find_run_file, logged_alerts, run_grouping


def test_alert_goes_to_metrics_jsonl_without_wandb(tmp_path):
    run = RunLogger(tmp_path)
    run.log({"train/loss": 1.0}, 3)
    run.alert("efgraph: dead run", "nothing arrives", step=5)
    run.alert("efgraph: dead run", "again")  # default step: the last one
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1] == {"step": 5, "alert": {"title": "efgraph: dead run", "text": "nothing arrives", "level": "WARN"}}
    assert rows[2]["step"] == 5
    run.truncate_after(4)  # a resumed run drops the alert with the steps after its checkpoint
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="title"):
        run.alert("x" * 64, "too long for W&B")
    with pytest.raises(ValueError, match="step"):
        run.alert("late", "goes back", step=2)
    RunLogger(None).alert("no folder", "is a no-op")


def test_offline_wandb_run_records_the_alert_group_job_type_and_tags(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run = RunLogger.create(tmp_path, mode="offline", project="efgraph-test", config={"seed": 0}, name="full-seed0",
                           group="study-a", job_type="full", tags=["full", "study"])
    run.log({"train/loss": 1.0}, 1)
    run.alert("efgraph: dead run (no flow arrives)", "every flow dies", step=2)
    run.finish()
    import wandb

    wandb.teardown()  # finish() may return before the service has flushed the offline run file
    run_file = find_run_file(tmp_path)
    assert logged_alerts(run_file) == [
        {"title": "efgraph: dead run (no flow arrives)", "text": "every flow dies", "level": "WARN"}]
    assert run_grouping(run_file) == {"name": "full-seed0", "group": "study-a", "job_type": "full",
                                      "tags": ["full", "study"]}


def test_truncate_after_is_atomic_a_crash_mid_rewrite_keeps_every_row(tmp_path, monkeypatch):
    """A kill while metrics.jsonl is rewritten must not cost the rows a resume keeps."""
    import os

    from efgraph.training.run_logger import RunLogger

    log = RunLogger(tmp_path)
    for step in range(1, 6):
        log.log({"train/loss": float(step)}, step)
    before = (tmp_path / "metrics.jsonl").read_text()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        RunLogger(tmp_path).truncate_after(3)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left behind
    monkeypatch.undo()
    RunLogger(tmp_path).truncate_after(3)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
