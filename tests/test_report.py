"""scripts/report.py: the offline HTML report of a tiny run and a study, and the W&B Report object
built without network."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import ROOT, train_script_command


class _Tables(HTMLParser):
    """The text of every table cell of a page, as rows: ``[["model", "cosine", ...], ...]``."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

TINY = [
    "dataset=synthetic", "synthetic_pairs=80", "input_dim=8", "output_dim=8", "lattice_width=4",
    "lattice_height=4", "lattice_depth=4", "initial_flows_per_sample=2", "max_active_flows=6",
    "carrier_hidden_dim=8", "carrier_num_layers=1", "face_channels=4", "readout_hidden_dim=8",
    "batch_size=16", "epochs=2", "eval_every=2", "log_every=1", "checkpoint_every=4", "warmup_steps=1",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("report") / "tiny-run"
    proc = subprocess.run(train_script_command(run, TINY, "--wandb-mode", "disabled", "--device", "cpu"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture
def study(tiny_run, tmp_path) -> Path:
    """A study folder as efgraph.training.study lays it out, holding a copy of the tiny run."""
    folder = tmp_path / "study-x"
    shutil.copytree(tiny_run, folder / "base" / "seed0")
    (folder / "study.json").write_text(json.dumps({"name": "study-x", "runs": [
        {"variant": "base", "seed": 0, "run_dir": "elsewhere/base/seed0"}]}))
    (folder / "study.md").write_text("# Study study-x\n\n| variant | test cosine |\n|---|---:|\n| base | 0.5 |\n")
    return folder


def test_offline_html_report_is_self_contained(tiny_run, study, tmp_path):
    out = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/report.py"), str(tiny_run), str(study),
                           "--output", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = out.read_text()
    results = json.loads((tiny_run / "results.json").read_text())
    # the model-vs-baselines table with the numbers of results.json
    rows = _Tables(page).rows
    for name, metrics in results["test"].items():
        assert [name, f"{metrics['cosine']:.4f}"] in [row[:2] for row in rows], name
    assert ["model", "cosine", "MSE", "R@1", "train s"] in rows
    assert ["base", "0.5"] in rows  # the study table
    assert "Study study-x" in page and "ridge alpha" in page and "split by pair" in page
    images = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", page)
    titles = [t for t, _ in images]
    for expected in ["Training loss (mean over each log interval)", "Validation loss", "flow_paths", "landing",
                     "flow_counts", "Active flows per forward (whole batch)"]:
        assert expected in titles, expected
    assert all(len(data) > 1000 for _, data in images)
    # nothing is fetched from elsewhere
    assert not re.search(r"(src|href)=['\"](https?:|//|file:)", page)


def test_report_refuses_a_folder_that_holds_no_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/report.py"), str(tmp_path), "--output",
                           str(tmp_path / "r.html")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "neither a run folder" in proc.stderr
    assert not (tmp_path / "r.html").exists()


def test_wandb_report_object_is_built_without_network(tiny_run, study, monkeypatch, tmp_path):
    pytest.importorskip("wandb_workspaces")
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces.expr import expr_to_filters

    from efgraph.training.report import build_wandb_report, read_folders

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def no_network(*args, **kwargs):
        raise AssertionError("building the report must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    runs, studies = read_folders([tiny_run, study])
    report = build_wandb_report(runs, studies, entity="team", project="efgraph", title="tiny")
    assert isinstance(report, wr.Report) and (report.entity, report.project) == ("team", "efgraph")
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == 2  # the study's and the single runs'
    study_set, run_set = grids[0].runsets[0], grids[1].runsets[0]
    assert study_set.filters == "Group == 'study-x'" and study_set.groupby == ["JobType"]
    assert run_set.filters == "Name in ['tiny-run']"
    for runset in (study_set, run_set):  # the filters are W&B filter expressions
        expr_to_filters(runset.filters)
    panels = grids[1].panels
    lines = {tuple(p.y) for p in panels if isinstance(p, wr.LinePlot)}
    assert {("train/loss",), ("val/loss",), ("flows/arrived_per_sample", "flows/spawned_per_sample")} <= lines
    assert any(isinstance(p, wr.WeavePanelSummaryTable) and p.table_name == "test/results" for p in panels)
    media = [p for p in panels if isinstance(p, wr.MediaBrowser)][0]
    assert media.media_keys == ["figures/flow_paths", "figures/landing", "figures/flow_counts", "figures/channels"]
    text = " ".join(b.text for b in report.blocks if isinstance(b, wr.MarkdownBlock))
    assert "| energy-flow |" in text and "| base | 0.5 |" in text


def test_markdown_renders_tables_bold_and_code_spans_and_escapes_html():
    from efgraph.training.report import _markdown_to_html

    out = _markdown_to_html("# Study `x`\n\n**Compare on validation.** config `bible.yaml` <script>\n\n"
                            "| a | b |\n|---|---:|\n| **1** | `x` |\n| a\\|b | 2 |\n")
    assert "<h3>Study <code>x</code></h3>" in out  # under the report's h1 / h2
    assert "<p><strong>Compare on validation.</strong> config <code>bible.yaml</code> &lt;script&gt;</p>" in out
    assert "<script>" not in out
    assert "<td><strong>1</strong></td>" in out and "><code>x</code></td>" in out
    # a '|' escaped in a cell (format_results_table escapes model names so) stays in its cell
    assert _Tables(out).rows == [["a", "b"], ["1", "x"], ["a|b", "2"]]
