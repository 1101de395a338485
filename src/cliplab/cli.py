"""`cliplab <command> --config X.yaml key=value ...` — one entry point for every stage.

Bad input ends with a one-line ``cliplab: error: …`` and exit code 2 (a traceback only with
``--debug``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from cliplab import __version__
from cliplab.errors import CliplabError, ConfigError

EXIT_BAD_INPUT = 2
# what a --model takes (export's MODEL: all but an ONNX export, which is its output)
TORCH_MODEL_SPECS = ("preset name, model folder, checkpoint folder, run folder (its newest "
                     "checkpoint), Hugging Face Hub id or OpenCLIP checkpoint")
MODEL_SPECS = TORCH_MODEL_SPECS.replace(" or OpenCLIP", ", OpenCLIP") + " or ONNX export"


def _add_common(p: argparse.ArgumentParser, example: str, config_required: bool = False) -> None:
    p.add_argument("--config", required=config_required, metavar="YAML",
                   help="YAML recipe (copy one from configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"override config keys (anywhere on the line), e.g. {example}")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks on errors")


def add_stage_arguments(p: argparse.ArgumentParser, out_help: str, example: str,
                        config_required: bool = False) -> None:
    """The arguments every stage command takes: ``--config YAML``, ``key=value`` overrides
    (``example`` shows some in ``--help``), ``--out DIR``, ``--no-progress`` and ``--debug``."""
    _add_common(p, example, config_required)
    p.add_argument("--out", metavar="DIR", help=out_help)
    _add_debug(p)


def add_data_argument(p: argparse.ArgumentParser, *aliases: str) -> None:
    """``--data SOURCE``: the collection a command reads, replacing the config's ``data``."""
    p.add_argument("--data", *aliases, dest="data", metavar="SOURCE",
                   help="built-in source (shapes, digits, fashion-mnist, ...), a manifest "
                   "(.csv/.jsonl/.parquet), a shard folder or an image folder; replaces the "
                   "config's data (data.KEY=VALUE overrides then set its options)")


def data_spec(args: argparse.Namespace) -> dict | None:
    """The ``{source: ...}`` spec of ``--data``, None when it is not given."""
    from cliplab.data.collection import source_spec

    return source_spec(args.data) if getattr(args, "data", None) is not None else None


def stage_config(schema, args: argparse.Namespace, **extra):
    """The command's validated config (a `cliplab.config.Section`): the ``--config`` file,
    then the command's own options (``extra``, unset ones skipped, ``--out``, and ``--data``,
    which replaces the file's data spec), then the ``key=value`` overrides; errors name the
    file and the key path."""
    from cliplab.config import load_config

    return load_config(schema, args.config, args.overrides, extra={**extra, "out": args.out},
                       replace={"data": data_spec(args)})


def config_where(args: argparse.Namespace) -> str:
    """How errors found after loading name the config (as `load_config` does)."""
    from cliplab.config import config_source

    return config_source(args.config, bool(getattr(args, "overrides", None)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cliplab",
        description="The life of a CLIP-style image-text model: curate data and write "
        "shards, pretrain (also under torchrun), adapt (few-shot heads, prompt learning, LoRA, "
        "fine-tuning), merge weights, evaluate and report, convert and export, index and serve "
        "search. `cliplab COMMAND --help` tells each command's options and config keys.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"cliplab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_quickstart, _add_data, _add_curate, _add_pretrain, _add_adapt, _add_merge, _add_eval,
                _add_report, _add_convert, _add_export, _add_index, _add_serve):
        add(sub)
    return parser


def _add_quickstart(sub) -> None:
    """`cliplab quickstart`: the main job: a small LiT run end to end."""
    p = sub.add_parser("quickstart", help="LiT-pretrain on Fashion-MNIST, test zero-shot "
                       "transfer to held-out classes (a few minutes on a CPU)",
                       description="Pretrain the lit-minilm preset on Fashion-MNIST with three "
                       "classes held out, then report zero-shot accuracy on them and on all "
                       "classes, and a linear probe. Writes a run folder with config.yaml, "
                       "metrics.jsonl, the checkpoint and results.json.")
    _add_common(p, "train.epochs=1 train.batch_size=128")
    p.add_argument("--out", help="run folder (default runs/quickstart-<time>)")
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files "
                   "(default /usr/share/datasets/fashion-mnist)")
    _add_debug(p)


