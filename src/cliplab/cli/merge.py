"""`cliplab merge`: weight-space merging."""

from __future__ import annotations

import argparse

from cliplab.cli.arguments import (add_device, add_stage_arguments, config_where, given_by,
                                   naming_models, stage_config)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cliplab merge`, its arguments and its ``--help``, to ``sub``."""
    from cliplab.merge.methods import MERGE_METHODS, method_keys, methods_with

    methods = "; ".join(f"{name}: {m.summary}" for name, m in MERGE_METHODS.items())
    p = sub.add_parser("merge", help="merge fine-tuned models: " + ", ".join(MERGE_METHODS),
                       description="Merge model folders of one architecture and pretrained "
                       f"origin in weight space. {methods}. Writes a model folder plus "
                       "merge.json. Config keys: method, models, base, out, "
                       f"{', '.join(method_keys())}, heldout, metric and device (the held-out "
                       "scoring's), require_origin.",
                       epilog="example: cliplab merge --method greedy --models FT1 FT2 FT3 "
                       "--config configs/merge/greedy-soup.yaml --out runs/soup "
                       "heldout.data.limit=2000")
    p.add_argument("--method", choices=list(MERGE_METHODS), metavar="METHOD",
                   help=f"how to merge: {', '.join(MERGE_METHODS)} (or the config's 'method')")
    p.add_argument("--models", nargs="+", metavar="MODEL", help="the fine-tuned models to "
                   "merge: model, checkpoint or run folders (a run: its newest checkpoint) or "
                   "Hub ids")
    p.add_argument("--base", metavar="MODEL", help="the pretrained model the others were "
                   f"fine-tuned from ({', '.join(methods_with('needs_base'))})")
    add_stage_arguments(p, "new folder for the merged model (or the config's 'out')",
                        "heldout.data.limit=2000 scale=0.5")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous merge output (a model folder) at --out, once the "
                   "merge is written")
    add_device(p)


def run(args: argparse.Namespace) -> int:
    """`cliplab merge`; 0 when it succeeds (bad input raises `CliplabError`)."""
    from cliplab.merge.config import MergeConfig
    from cliplab.merge.run import run_merge

    cfg = stage_config(MergeConfig, args, "the merged model", method=args.method,
                       models=args.models, base=args.base, device=args.device)
    sources = {m.name: given_by(args, "--models", "models") for m in cfg.models}
    if cfg.base is not None:
        sources[cfg.base.name] = given_by(args, "--base", "base")
    with naming_models(sources):
        record = run_merge(cfg, progress=not args.no_progress, where=config_where(args),
                           overwrite=args.overwrite)
    n = len(record["models"])
    line = f"{record['method']} merge of {n} model{'s' * (n != 1)} -> {record['out']}"
    if record["heldout"]:
        held = record["heldout"]
        line += f"; held-out {held['metric']}: merged {held['merged']:.4f}, " + ", ".join(
            f"{k} {v:.4f}" for k, v in held["scores"].items())
    print(line)
    return 0
