"""`cliplab curate`: filter and deduplicate an image-text pool."""

from __future__ import annotations

import argparse
from pathlib import Path

from cliplab.cli.arguments import (add_data_argument, add_device, add_stage_arguments,
                                   check_out_is_not_input, config_where, stage_config)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cliplab curate`, its arguments and its ``--help``, to ``sub``."""
    p = sub.add_parser("curate", help="curate an image-text pool: filter, deduplicate, report",
                       description="Read a pool (--data, or the config's data: a built-in "
                       "source, a manifest, a shard folder or an image folder), run the config's "
                       "steps in order (basic rules, exact dedup, ...), and write to --out the "
                       "kept pool (shards or a manifest), "
                       "dropped.parquet (every dropped item with its step and reason), "
                       "summary.json and report.md/report.html. Sources are never modified; a "
                       "killed run resumes when re-run with the same config. Config keys: "
                       "data, steps (each {step, name, and its rule's keys}), output {format, "
                       "samples_per_shard}, chunk_size, seed, engine, workers, ray_address, "
                       "examples, device, out.",
                       epilog="example: cliplab curate --config configs/curate/basic.yaml "
                       "--data photos/ --out runs/curated chunk_size=128")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (or a half-finished run of another config)")
    p.add_argument("--engine", choices=["local", "ray"], help="local (default: this process, or "
                   "--workers processes) or ray (Ray actors; ray_address=HOST:PORT for a cluster)")
    p.add_argument("--workers", type=int, metavar="N", help="processes (local) or actors (ray) "
                   "mapping chunks in parallel (default: the config's workers, 1)")
    add_device(p)
    add_data_argument(p)
    add_stage_arguments(p, "folder to write the curated pool and report into",
                        "steps.0.min_words=3 workers=2", config_required=True)


def run(args: argparse.Namespace) -> int:
    """`cliplab curate`; 0 when it succeeds (bad input raises `CliplabError`)."""
    from cliplab.curate.config import CurateConfig
    from cliplab.curate.pipeline import run_curation
    from cliplab.output_folder import spec_paths

    cfg = stage_config(CurateConfig, args, "the curated pool", engine=args.engine,
                       workers=args.workers, device=args.device)
    check_out_is_not_input(cfg.out, spec_paths(cfg.data))
    summary = run_curation(cfg, progress=not args.no_progress, overwrite=args.overwrite,
                           where=config_where(args))
    steps = ", ".join(f"{s['dropped']} by {s['name']}" for s in summary["steps"])
    print(f"kept {summary['kept']} of {summary['pool']} items (dropped {steps}); wrote "
          f"{Path(cfg.out) / summary['output']['path']}, dropped.parquet, report.html in {cfg.out}")
    return 0