def _add_data(sub) -> None:
    """`cliplab data`: dataset tools (shards)."""
    p = sub.add_parser("data", help="dataset tools: write WebDataset shards",
                       description="Dataset tools. `cliplab data shard` writes any built-in "
                       "source, manifest, image folder or shard folder as WebDataset tar shards.")
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_sub.required = True
    p = data_sub.add_parser("shard", help="write a dataset as WebDataset tar shards",
                            description="Write a dataset as WebDataset tar shards in img2dataset's "
                            "layout: OUT/00000.tar ... with KEY.jpg|png, KEY.txt, KEY.json per "
                            "sample, NNNNN_stats.json per shard and index.json. Config keys: "
                            "data (the source spec), out, samples_per_shard, image_format, "
                            "quality, overwrite; key=value overrides set any of them, e.g. "
                            "data.split=test data.limit=500 quality=90.",
                            epilog="example: cliplab data shard --data fashion-mnist "
                            "--out shards/fm data.split=test --format png")
    add_data_argument(p, "--source")
    p.add_argument("--samples-per-shard", type=int, metavar="N", help="samples per tar (default 1000)")
    p.add_argument("--format", dest="image_format", choices=["jpg", "png"],
                   help="image encoding (default jpg; png is lossless)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the shards of a non-empty output folder")
    add_stage_arguments(p, "folder to write the shards into (or the config's 'out')",
                        "data.split=test samples_per_shard=500 image_format=png")


def _add_curate(sub) -> None:
    """`cliplab curate`: filter and deduplicate an image-text pool."""
    p = sub.add_parser("curate", help="curate an image-text pool: filter, deduplicate, report",
                       description="Read a pool (--data, or the config's data: a built-in "
                       "source, a manifest, a shard folder or an image folder), run the config's "
                       "steps in order (basic rules, exact dedup, ...), and write to --out the "
                       "kept pool (shards or a manifest), "
                       "dropped.parquet (every dropped item with its step and reason), "
                       "summary.json and report.md/report.html. Sources are never modified; a "
                       "killed run resumes when re-run with the same config.",
                       epilog="example: cliplab curate --config configs/curate/basic.yaml "
                       "--data photos/ --out runs/curated chunk_size=128")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (or a half-finished run of another config)")
    p.add_argument("--engine", choices=["local", "ray"], help="local (default: this process, or "
                   "--workers processes) or ray (Ray Data; ray_address=HOST:PORT for a cluster)")
    p.add_argument("--workers", type=int, metavar="N", help="processes (local) or actors (ray) "
                   "mapping chunks in parallel (default: the config's workers, 1)")
    add_data_argument(p)
    add_stage_arguments(p, "folder to write the curated pool and report into",
                        "steps.0.min_words=3 workers=2", config_required=True)


def _add_pretrain(sub) -> None:
    """`cliplab pretrain`: contrastive pretraining from a recipe."""
    p = sub.add_parser("pretrain", help="contrastive pretraining from a YAML recipe",
                       description="Train a dual encoder on image-text pairs as a recipe says "
                       "(see configs/pretrain/), then run its zero-shot eval tasks. The same "
                       "recipe runs on many processes with `torchrun --nproc-per-node N -m "
                       "cliplab pretrain --config X.yaml`: the loss sees the global batch "
                       "(train.batch_size over all ranks); train.fsdp shards large towers; "
                       "data.train {source: shards, stream: true} streams WebDataset shards.")
    _add_common(p, "train.lr=3e-4 train.epochs=2")
    p.add_argument("--out", help="run folder (default: the config's 'out' or runs/pretrain-<time>)")
    p.add_argument("--resume", metavar="CKPT",
                   help="continue from a checkpoint folder, or 'latest' in the run folder; "
                   "without --config the run's own config.yaml is read (with the overrides "
                   "it was started with)")
    _add_debug(p)


