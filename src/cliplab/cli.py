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

from cliplab.errors import CliplabError

EXIT_BAD_INPUT = 2


def _add_common(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("--config", required=config_required, metavar="YAML",
                   help="YAML recipe (copy one from configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys, e.g. train.lr=3e-4 train.epochs=2")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cliplab",
        description="The life of a CLIP-style image-text model: write data shards, pretrain "
        "(also under torchrun), adapt (few-shot heads, prompt learning, LoRA, fine-tuning), "
        "merge weights, evaluate and report.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_quickstart, _add_data, _add_pretrain, _add_adapt, _add_merge, _add_eval,
                _add_report):
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
    _add_common(p)
    p.add_argument("--out", help="run folder (default runs/quickstart-<time>)")
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files "
                   "(default /usr/share/datasets/fashion-mnist)")
    _add_debug(p)


def _add_data(sub) -> None:
    """`cliplab data`: dataset tools (shards)."""
    p = sub.add_parser("data", help="dataset tools: write WebDataset shards",
                       description="Dataset tools. `cliplab data shard` writes any built-in "
                       "source, manifest or shard folder as WebDataset tar shards.")
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_sub.required = True
    p = data_sub.add_parser("shard", help="write a dataset as WebDataset tar shards",
                            description="Write a dataset as WebDataset tar shards in img2dataset's "
                            "layout: OUT/00000.tar ... with KEY.jpg|png, KEY.txt, KEY.json per "
                            "sample, NNNNN_stats.json per shard and index.json. key=value "
                            "overrides set source options (split=test, n=500) or writer keys "
                            "(samples_per_shard, image_format, quality).")
    _add_common(p)
    p.add_argument("--source", metavar="NAME|PATH", help="built-in source (fashion-mnist, digits, "
                   "shapes, ...), a manifest file or a shard folder")
    p.add_argument("--out", metavar="DIR", help="folder to write the shards into")
    p.add_argument("--samples-per-shard", type=int, metavar="N", help="samples per tar (default 1000)")
    p.add_argument("--format", dest="image_format", choices=["jpg", "png"],
                   help="image encoding (default jpg; png is lossless)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the shards of a non-empty output folder")
    _add_debug(p)


def _add_pretrain(sub) -> None:
    """`cliplab pretrain`: contrastive pretraining from a recipe."""
    p = sub.add_parser("pretrain", help="contrastive pretraining from a YAML recipe",
                       description="Train a dual encoder on image-text pairs as a recipe says "
                       "(see configs/pretrain/), then run its zero-shot eval tasks. The same "
                       "recipe runs on many processes with `torchrun --nproc-per-node N -m "
                       "cliplab pretrain --config X.yaml`: the loss sees the global batch "
                       "(train.batch_size over all ranks); train.fsdp shards large towers; "
                       "data.train {source: shards, stream: true} streams WebDataset shards.")
    _add_common(p, config_required=True)
    p.add_argument("--out", help="run folder (default: the config's 'out' or runs/pretrain-<time>)")
    p.add_argument("--resume", metavar="CKPT",
                   help="continue from a checkpoint folder, or 'latest' in the run folder")
    _add_debug(p)


def _add_adapt(sub) -> None:
    """`cliplab adapt`: few-shot adaptation and fine-tuning."""
    from cliplab.adapt import METHODS as ADAPT_METHODS, WEIGHT_METHODS

    p = sub.add_parser("adapt", help="adapt a model: zero-shot head, linear probe, "
                       "Tip-Adapter(-F), CLIP-Adapter, CoOp, CoCoOp, LoRA, fine-tuning, WiSE-FT",
                       description="Few-shot methods fit on k shots per class of a labelled "
                       "training set, score on the test set and write the learned adapter "
                       "(adapter.safetensors + adapter.json); lora, finetune and wise-ft train "
                       "the model's weights on the training set and write model folders. Every "
                       "run writes config.yaml and results.json.")
    _add_common(p)
    p.add_argument("--method", choices=[*ADAPT_METHODS, *WEIGHT_METHODS],
                   help="adaptation method (default: the config's 'method')")
    p.add_argument("--model", help="model folder (cliplab or HF) or preset name "
                   "(default: the config's 'model')")
    p.add_argument("--out", help="output folder (default: the config's 'out' or "
                   "runs/adapt-<method>-<time>)")
    p.add_argument("--cache-dir", help="keep image features here, reused by later runs")
    _add_debug(p)


