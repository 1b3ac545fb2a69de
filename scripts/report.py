"""Report runs and studies: a W&B Report, and always one self-contained HTML file.

Examples::

    python scripts/report.py runs/bible-20261125-120000 --output report.html
    python scripts/report.py runs/study-bible runs/debug-1 runs/debug-2 --output study.html
    python scripts/report.py runs/study-bible --wandb --entity my-team --project efgraph

The HTML file needs no network: curves from each run's metrics.jsonl, the model-vs-baselines
tables from results.json / study.md, and the figures, all embedded. With --wandb (an API key and
the network) the same sections are published as a W&B Report of the runs' W&B twins (wandb-workspaces)
and its URL printed. Exit status 2: a path that is no run or study folder, or --wandb without a key.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from efgraph.training.report import build_wandb_report, read_folders, write_html_report
from efgraph.training.run_logger import wandb_api_key_configured


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_OR_STUDY_DIR", help="run folders and study folders")
    p.add_argument("--output", default="report.html", help="the HTML file to write (default: report.html)")
    p.add_argument("--title", default="efgraph report")
    p.add_argument("--wandb", action="store_true", help="also publish a W&B Report (needs an API key and network)")
    p.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"), help="W&B entity (default: WANDB_ENTITY)")
    p.add_argument("--project", default=None,
                   help="W&B project (default: WANDB_PROJECT, else the runs' wandb_project)")
    args = p.parse_args(argv)
    try:
        runs, studies = read_folders(args.paths)
    except ValueError as err:
        p.error(str(err))  # one line, exit 2
    out = write_html_report(runs, studies, args.output, title=args.title)
    print(f"wrote {out}")
    if args.wandb:
        if not wandb_api_key_configured():
            p.error("--wandb: no W&B API key (WANDB_API_KEY, $NETRC or ~/.netrc); the HTML report is written")
        if not args.entity:
            p.error("--entity: needed to publish a W&B Report (or export WANDB_ENTITY)")
        members = runs + [r for s in studies for r in s.runs]
        project = args.project or os.environ.get("WANDB_PROJECT") or (
            members[0].config.get("wandb_project", "efgraph") if members else "efgraph")
        report = build_wandb_report(runs, studies, entity=args.entity, project=project, title=args.title)
        report.save()
        print(f"W&B Report: {report.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