def _add_adapt(sub) -> None:
    """`cliplab adapt`: few-shot adaptation and fine-tuning."""
    from cliplab.adapt import ADAPT_METHODS

    p = sub.add_parser("adapt", help="adapt a model: zero-shot head, linear probe, "
                       "Tip-Adapter(-F), CLIP-Adapter, CoOp, CoCoOp, LoRA, fine-tuning, WiSE-FT",
                       description="Fit one method on a labelled training set (shots per "
                       "class drawn with seed from data.train, then train_size at random), "
                       "score it and the hand-written-prompt zero-shot head on data.test (and "
                       "data.shifted), and write what it learned: few-shot methods "
                       "adapter.safetensors + adapter.json; finetune a model folder; lora a "
                       "peft adapter folder; wise-ft its sweep. Every run writes config.yaml "
                       "and results.json. Config keys: method, model, data {train, test, "
                       "shifted, val}, shots, train_size, val_shots, seed, options (the method's "
                       "own), compare_zeroshot, cache_dir, out.",
                       epilog="example: cliplab adapt --method coop --model MODEL_DIR --config "
                       "configs/adapt/fashion-mnist.yaml shots=4 options.epochs=50")
    p.add_argument("--method", choices=list(ADAPT_METHODS),
                   help="adaptation method (or the config's 'method')")
    p.add_argument("--model", help=f"{MODEL_SPECS} (or the config's 'model')")
    p.add_argument("--cache-dir", help="keep image features here, reused by later runs")
    add_stage_arguments(p, "run folder (default: the config's 'out' or "
                        "runs/adapt-<method>-<time>)", "shots=4 options.epochs=50")


def _add_merge(sub) -> None:
    """`cliplab merge`: weight-space merging."""
    from cliplab.merge.methods import MERGE_METHODS

    p = sub.add_parser("merge", help="merge fine-tuned models: soups, Model Stock, task "
                       "arithmetic, TIES",
                       description="Merge model folders of one architecture and pretrained "
                       "origin in weight space. uniform: mean; greedy: add ingredients by "
                       "held-out score while it does not drop (config 'heldout'); model-stock: "
                       "layer-wise interpolation toward --base; task-arithmetic: --base + "
                       "scale x (model - base) summed (scale=-1 negates); ties: trim to "
                       "'density', elect signs, disjoint mean, x scale. Writes a model folder "
                       "plus merge.json. Config keys: method, models, base, out, weights, "
                       "scale, density, heldout, metric, require_origin.",
                       epilog="example: cliplab merge --method greedy --models FT1 FT2 FT3 "
                       "--config configs/merge/greedy-soup.yaml --out runs/soup "
                       "heldout.data.limit=2000")
    p.add_argument("--method", choices=list(MERGE_METHODS),
                   help="how to merge (or the config's 'method')")
    p.add_argument("--models", nargs="+", metavar="MODEL", help="model folders to merge")
    p.add_argument("--base", metavar="MODEL", help="the pretrained model the others were "
                   "fine-tuned from (model-stock, task-arithmetic, ties)")
    add_stage_arguments(p, "new folder for the merged model (or the config's 'out')",
                        "heldout.data.limit=2000 scale=0.5")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous merge output (a model folder) at --out, once the "
                   "merge is written")


def _add_eval(sub) -> None:
    """`cliplab eval`: evaluation suites."""
    p = sub.add_parser("eval", help="evaluate a model on a suite of tasks",
                       description="Run the tasks of a suite YAML ({tasks: [...], precision}: "
                       "zeroshot, linear_probe, few_shot, retrieval, compositional, "
                       "multilabel_zeroshot, long_tail) on a model; print the results and write "
                       "OUT/results.json.")
    p.add_argument("--config", "--suite", dest="config", required=True, metavar="YAML",
                   help="suite of tasks (copy one from configs/eval/); --suite is an alias")
    p.add_argument("--model", required=True, help=MODEL_SPECS)
    p.add_argument("--out", metavar="DIR", help="new folder to write results.json into (not a "
                   "run folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results.json of a previous eval --out")
    p.add_argument("--head", choices=("auto", "text"), default="auto",
                   help="auto (default): a model folder's fine-tuned head.safetensors scores "
                   "the zero-shot tasks over its own classes; text: the zero-shot text head "
                   "scores every task")
    p.add_argument("--cache-dir", help="keep image features here (safetensors), reused by later "
                   "runs of the same model, data and transform")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override suite keys, e.g. precision=bf16")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_debug(p)