def _add_merge(sub) -> None:
    """`cliplab merge`: weight-space merging."""
    p = sub.add_parser("merge", help="merge fine-tuned models: soups, Model Stock, task "
                       "arithmetic, TIES",
                       description="Merge model folders of one architecture and pretrained "
                       "origin in weight space. uniform: mean; greedy: add ingredients by "
                       "held-out score while it does not drop (config 'heldout'); model-stock: "
                       "layer-wise interpolation toward --base; task-arithmetic: --base + "
                       "scale x (model - base) summed (scale=-1 negates); ties: trim to "
                       "'density', elect signs, disjoint mean, x scale. Writes a model folder "
                       "plus merge.json.")
    _add_common(p)
    p.add_argument("--method", choices=("uniform", "greedy", "model-stock", "task-arithmetic",
                                        "ties"), help="how to merge (or 'method' in the config)")
    p.add_argument("--models", nargs="+", metavar="DIR", help="model folders to merge")
    p.add_argument("--base", metavar="DIR", help="the pretrained model the others were "
                   "fine-tuned from (model-stock, task-arithmetic, ties)")
    p.add_argument("--out", help="new folder for the merged model")
    _add_debug(p)


def _add_eval(sub) -> None:
    """`cliplab eval`: evaluation suites."""
    p = sub.add_parser("eval", help="evaluate a model on a suite of tasks",
                       description="Run the tasks of a suite YAML ({tasks: [...], precision}: "
                       "zeroshot, linear_probe, few_shot, retrieval, compositional, "
                       "multilabel_zeroshot, long_tail) on a model; print the results and write "
                       "OUT/results.json.")
    p.add_argument("--config", "--suite", dest="config", required=True, metavar="YAML",
                   help="suite of tasks (copy one from configs/eval/); --suite is an alias")
    p.add_argument("--model", required=True, help="preset name, model folder, checkpoint "
                   "folder, run folder (its newest checkpoint) or Hugging Face Hub id")
    p.add_argument("--out", metavar="DIR", help="folder to write results.json into")
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
                       description="Read results JSON files (cliplab eval --out) and/or run "
                       "folders (results.json, metrics.jsonl, config.yaml) and write "
                       "report.md and a self-contained report.html: one table per task with "
                       "one column per model, few-shot curves, accuracy vs concept frequency, "
                       "training curves. Config keys: title, names (one label per input), "
                       "plots (true/false). Put the options before the inputs: "
                       "cliplab report --out DIR RUN_OR_RESULTS... [key=value ...]")
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_RESULTS",
                   help="results JSON files and/or run folders, and key=value overrides "
                   "(e.g. title=\"my runs\"); an item shaped key=value is always an override "
                   "(write a file so named as ./title=x.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md, "
                   "report.html and plots/")
    p.add_argument("--config", metavar="YAML", help="report settings (title, names, plots)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_debug(p)


def _config(args) -> dict:
    from cliplab.config import apply_overrides, load_yaml

    cfg = load_yaml(args.config) if getattr(args, "config", None) else {}
    return apply_overrides(cfg, args.overrides)


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

    cfg = load_config(PretrainConfig, args.config, args.overrides, extra={"out": args.out})
    results = run_pretrain(cfg, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    for name, metrics in results["evals"].items():
        numbers = scalar_metrics(metrics, name)
        print(", ".join(f"{k}={v:.3f}" for k, v in numbers.items()))
    print(f"model: {results['model_dir']}")
    return 0


def cmd_eval(args) -> int:
    from cliplab.config import load_config
    from cliplab.evaluate.feature_cache import FeatureCache
    from cliplab.evaluate.suite import SuiteSpec, run_suite
    from cliplab.evaluate.tasks import TaskContext
    from cliplab.models.resolve import load_model

    out = _results_folder(args.out)
    suite = load_config(SuiteSpec, args.config, args.overrides)
    model = load_model(args.model)
    context = TaskContext(FeatureCache(args.cache_dir), progress=not args.no_progress)
    results = {"model": args.model, "suite": args.config,
               "results": run_suite(model, suite, context)}
    text = json.dumps(results, indent=2)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(text + "\n")
    print(text)
    return 0


def _results_folder(out: str | None) -> Path | None:
    """``--out`` of eval: a folder (made if missing) that will hold results.json."""
    if out is None:
        return None
    path = Path(out)
    if path.is_file() or (not path.exists() and path.suffix == ".json"):
        raise CliplabError(f"--out {out} is a file; give a folder (results go to "
                           f"{path.with_suffix('') if path.suffix == '.json' else path}"
                           "/results.json)")
    return path


def cmd_merge(args) -> int:
    from cliplab.merge.run import run_merge

    cfg = _config(args)
    for key in ("method", "models", "base", "out"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    record = run_merge(cfg, progress=not args.no_progress)
    line = f"{record['method']} merge of {len(record['models'])} models -> {record['out']}"
    if record["heldout"]:
        held = record["heldout"]
        line += f"; held-out {held['metric']}: merged {held['merged']:.4f}, " + ", ".join(
            f"{k} {v:.4f}" for k, v in held["scores"].items())
    print(line)
    return 0


def cmd_adapt(args) -> int:
    from cliplab.adapt import WEIGHT_METHODS
    from cliplab.adapt.run import format_results, run_adapt, run_weight_method

    cfg = _config(args)
    for key in ("method", "model", "out", "cache_dir"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    if cfg.get("method") in WEIGHT_METHODS:
        results = run_weight_method(cfg, progress=not args.no_progress)
        print(format_results(results))
        print(f"models and results.json: {results['out']}")
        return 0
    results = run_adapt(cfg, progress=not args.no_progress)
    print(format_results(results))
    print(f"adapter and results.json: {results['out']}")
    return 0


def cmd_data(args) -> int:
    from cliplab.config import load_yaml
    from cliplab.data.shard_job import run_shard, shard_config

    config = load_yaml(args.config) if args.config else {}
    for key in ("out", "samples_per_shard", "image_format", "overwrite"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    config = shard_config(config, args.source, args.overrides)
    index = run_shard(config, progress=not args.no_progress)
    print(f"wrote {index['total']} samples in {len(index['shards'])} shards to {config['out']}; "
          f"{_skip_line(index['skipped'])}")
    return 0


def _skip_line(skipped: dict) -> str:
    if not skipped["total"]:
        return "skipped 0 samples"
    return f"skipped {skipped['total']} samples: " + ", ".join(
        f"{reason}={n}" for reason, n in sorted(skipped["counts"].items()))


def cmd_report(args) -> int:
    from cliplab.config import load_config
    from cliplab.evaluate.report import ReportConfig, write_report

    # the one rule: an item shaped key=value (a settings key, then "=") is an override, any
    # other item an input; write a file so named as ./title=x.json
    overrides = [a for a in args.inputs if OVERRIDE.match(a)]
    inputs = [a for a in args.inputs if not OVERRIDE.match(a)]
    if not inputs:
        raise CliplabError("cliplab report needs at least one results file or run folder")
    cfg = load_config(ReportConfig, args.config, overrides)
    written = write_report(inputs, args.out, cfg, progress=not args.no_progress)
    print(f"report: {written['markdown']} and {written['html']} "
          f"({len(written) - 2} plot(s) in {Path(args.out) / 'plots'})")
    return 0


OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


COMMANDS = {"quickstart": cmd_quickstart, "pretrain": cmd_pretrain, "eval": cmd_eval,
            "adapt": cmd_adapt, "merge": cmd_merge, "data": cmd_data,
            "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cliplab`` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # cliplab never reaches a hub unless asked
    args = build_parser().parse_args(argv)
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
