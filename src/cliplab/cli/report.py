"""`cliplab report`: Markdown + HTML reports of results and runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from cliplab.cli.arguments import add_stage_arguments, stage_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cliplab report`, its arguments and its ``--help``, to ``sub``."""
    p = sub.add_parser("report", help="Markdown + HTML report with tables and plots from "
                       "results files and run folders",
                       description="Read results JSON files (cliplab eval --out), run folders "
                       "(results.json, metrics.jsonl, config.yaml) and/or merge output "
                       "folders (merge.json) and write "
                       "report.md and a self-contained report.html: one table per task with "
                       "one column per model, few-shot curves, accuracy vs concept frequency, "
                       "training curves. The inputs are named by --inputs (or the config's "
                       "'inputs'), never guessed from the other arguments. Config keys: "
                       "inputs, title, names (one label per input), plots (true/false), out.",
                       epilog="example: cliplab report --inputs runs/a/results.json runs/b "
                       "--out reports/ab title=\"a vs b\"")
    p.add_argument("--inputs", nargs="+", metavar="RUN_OR_RESULTS",
                   help="results JSON files, run folders and/or merge output folders "
                   "(key=value words among them are overrides)")
    add_stage_arguments(p, "folder for report.md, report.html and plots/ (or the config's "
                        "'out'); a previous report there is rewritten",
                        "title=\"a vs b\" plots=false")


def run(args: argparse.Namespace) -> int:
    """`cliplab report`; 0 when it succeeds (bad input raises `CliplabError`)."""
    from cliplab.evaluate.report import ReportConfig, write_report

    cfg = stage_config(ReportConfig, args, "the report", inputs=args.inputs)
    written = write_report(cfg.inputs, cfg.out, cfg, progress=not args.no_progress)
    plots = len(written) - 2
    print(f"report: {written['markdown']} and {written['html']} "
          + (f"({plots} plot(s) in {Path(cfg.out) / 'plots'})" if plots else "(no plots)"))
    return 0