def _add_report(sub) -> None:
    """`cliplab report`: Markdown + HTML reports."""
    p = sub.add_parser("report", help="Markdown + HTML report with tables and plots from "
                       "results files and run folders",
                       description="Read results JSON files (cliplab eval --out), run folders "
                       "(results.json, metrics.jsonl, config.yaml) and/or merge output "
                       "folders (merge.json) and write "
                       "report.md and a self-contained report.html: one table per task with "
                       "one column per model, few-shot curves, accuracy vs concept frequency, "
                       "training curves. The inputs are named by --inputs (or the config's "
                       "'inputs'), never guessed from the other arguments. Config keys: "
                       "inputs, title, names (one label per input), plots (true/false).",
                       epilog="example: cliplab report --inputs runs/a/results.json runs/b "
                       "--out reports/ab title=\"a vs b\"")
    p.add_argument("--inputs", nargs="+", metavar="RUN_OR_RESULTS",
                   help="results JSON files, run folders and/or merge output folders "
                   "(key=value words among them are overrides)")
    add_stage_arguments(p, "folder for report.md, report.html and plots/ (or the config's "
                        "'out'); a previous report there is rewritten",
                        "title=\"a vs b\" plots=false")


def _add_index(sub) -> None:
    """`cliplab index`: embed a collection for search."""
    p = sub.add_parser("index", help="embed an image collection into a search index (FAISS or "
                       "Milvus)",
                       description="Embed every image of a collection (an image folder, a "
                       "manifest, a shard folder or a built-in source) with a model, and write "
                       "an index folder: vectors, metadata in SQLite, the model's fingerprint. "
                       "Unreadable images are skipped and listed; a stopped run resumes when "
                       "the same command is run again. key=value overrides set config keys "
                       "(index_type=hnsw, recall=0.99, batch_size=32, data.n=500, "
                       "collection=NAME for a Milvus collection of that name instead of a "
                       "fresh one).")
    _add_common(p, "index_type=hnsw batch_size=32")
    p.add_argument("--model", help=MODEL_SPECS)
    add_data_argument(p)
    p.add_argument("--out", metavar="INDEX", help="index folder to write")
    p.add_argument("--add", action="store_true", default=None,
                   help="append the collection to an existing index (keeping its backend, "
                   "Milvus URI and index type; a Milvus index moves to a fresh collection, the "
                   "old one dropped once the index is complete)")
    p.add_argument("--backend", choices=("faiss", "milvus"),
                   help="vector store (default faiss; with --add the index's own)")
    p.add_argument("--uri", help="Milvus: ./file.db (Milvus Lite) or http://HOST:19530 (with "
                   "--add the index's own)")
    p.add_argument("--index-type", help="FAISS: auto (default; with --add the index's own), "
                   "flat, hnsw, ivf-flat, ivf-pq or a FAISS factory string")
    _add_debug(p)


def _add_serve(sub) -> None:
    """`cliplab serve`: the search API and page."""
    p = sub.add_parser("serve", help="serve an index: search page and HTTP API",
                       description="Serve an index built by `cliplab index`: a web page (search "
                       "by text or image, paging, zero-shot labels) and a JSON API (schema at /openapi.json; "
                       "the /docs page loads Swagger UI from a CDN, so it is blank offline).")
    p.add_argument("index", metavar="INDEX", help="index folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require this key on every API call (the X-API-Key "
                   "header, or ?api_key= in image URLs)")
    p.add_argument("--model", help="the index's model from another place (refused if its "
                   "weights differ)")
    p.add_argument("--max-upload-mb", type=float, default=10,
                   help="request size limit in MB (default 10)")
    _add_debug(p)


