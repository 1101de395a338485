"""`cliplab convert`: another framework's checkpoint as a transformers model folder."""

from __future__ import annotations

import argparse
import os

from cliplab.cli.arguments import add_debug, naming_models, require_out, show_required


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cliplab convert`, its arguments and its ``--help``, to ``sub``."""
    p = sub.add_parser("convert", help="import an OpenCLIP checkpoint as a transformers "
                       "CLIPModel folder",
                       description="Convert an OpenCLIP checkpoint (a .pt/.safetensors state "
                       "dict with its model config JSON, or an open_clip_config.json folder) "
                       "into a CLIPModel folder with its tokenizer and preprocessing.")
    p.add_argument("--from", dest="source_format", choices=["open_clip"], default="open_clip",
                   help="checkpoint format (default open_clip)")
    p.add_argument("source", metavar="SRC", help="checkpoint file or OpenCLIP folder")
    out = p.add_argument("--out", metavar="DIR", help="model folder to write (required)",
                         type=os.path.expanduser)
    p.add_argument("--config", dest="model_config", metavar="JSON",
                   help="OpenCLIP model config (default: open_clip_config.json or the one "
                   "*.json beside the weights)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous convert output (a model folder) at --out")
    add_debug(p)
    show_required(p, out)


def run(args: argparse.Namespace) -> int:
    """`cliplab convert`; 0 when it succeeds (bad input raises `CliplabError`)."""
    from cliplab.models.convert import convert_openclip

    require_out(args, "the model folder")
    with naming_models({args.source: "SRC"}):
        out = convert_openclip(args.source, args.out, config=args.model_config,
                               overwrite=args.overwrite)
    print(f"model: {out}")
    return 0
