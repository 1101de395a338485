"""`cliplab data shard`: write a dataset as WebDataset shards."""

from __future__ import annotations

import argparse

from cliplab.cli.arguments import add_data_argument, add_stage_arguments, stage_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cliplab data shard`, its arguments and its ``--help``, to ``sub``."""
    p = sub.add_parser("data", help="dataset tools: write WebDataset shards",
                       description="Dataset tools. `cliplab data shard` writes any built-in "
                       "source, manifest, image folder or shard folder as WebDataset tar shards. "
                       "An image folder whose images have NAME.txt captions beside them is read "
                       "as those captions (an image without one is skipped as missing_caption); "
                       "one without any as classes, one per sub-folder.")
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_sub.required = True
    p = data_sub.add_parser("shard", help="write a dataset as WebDataset tar shards",
                            description="Write a dataset as WebDataset tar shards in img2dataset's "
                            "layout: OUT/00000.tar ... with KEY.jpg|png, KEY.txt, KEY.json (and "
                            "KEY.cls of a labelled set) per sample, NNNNN_stats.json per shard, "
                            "stats.json, sizes.json and index.json. "
                            "Config keys: "
                            "data (the source spec), out, samples_per_shard, image_format, "
                            "quality, overwrite; key=value overrides set any of them, e.g. "
                            "data.split=test data.limit=500 quality=90.",
                            epilog="example: cliplab data shard --data fashion-mnist "
                            "--out shards/fm data.split=test --format png")
    add_data_argument(p, "--source")
    p.add_argument("--samples-per-shard", type=int, metavar="N",
                   help="samples per tar (default 1000)")
    p.add_argument("--format", "--image-format", dest="image_format", choices=["jpg", "png"],
                   help="image encoding (default jpg; png is lossless)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the shards of a non-empty output folder")
    add_stage_arguments(p, "folder to write the shards into (or the config's 'out')",
                        "data.split=test samples_per_shard=500 image_format=png")


def run(args: argparse.Namespace) -> int:
    """`cliplab data shard`; 0 when it succeeds (bad input raises `CliplabError`)."""
    from cliplab.data.shards.job import ShardConfig, run_shard
    from cliplab.data.shards.write import check_out_folder
    from cliplab.data.types import SkipReport
    from cliplab.output_folder import spec_paths

    cfg = stage_config(ShardConfig, args, "the shards", samples_per_shard=args.samples_per_shard,
                       image_format=args.image_format, overwrite=args.overwrite)
    check_out_folder(cfg.out, cfg.overwrite, spec_paths(cfg.data))
    index = run_shard(cfg, progress=not args.no_progress)
    shards = len(index["shards"])
    total = index["total"]
    print(f"wrote {total} sample{'s' * (total != 1)} in {shards} shard{'s' * (shards != 1)} to "
          f"{cfg.out}; {SkipReport.from_dict(index['skipped']).summary()}")
    return 0