def _add_convert(sub) -> None:
    """`cliplab convert`: another framework's checkpoint into a cliplab/transformers folder."""
    p = sub.add_parser("convert", help="import an OpenCLIP checkpoint as a transformers "
                       "CLIPModel folder",
                       description="Convert an OpenCLIP checkpoint (a .pt/.safetensors state "
                       "dict with its model config JSON, or an open_clip_config.json folder) "
                       "into a CLIPModel folder with its tokenizer and preprocessing.")
    p.add_argument("--from", dest="source_format", choices=["open_clip"], default="open_clip",
                   help="checkpoint format (default open_clip)")
    p.add_argument("source", metavar="SRC", help="checkpoint file or OpenCLIP folder")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--config", dest="model_config", metavar="JSON",
                   help="OpenCLIP model config (default: open_clip_config.json or the one "
                   "*.json beside the weights)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous convert output (a model folder) at --out")
    _add_debug(p)


def _add_export(sub) -> None:
    """`cliplab export`: a model out as ONNX towers or an OpenCLIP folder."""
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
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--quantize", choices=["int8"], help="onnx only: dynamic int8 quantization")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous export of the same format at --out")
    _add_debug(p)


def cmd_convert(args) -> int:
    from cliplab.models.convert import convert_openclip

    out = convert_openclip(args.source, args.out, config=args.model_config,
                           overwrite=args.overwrite)
    print(f"model: {out}")
    return 0


def cmd_export(args) -> int:
    from cliplab.models.convert import export_openclip, is_openclip_checkpoint, load_openclip
    from cliplab.models.dual_encoder import DualEncoder
    from cliplab.models.resolve import load_model

    if args.quantize and args.format != "onnx":
        raise CliplabError("--quantize applies to --format onnx only")
    _check_export_out(args)  # before the (slow) loading
    model = load_openclip(args.model) if is_openclip_checkpoint(args.model) \
        else load_model(args.model)
    if not isinstance(model, DualEncoder):  # an ONNX export runs, it does not re-export
        raise CliplabError(f"{args.model} is an ONNX export; export the PyTorch model it was "
                           "made from (a model, checkpoint or run folder)")
    if args.format == "onnx":
        from cliplab.models.onnx_export import export_onnx
        out = export_onnx(model, args.out, quantize=args.quantize, overwrite=args.overwrite,
                          inputs=[args.model])
    else:
        out = export_openclip(model, args.out, overwrite=args.overwrite, inputs=[args.model])
    print(f"exported: {out}")
    return 0


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


def cmd_quickstart(args) -> int:
    from cliplab.config import load_config
    from cliplab.quickstart import QuickstartConfig, format_results, run_quickstart

    extra: dict = {"out": args.out}
    if args.data_dir:
        extra["data"] = {"data_dir": args.data_dir}
    cfg = load_config(QuickstartConfig, args.config, args.overrides, extra=extra)
    results = run_quickstart(cfg, progress=not args.no_progress)
    print(format_results(results))
    print(f"run folder: {Path(results['model_dir']).parents[2]}")
    return 0


def cmd_pretrain(args) -> int:
    from cliplab.config import load_config
    from cliplab.train.pretrain import PretrainConfig, run_pretrain, scalar_metrics

    cfg = load_config(PretrainConfig, _pretrain_recipe(args), args.overrides,
                      extra={"out": args.out})
    earlier_runs = set(Path("runs").glob("pretrain-*"))
    try:
        results = run_pretrain(cfg, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        _resume_hint(cfg.out, earlier_runs)
        raise
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    for name, metrics in results["evals"].items():
        numbers = scalar_metrics(metrics, name)  # counts (n, ...) stay integers
        print(", ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.3f}"
                        for k, v in numbers.items()))
    print(f"model: {results['model_dir']}")
    run = _run_folder_of(results["model_dir"])
    if run is not None:
        print(f"run folder: {run} (results.json, metrics.jsonl, checkpoints/)")
    return 0


