"""Reports of runs and studies: a W&B Report, or the same content as one self-contained HTML file.

``scripts/report.py RUN_OR_STUDY_DIR... --output report.html`` reads local run folders (written by
:func:`efgraph.training.run.run_training`) and study folders (``study.json`` + one run folder per
variant and seed, see :mod:`efgraph.training.study`):

* the W&B Report (:func:`build_wandb_report`, with the ``wandb-workspaces`` library) has loss
  and validation curves, flow-dynamics panels, the learning-diagnostics panels (``diag/...``, one
  line per lattice step), the model-vs-baselines table and the figures of the runs, selected by
  their W&B names (or the study's group). Building it needs no network;
  ``Report.save()`` needs an API key and the network.
* the HTML file (:func:`write_html_report`) needs neither: the same sections from the folders'
  ``metrics.jsonl`` (curves drawn with matplotlib, embedded as base64 PNG), ``results.json`` /
  ``study.md`` (tables) and the figures (embedded PNG).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from efgraph.data._atomic import atomic_write_text
from efgraph.training.baselines import format_results_table
from efgraph.training.run_logger import read_metric_rows

# the sections of both reports: (title, metric keys drawn in one panel)
CURVE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Training loss (mean over each log interval)", ("train/loss",)),
    ("Validation loss", ("val/loss",)),
    ("Validation cosine and R@1", ("val/cosine", "val/r_at_1")),
)
DYNAMICS_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Active flows per forward (whole batch)", ("flows/mean_active_flows", "flows/peak_active_flows")),
    ("Arrivals per sample", ("flows/arrived_per_sample", "flows/spawned_per_sample")),
    ("Energy that arrived / was created (fraction of injected)",
     ("flows/energy_arrived_fraction", "flows/energy_created_fraction")),
    ("Steps without any arrival (dead-run alarm)", ("flows/zero_arrival_steps",)),
)
# the learning diagnostics of the logged steps (efgraph.core.diagnostics). A key ending in
# STEP_PATTERN stands for every lattice step a run logged (k = 1, 2, ...): the HTML draws one line
# per step present in metrics.jsonl, the W&B panel selects them by a regular expression
STEP_PATTERN = "_step_*"
DIAGNOSTICS_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Gradient reaching each lattice step: |d loss / d carrier input| per flow", ("diag/grad_carrier_in_step_*",)),
    ("Gradient on each lattice step's move (dxy, dz)", ("diag/grad_move_step_*",)),
    ("Gradient on each lattice step's energy logit", ("diag/grad_energy_step_*",)),
    ("Share of the output carried by each lattice step's arrivals", ("diag/output_share_step_*",)),
    ("Output-face cells receiving energy per sample",
     ("diag/landing_cells_per_sample", "diag/landing_effective_cells")),
    ("Start-cell churn of the probe batch between logged steps", ("diag/start_churn",)),
)
FIGURES = ("flow_paths", "landing", "flow_counts", "channels")


def step_key_regex(key: str) -> str:
    """The regular expression of a per-step key (``..._step_*``): ``^..._step_\\d+$``."""
    return "^" + re.escape(key[: -len(STEP_PATTERN)]) + r"_step_\d+$"


def expand_keys(keys: tuple[str, ...], rows: list[dict[str, Any]]) -> list[str]:
    """The metric keys a panel draws from ``rows``: fixed keys as they are, a per-step key
    (``..._step_*``) as every ``..._step_k`` in the rows, by step."""
    out: list[str] = []
    for key in keys:
        if not key.endswith(STEP_PATTERN):
            out.append(key)
            continue
        pattern = re.compile(step_key_regex(key))
        found = {k for row in rows for k in row if pattern.match(k)}
        out += sorted(found, key=lambda k: int(k.rsplit("_", 1)[1]))
    return out


@dataclass
class RunRecord:
    """What a run folder holds, read once."""

    path: Path
    name: str
    config: dict[str, Any]
    results: dict[str, Any] | None  # results.json; None while the run is unfinished
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    figures: dict[str, Path] = field(default_factory=dict)
    study: str | None = None  # the study (W&B group) the run belongs to
    wandb_name: str | None = None


@dataclass
class StudyRecord:
    path: Path
    name: str
    table: str  # study.md
    runs: list[RunRecord]


def read_run(path: str | Path, *, study: str | None = None, wandb_name: str | None = None) -> RunRecord:
    """Read a run folder (``config.yaml`` required; ``results.json`` and ``metrics.jsonl`` when present)."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise ValueError(f"{path}: not a run folder (no config.yaml)")
    config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    results = json.loads((path / "results.json").read_text(encoding="utf-8")) if (path / "results.json").is_file() else None
    rows = read_metric_rows(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
    figures = {name: path / f"{name}.png" for name in FIGURES if (path / f"{name}.png").is_file()}
    return RunRecord(path, path.name, config, results, rows, figures, study, wandb_name or path.name)


def read_folders(paths: list[str | Path]) -> tuple[list[RunRecord], list[StudyRecord]]:
    """Runs and studies named on the command line (a study brings all its run folders).

    Raises:
        ValueError: a path that is neither a run folder nor a study folder, naming it.
    """
    runs: list[RunRecord] = []
    studies: list[StudyRecord] = []
    for raw in paths:
        path = Path(raw)
        if (path / "study.json").is_file():
            study = json.loads((path / "study.json").read_text(encoding="utf-8"))
            name = study.get("name", path.name)
            members = []
            for record in study.get("runs", []):
                # the study's layout (STUDY/<variant>/seed<seed>) first: run_dir was written relative
                # to the folder the study ran in, which need not be ours
                run_dir = path / str(record.get("variant")) / f"seed{record.get('seed')}"
                if not (run_dir / "config.yaml").is_file() and "run_dir" in record:
                    run_dir = Path(record["run_dir"])
                if not (run_dir / "config.yaml").is_file():
                    continue
                members.append(read_run(run_dir, study=name,
                                        wandb_name=f"{name}-{record.get('variant')}-seed{record.get('seed')}"))
            if not members:  # older study.json without run folders: every run folder below it
                members = [read_run(p.parent, study=name) for p in sorted(path.glob("*/*/config.yaml"))
                           if (p.parent / "results.json").is_file()]
            table = (path / "study.md").read_text(encoding="utf-8") if (path / "study.md").is_file() else ""
            studies.append(StudyRecord(path, name, table, members))
        elif (path / "config.yaml").is_file():
            runs.append(read_run(path))
        else:
            raise ValueError(f"{path}: neither a run folder (config.yaml) nor a study folder (study.json)")
    return runs, studies


# ---- W&B Report ------------------------------------------------------------------------------
def build_wandb_report(runs: list[RunRecord], studies: list[StudyRecord], *, entity: str, project: str,
                       title: str = "efgraph report", description: str = "") -> Any:
    """The W&B Report (``wandb_workspaces.reports.v2.Report``) of these runs and studies.

    Built without network: call ``.save()`` (API key and network needed) to publish it. One
    panel grid per study (its runs selected by W&B group) and one for the single runs (selected
    by W&B run name), each with the curves, the flow-dynamics panels, the model-vs-baselines table
    (``test/results``, a W&B table logged by every run) and the figures.
    """
    import wandb_workspaces.reports.v2 as wr

    def line_plot(title: str, keys: tuple[str, ...]) -> Any:
        fixed = [k for k in keys if not k.endswith(STEP_PATTERN)]
        per_step = [step_key_regex(k) for k in keys if k.endswith(STEP_PATTERN)]
        assert len(per_step) <= 1, f"{title}: one per-step key per panel (W&B takes one regular expression)"
        return wr.LinePlot(title=title, x="Step", y=fixed, metric_regex=per_step[0] if per_step else None)

    def grid(runset: Any) -> Any:
        panels: list[Any] = [line_plot(t, keys) for t, keys in CURVE_PANELS + DYNAMICS_PANELS + DIAGNOSTICS_PANELS]
        panels.append(wr.BarPlot(title="Test cosine: model vs baselines",
                                 metrics=[wr.SummaryMetric(f"test/{m}/cosine")
                                          for m in ("energy-flow", "identity", "ridge", "mlp", "transformer")]))
        panels.append(wr.WeavePanelSummaryTable(table_name="test/results"))
        panels.append(wr.MediaBrowser(title="Figures", media_keys=[f"figures/{f}" for f in FIGURES]))
        return wr.PanelGrid(runsets=[runset], panels=panels)

    blocks: list[Any] = [wr.H1(title)]
    if description:
        blocks.append(wr.P(description))
    for study in studies:
        blocks += [wr.H2(f"Study {study.name}"), wr.MarkdownBlock(study.table or "(no study.md yet)"),
                   grid(wr.Runset(entity=entity, project=project, name=study.name,
                                  filters=f"Group == {study.name!r}", groupby=["JobType"]))]
    if runs:
        names = [r.wandb_name or r.name for r in runs]
        blocks.append(wr.H2("Runs"))
        for run in runs:
            blocks += [wr.H3(run.name), wr.MarkdownBlock(_results_markdown(run))]
        blocks.append(grid(wr.Runset(entity=entity, project=project, name="runs", filters=f"Name in {names!r}")))
    return wr.Report(project=project, entity=entity, title=title, description=description, blocks=blocks)


# ---- self-contained HTML ---------------------------------------------------------------------
def write_html_report(runs: list[RunRecord], studies: list[StudyRecord], output: str | Path,
                      title: str = "efgraph report") -> Path:
    """One HTML file with every table, curve and figure inline (no network, no other files)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%}.curves img{width:49%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for study in studies:
        parts += [f"<h2>Study {html.escape(study.name)}</h2>", _markdown_to_html(study.table),
                  "<div class='curves'>", *_curve_images(study.runs), "</div>"]
    if runs:
        parts.append("<h2>Runs</h2>")
        for run in runs:
            parts += [f"<h3>{html.escape(run.name)}</h3>", _markdown_to_html(_results_markdown(run)),
                      "<div class='curves'>", *_curve_images([run]), "</div>"]
            parts += [f"<h4>{name}</h4><img alt='{name}' src='data:image/png;base64,{_b64(p.read_bytes())}'>"
                      for name, p in run.figures.items()]
    parts.append("</body></html>")
    return atomic_write_text(output, "\n".join(parts) + "\n")


def _results_markdown(run: RunRecord) -> str:
    """The test table, the selected step and how the split and baselines were made."""
    if run.results is None:
        last = max((r["step"] for r in run.rows), default=0)
        return f"Unfinished run: last logged step {last}; no test results yet."
    res = run.results
    lines = format_results_table(res["test"]).splitlines()
    facts = [f"dataset `{res.get('dataset')}`", f"{res.get('num_parameters', 0):,} parameters",
             f"best step {res.get('best_step')} of {res.get('total_steps', '?')}"]
    split = res.get("split")
    if split:
        facts.append(f"split by {split['by']}" + (f" ({split['groups']} groups)" if split.get("groups") else "")
                     + f", data_seed {split['data_seed']}")
    baselines = res.get("baselines") or {}
    if "ridge" in baselines:
        facts.append(f"ridge alpha {baselines['ridge']['alpha']:g}")
    for name in ("mlp", "residual-mlp"):
        if name in baselines:
            facts.append(f"{name} width {baselines[name]['hidden_dim']}, best step {baselines[name]['best_step']}")
    for name in ("transformer", "residual-transformer"):
        if name in baselines:
            b = baselines[name]
            facts.append(f"{name} {b['tokens']} tokens x {b['width']}, {b['layers']} layers, best step {b['best_step']}")
    return "\n".join(lines) + "\n\n" + "; ".join(facts)


def _curve_images(runs: list[RunRecord]) -> list[str]:
    """One PNG per panel (curves and dynamics), a line per run and key, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for title, keys in CURVE_PANELS + DYNAMICS_PANELS + DIAGNOSTICS_PANELS:
        fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=90)
        drawn = False
        for run in runs:
            for key in expand_keys(keys, run.rows):
                points = [(r["step"], r[key]) for r in run.rows if key in r and r[key] is not None]
                if points:
                    xs, ys = zip(*points)
                    label = key if len(runs) == 1 else f"{run.name} {key}"
                    ax.plot(xs, ys, label=label, linewidth=1.2, marker="." if len(points) < 30 else None)
                    drawn = True
        if drawn:
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.legend(fontsize=6)
            buf = io.BytesIO()
            fig.tight_layout()
            fig.savefig(buf, format="png")
            out.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{_b64(buf.getvalue())}'>")
        plt.close(fig)
    return out


def _markdown_to_html(text: str) -> str:
    """results.md / study.md as HTML (CommonMark with tables; raw HTML in the text is escaped),
    headings demoted by two levels to sit under the report's own ``h1`` / ``h2``."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("js-default")  # CommonMark + GFM tables, html off
    tokens = md.parse(text)
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(int(token.tag[1]) + 2, 6)}"
    return md.renderer.render(tokens, md.options, {})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
