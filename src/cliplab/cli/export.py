"""`cliplab export`: a model out as ONNX towers or an OpenCLIP folder."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cliplab.cli.arguments import (TORCH_MODEL_SPECS, add_debug, naming_models, require_out,
                                   show_required)
from cliplab.errors import CliplabError, warn


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cliplab export`, its arguments and its ``--help``, to ``sub``."""
    p = sub.add_parser("export", help="export a model as ONNX towers (optionally int8) or "
                       "an OpenCLIP folder",
                       description="Export MODEL (preset, model, checkpoint or run folder, "
                       "Hub id, OpenCLIP checkpoint) "
                       "as ONNX image/text towers (embeddings + pooled outputs, dynamic batch, "
                       "preprocessing and tokenizer beside them), or as an OpenCLIP folder "
                       "(open_clip_config.json + open_clip_model.safetensors; CLIP towers only).")
    p.add_argument("model", metavar="MODEL", help=TORCH_MODEL_SPECS)
    p.add_argument("--format", choices=["onnx", "open_clip"], required=True,
                   help="onnx: image and text graphs for onnxruntime; open_clip: "
                   "open_clip_config.json + open_clip_model.safetensors (a CLIP model)")
    out = p.add_argument("--out", metavar="DIR", help="folder to write (required)",
                         type=os.path.expanduser)
    p.add_argument("--quantize", choices=["int8"], help="onnx only: dynamic int8 quantization")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous export of the same format at --out")
    add_debug(p)
    show_required(p, out)


def run(args: argparse.Namespace) -> int:
    """`cliplab export`; 0 when it succeeds (bad input raises `CliplabError`)."""
    from cliplab.models.convert import export_openclip, is_openclip_checkpoint, load_openclip
    from cliplab.models.dual_encoder import DualEncoder
    from cliplab.models.resolve import export_source, load_model

    require_out(args, "the export")
    if args.quantize and args.format != "onnx":
        raise CliplabError("--quantize applies to --format onnx only")
    _check_export_out(args)  # before the (slow) loading
    with naming_models({args.model: "MODEL"}):
        model = load_openclip(args.model) if is_openclip_checkpoint(args.model) \
            else load_model(args.model)
    if not isinstance(model, DualEncoder):  # an ONNX export runs, it does not re-export
        raise CliplabError(f"{args.model} is an ONNX export; export the PyTorch model it was "
                           "made from (a model, checkpoint or run folder)")
    warn_head_left_out(args.model)
    source = export_source(args.model, model)
    if args.format == "onnx":
        from cliplab.models.onnx_export import export_onnx
        out = export_onnx(model, args.out, quantize=args.quantize, overwrite=args.overwrite,
                          inputs=[args.model], source=source)
    else:
        out = export_openclip(model, args.out, overwrite=args.overwrite, inputs=[args.model],
                              source=source)
    print(f"exported: {out}")
    return 0


def warn_head_left_out(spec: str) -> None:
    """Warn when the model folder ``spec`` names carries a fine-tuned classifier head: neither
    format has a place for it, and `cliplab eval` of the export scores with the text head."""
    from cliplab.adapt.head import saved_head_file

    if not Path(spec).expanduser().is_dir():
        return  # a preset, a Hub id or a checkpoint file: no saved head
    head = saved_head_file(Path(spec).expanduser())
    if head is not None:
        warn(f"export: the model carries a classifier head ({head}) that is not exported: the "
             "export holds the towers only, and zero-shot scores of it use the text head "
             f"(evaluate {spec} for the head's)")


def _check_export_out(args) -> None:
    """`check_out` of export's --out, with the previous-output test of its format."""
    from cliplab.models.convert.openclip_export import OPENCLIP_EXPORT
    from cliplab.models.onnx_export import ONNX_EXPORT
    from cliplab.output_folder import check_out

    if args.format == "onnx":
        kind, previous = "ONNX export", ONNX_EXPORT
    else:
        kind, previous = "OpenCLIP export", OPENCLIP_EXPORT
    check_out(args.out, kind, [args.model], args.overwrite, previous)