def _pretrain_recipe(args) -> str | Path:
    """``--config``, or for ``--resume`` the run folder's own config.yaml (the recipe with the
    overrides it was started with, so a resume needs none of them retyped)."""
    if args.config is not None:
        return args.config
    saved = Path(args.out) / "config.yaml" if args.out else None
    if args.resume and saved is not None and saved.is_file():
        return saved
    if args.resume:
        raise ConfigError("pretrain --resume without --config reads the run's config.yaml: give "
                          "the run folder as --out" + (f" ({saved} does not exist)" if saved
                                                       else ""))
    raise ConfigError("pretrain needs --config RECIPE (copy one from configs/pretrain/)")


def _run_folder_of(model_dir) -> Path | None:
    """The run folder holding the model folder ``RUN/checkpoints/step-N/model``, if it is one."""
    path = Path(model_dir)
    for parent in path.parents:
        if parent.name == "checkpoints":
            return parent.parent
    return None


def _resume_hint(out: str | None, earlier_runs: set[Path]) -> None:
    """After Ctrl-C: how to continue the run in ``out`` if it holds a checkpoint (the run
    folder named by --out or the config; else the default runs/pretrain-<time> this command
    made: one not among ``earlier_runs``)."""
    from cliplab.runs import latest_checkpoint

    if os.environ.get("RANK", "0") != "0":
        return
    run = Path(out) if out else None
    if run is None:
        runs = sorted(set(Path("runs").glob("pretrain-*")) - earlier_runs,
                      key=lambda p: p.stat().st_mtime)
        run = runs[-1] if runs else None
    if run is not None and latest_checkpoint(run) is not None:
        print(f"cliplab: {run} holds checkpoints up to {latest_checkpoint(run).name}; resume "
              f"with: cliplab pretrain --out {run} --resume latest", file=sys.stderr)


