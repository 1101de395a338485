"""`cliplab quickstart`: the main job, a small LiT run end to end."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cliplab.cli.arguments import (add_common, add_debug, add_device, config_where,
                                   naming_models, train_options)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cliplab quickstart`, its arguments and its ``--help``, to ``sub``."""
    p = sub.add_parser("quickstart", help="LiT-pretrain on Fashion-MNIST, test zero-shot "
                       "transfer to held-out classes (a few minutes on a CPU)",
                       description="Pretrain the lit-minilm preset on Fashion-MNIST with three "
                       "classes held out, then report zero-shot accuracy on them and on all "
                       "classes, and a linear probe. Writes a run folder with config.yaml, "
                       "metrics.jsonl, the checkpoint and results.json. Config keys: model "
                       "{name, options}, data {data_dir, heldout, train_limit, test_limit, "
                       "descriptions, validation}, train (as pretrain's), eval "
                       "{probe_train_size, probe_l2, probe_features, probe_layers}, out "
                       "(configs/quickstart.yaml lists each at its default).")
    add_common(p, "train.epochs=1 train.batch_size=128")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/quickstart-<time>)",
                   type=os.path.expanduser)
    p.add_argument("--data-dir", metavar="DIR", type=os.path.expanduser,
                   help="folder with the Fashion-MNIST IDX files (default "
                   "$CLIPLAB_FASHION_MNIST, else Debian's /usr/share/datasets/fashion-mnist)")
    add_device(p, key="train.device")
    add_debug(p)


def run(args: argparse.Namespace) -> int:
    """`cliplab quickstart`; 0 when it succeeds (bad input raises `CliplabError`)."""
    from cliplab.config import load_config
    from cliplab.quickstart import QuickstartConfig, format_results, run_quickstart

    extra: dict = {"out": args.out, "train": train_options(args)}
    if args.data_dir:
        extra["data"] = {"data_dir": args.data_dir}
    cfg = load_config(QuickstartConfig, args.config, args.overrides, extra=extra)
    with naming_models({cfg.model.name: f"{config_where(args)}: model"}):
        results = run_quickstart(cfg, progress=not args.no_progress)
    print(format_results(results))
    print(f"run folder: {Path(results['model_dir']).parents[2]}")
    return 0
