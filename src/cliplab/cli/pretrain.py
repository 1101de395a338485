"""`cliplab pretrain`: contrastive pretraining from a recipe."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cliplab.cli.arguments import (add_common, add_debug, add_device, naming_models,
                                   train_options, under_torchrun)
from cliplab.cli.progress_bars import end_progress_bars
from cliplab.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cliplab pretrain`, its arguments and its ``--help``, to ``sub``."""
    p = sub.add_parser("pretrain", help="contrastive pretraining from a YAML recipe",
                       description="Train a dual encoder on image-text pairs as a recipe says "
                       "(see configs/pretrain/), then run its eval tasks. The same "
                       "recipe runs on many processes with `torchrun --nproc-per-node N -m "
                       "cliplab pretrain --config X.yaml`: the loss sees the global batch "
                       "(train.batch_size over all ranks); train.fsdp shards large towers; "
                       "data.train {source: shards, stream: true} streams WebDataset shards. "
                       "Config keys: model {name, options}, data {train, replay}, "
                       "train {epochs or steps, batch_size, lr, weight_decay, warmup, "
                       "min_lr_ratio, grad_clip, lock_text, lock_image, lock_text_except_last, "
                       "lock_image_except_last, augment, multi_positive, hard_negatives, "
                       "lr_scale, precision, loss, loss_tile, micro_batch_size, "
                       "gradient_checkpointing, cache_frozen_features, fsdp, dist_timeout_s, "
                       "eval_every, device, seed, log_every, save_every, keep_checkpoints}, "
                       "eval {tasks, precision}, out. A recipe runs its eval tasks after "
                       "training (and every train.eval_every steps).")
    add_common(p, "train.lr=3e-4 train.epochs=2")
    p.add_argument("--out", metavar="DIR", type=os.path.expanduser,
                   help="run folder (default: the config's 'out' or runs/pretrain-<time>)")
    p.add_argument("--resume", metavar="CKPT",
                   help="continue from a checkpoint folder, or 'latest' in the run folder; "
                   "'auto': latest if the run folder holds a checkpoint, else start (a "
                   "complete run is reported, exit 0: one command for a job that may be "
                   "stopped and started again); without --config the run's own config.yaml "
                   "is read (with the overrides it was started with)")
    add_device(p, key="train.device")
    add_debug(p)


def run(args: argparse.Namespace) -> int:
    """`cliplab pretrain`; 0 when it succeeds (bad input raises `CliplabError`)."""
    from cliplab.config import config_source, load_config
    from cliplab.errors import RunComplete
    from cliplab.runs import RESULTS_FILE, latest_checkpoint, restart_unsaved_run
    from cliplab.train.pretrain import PretrainConfig, run_pretrain, scalar_metrics

    cfg = load_config(PretrainConfig, _pretrain_recipe(args), args.overrides,
                      extra={"out": args.out, "train": train_options(args)})
    earlier_runs = set(Path("runs").glob("pretrain-*"))
    resume = args.resume
    if resume == "auto":  # a checkpoint to go on from, or a start
        resume = "latest" if cfg.out and latest_checkpoint(Path(cfg.out)) else None
        if resume is None and cfg.out:  # an attempt that never saved one: started again
            restart_unsaved_run(cfg.out, "pretrain")
    where = config_source(_pretrain_recipe(args), bool(args.overrides))
    try:
        with naming_models({cfg.model.name: f"{where}: model"}):
            results = run_pretrain(cfg, resume=resume, progress=not args.no_progress,
                                   where=where)
    except RunComplete:
        done = Path(cfg.out) / RESULTS_FILE
        if args.resume != "auto" or not done.is_file():
            raise
        if os.environ.get("RANK", "0") == "0":  # said once, by the rank that reports
            print(f"pretrain: {cfg.out} is complete already (--resume auto); its results:",
                  file=sys.stderr)
        results = json.loads(done.read_text(encoding="utf-8"))
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
        end_progress_bars()  # the hint on a line of its own, not after the bar's
        print(f"cliplab: {run} holds checkpoints up to {latest_checkpoint(run).name}; resume "
              f"with: {_launcher()}cliplab pretrain --out {run} --resume latest",
              file=sys.stderr)


def _launcher() -> str:
    """How this run was launched, for a command that continues it: ``torchrun
    --nproc-per-node N -m `` under torchrun (a streamed run resumes on as many ranks only)."""
    if not under_torchrun():
        return ""
    nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return (f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', '?')}"
            + (f" --nnodes {nodes}" if nodes > 1 else "") + " -m ")