def cmd_eval(args) -> int:
    from cliplab.config import load_config
    from cliplab.evaluate.feature_cache import FeatureCache
    from cliplab.evaluate.suite import SuiteSpec, run_suite
    from cliplab.evaluate.tasks import TaskContext
    from cliplab.models.resolve import load_model
    from cliplab.output_folder import check_cache_apart_from_inputs, spec_paths, write_json

    suite = load_config(SuiteSpec, args.config, args.overrides)
    inputs = [args.model, *spec_paths(*(spec for task in suite.tasks
                                         for spec in task.datasets()))]
    out = _results_folder(args.out, inputs, args.overwrite)
    check_cache_apart_from_inputs(args.cache_dir, inputs, CliplabError)
    context = TaskContext(FeatureCache(args.cache_dir), progress=not args.no_progress)
    context.preload(suite.tasks, f"{config_where(args)}: tasks")  # bad data fails before work
    model = load_model(args.model)
    head = _fine_tuned_head(args.model) if args.head == "auto" else None
    if head is not None:
        context.classifier = head
        print(f"eval: tasks over the classes of {head.label} are scored by that fine-tuned "
              "head (each says so under 'classifier'); --head text scores the text head",
              file=sys.stderr)
    results = {"model": args.model, "suite": args.config, "precision": suite.precision,
               "head": head.label if head is not None else None,
               "results": run_suite(model, suite, context)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", results)  # atomic, as every stage writes its results
    print(json.dumps(results, indent=2))
    if out is not None:
        print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return 0


def _fine_tuned_head(model: str):
    """The `LinearHead` of the model folder ``model`` names, if it holds a head.safetensors."""
    from cliplab.adapt.head import saved_head_classifier

    if not Path(model).expanduser().is_dir():
        return None  # a preset, a Hub id or a checkpoint file: no saved head
    return saved_head_classifier(Path(model).expanduser())


EVAL_FILES = ("results.json", "results.json.tmp")  # what eval writes into its --out


def _results_folder(out: str | None, inputs: list[str | None],
                    overwrite: bool = False) -> Path | None:
    """``--out`` of eval: a folder (made if missing) that will hold results.json: new or empty,
    or with ``overwrite`` a previous eval output (a folder of its results.json only); never a
    file, a run folder, nor an input's folder (the model's, a data folder) or inside one."""
    from cliplab.output_folder import check_out, is_run_folder, only_files

    if out is None:
        return None
    path = Path(out)
    if not path.exists() and path.suffix == ".json":
        raise CliplabError(f"--out {out} names a file; choose a folder (results go to "
                           f"{path.with_suffix('')}/results.json)")
    if not path.is_file() and is_run_folder(path):
        raise CliplabError(f"--out {out} is a run folder (its results.json is the run's); "
                           f"choose a new folder for the eval results, e.g. {path}-eval")
    return check_out(path, "eval", inputs, overwrite, only_files(*EVAL_FILES),
                     error=CliplabError)


def cmd_merge(args) -> int:
    from cliplab.merge.config import MergeConfig
    from cliplab.merge.run import run_merge

    cfg = stage_config(MergeConfig, args, method=args.method, models=args.models,
                       base=args.base)
    record = run_merge(cfg, progress=not args.no_progress, where=config_where(args),
                       overwrite=args.overwrite)
    line = f"{record['method']} merge of {len(record['models'])} models -> {record['out']}"
    if record["heldout"]:
        held = record["heldout"]
        line += f"; held-out {held['metric']}: merged {held['merged']:.4f}, " + ", ".join(
            f"{k} {v:.4f}" for k, v in held["scores"].items())
    print(line)
    return 0


def cmd_adapt(args) -> int:
    from cliplab.adapt.config import AdaptConfig
    from cliplab.adapt.run import format_results, run_adapt

    cfg = stage_config(AdaptConfig, args, method=args.method, model=args.model,
                       cache_dir=args.cache_dir)
    results = run_adapt(cfg, progress=not args.no_progress, where=config_where(args))
    print(format_results(results))
    print(f"results.json and what was learned: {results['out']}")
    return 0


def cmd_data(args) -> int:
    from cliplab.data.shards.job import ShardConfig, run_shard

    cfg = stage_config(ShardConfig, args, samples_per_shard=args.samples_per_shard,
                       image_format=args.image_format, overwrite=args.overwrite)
    from cliplab.data.shards.write import check_out_folder
    from cliplab.output_folder import spec_paths

    check_out_folder(cfg.out, cfg.overwrite, spec_paths(cfg.data))
    index = run_shard(cfg, progress=not args.no_progress)
    from cliplab.data.types import SkipReport

    shards = len(index["shards"])
    print(f"wrote {index['total']} samples in {shards} shard{'s' * (shards != 1)} to {cfg.out}; "
          f"{SkipReport.from_dict(index['skipped']).summary()}")
    return 0


def cmd_curate(args) -> int:
    from cliplab.curate.config import CurateConfig
    from cliplab.curate.pipeline import run_curation
    from cliplab.output_folder import spec_paths

    cfg = stage_config(CurateConfig, args, engine=args.engine, workers=args.workers)
    _check_out_is_not_input(cfg.out, spec_paths(cfg.data))
    summary = run_curation(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    steps = ", ".join(f"{s['dropped']} by {s['name']}" for s in summary["steps"])
    print(f"kept {summary['kept']} of {summary['pool']} items (dropped {steps}); wrote "
          f"{Path(cfg.out) / summary['output']['path']}, dropped.parquet, report.html in {cfg.out}")
    return 0


def _check_out_is_not_input(out: str | None, inputs: list) -> None:
    """The file and input checks of `check_out` alone, for curate and index (which keep their
    own logic for an existing folder)."""
    from cliplab.output_folder import check_out

    if out:
        check_out(out, "", inputs, may_exist=True, previous=lambda folder: True)


def cmd_report(args) -> int:
    from cliplab.evaluate.report import ReportConfig, write_report

    cfg = stage_config(ReportConfig, args, inputs=args.inputs)
    if not cfg.out:
        raise ConfigError("say where to write the report: --out DIR")
    written = write_report(cfg.inputs, cfg.out, cfg, progress=not args.no_progress)
    plots = len(written) - 2
    print(f"report: {written['markdown']} and {written['html']} "
          + (f"({plots} plot(s) in {Path(cfg.out) / 'plots'})" if plots else "(no plots)"))
    return 0


def cmd_index(args) -> int:
    from cliplab.config import load_config
    from cliplab.output_folder import spec_paths
    from cliplab.serve.build import build_index
    from cliplab.serve.index import describe
    from cliplab.serve.settings import IndexConfig

    extra = {key: getattr(args, key) for key in ("model", "out", "add", "backend", "uri",
                                                   "index_type") if getattr(args, key) is not None}
    cfg = load_config(IndexConfig, args.config, args.overrides, extra=extra,
                      replace={"data": data_spec(args)})
    _check_out_is_not_input(cfg.out, [cfg.model.name, *spec_paths(cfg.data)])
    record = build_index(cfg, progress=not args.no_progress)
    print(f"index {cfg.out}: {describe(record)}")
    tuned = record.get("faiss", {})
    if tuned.get("parameter") and tuned["recall"] < tuned["recall_target"]:
        print(f"index: warning: recall {tuned['recall']:.3f} stays below the target "
              f"{tuned['recall_target']} at the widest search ({tuned['parameter']}="
              f"{tuned['value']}): {tuned['type']} loses neighbours on this collection; "
              "--index-type flat is exact" + (" (ivf-flat and hnsw keep the vectors whole, "
                                              "unlike PQ)" if "PQ" in tuned["type"] else ""),
              file=sys.stderr)
    if record.get("already_indexed"):
        print(f"{record['already_indexed']} item(s) of the collection were in the index "
              "already (not added again)")
    skipped = record["skipped_now"]  # this run's: an --add's index also holds earlier ones
    if skipped:
        from cliplab.data.types import counts_text

        print(f"skipped {sum(skipped.values())} item(s) ({counts_text(skipped)}); each is "
              f"listed with its reason in {Path(cfg.out) / 'meta.sqlite'} (table skipped)",
              file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from cliplab.serve.run import serve

    serve(args.index, host=args.host, port=args.port, model=args.model, api_key=args.api_key,
          max_upload_mb=args.max_upload_mb)
    return 0




COMMANDS = {"quickstart": cmd_quickstart, "pretrain": cmd_pretrain, "eval": cmd_eval,
            "adapt": cmd_adapt, "merge": cmd_merge, "data": cmd_data, "curate": cmd_curate,
            "report": cmd_report, "convert": cmd_convert, "export": cmd_export,
            "index": cmd_index, "serve": cmd_serve}


def parse_command_line(parser: argparse.ArgumentParser,
                       argv: list[str] | None) -> argparse.Namespace:
    """Parsed arguments, with ``key=value`` overrides taken wherever they stand (argparse alone
    takes them only before the first option); anything else unknown is an error in the
    command's own usage."""
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    unknown = [a for a in rest if a not in overrides]
    if not hasattr(args, "overrides"):
        unknown = rest
    if unknown:
        command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        overrides += _overrides_taken_as_values(args)
    if overrides and hasattr(args, "overrides"):
        args.overrides = [*(args.overrides or []), *overrides]
    return args


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]-]*=")


def _overrides_taken_as_values(args: argparse.Namespace) -> list[str]:
    """``key=value`` words a many-valued option (``--models A B``, ``--inputs ...``) swallowed
    because they followed it, taken back out of it (a path of that form that exists stays)."""
    taken = []
    for name in ("models", "inputs"):
        values = getattr(args, name, None)
        if isinstance(values, list):
            keep = [v for v in values if not _OVERRIDE.match(v) or Path(v).exists()]
            taken += [v for v in values if v not in keep]
            setattr(args, name, keep)
    return taken


def command_parser(parser: argparse.ArgumentParser,
                   args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser the arguments chose, e.g. ``cliplab data shard``'s."""
    while True:
        choices = next((a for a in parser._actions
                        if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, choices.dest, None) if choices is not None else None
        if chosen is None:
            return parser
        parser = choices.choices[chosen]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cliplab`` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # cliplab never reaches a hub unless asked
    try:
        args = parse_command_line(build_parser(), argv)
    except KeyboardInterrupt:  # during the first seconds' imports
        print("cliplab: interrupted", file=sys.stderr)
        return 130
    try:
        return COMMANDS[args.command](args)
    except CliplabError as err:
        if args.debug:
            raise
        print(f"cliplab: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cliplab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
