"""`cliplab adapt`: few-shot adaptation and fine-tuning."""

from __future__ import annotations

import argparse

from cliplab.cli.arguments import (MODEL_SPECS, add_device, add_stage_arguments, config_where,
                                   given_by, naming_models, stage_config)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cliplab adapt`, its arguments and its ``--help``, to ``sub``."""
    from cliplab.adapt import ADAPT_METHODS

    p = sub.add_parser("adapt", help="adapt a model: zero-shot head, linear probe, "
                       "Tip-Adapter(-F), CLIP-Adapter, CoOp, CoCoOp, LoRA, fine-tuning, WiSE-FT",
                       description="Fit one method on a labelled training set (shots per "
                       "class drawn with seed from data.train, then train_size at random), "
                       "score it and the hand-written-prompt zero-shot head on data.test (and "
                       "data.shifted), and write what it learned: few-shot methods "
                       "adapter.safetensors + adapter.json; finetune a run folder "
                       "(checkpoints/step-N/model, a model folder); lora a run folder of peft "
                       "adapter folders (checkpoints/step-N/adapter, no model there: with "
                       "options.merge=true also merged/, the model folder); wise-ft its "
                       "sweep. Every run writes config.yaml "
                       "and results.json. Config keys: method, model, data {train, test, "
                       "shifted, val}, shots, train_size, val_shots, seed, options (the method's "
                       "own), compare_zeroshot, cache_dir, device, out.",
                       epilog="example: cliplab adapt --method coop --model MODEL_DIR --config "
                       "configs/adapt/fashion-mnist.yaml shots=4 options.epochs=50")
    p.add_argument("--method", choices=list(ADAPT_METHODS), metavar="METHOD",
                   help=f"adaptation method: {', '.join(ADAPT_METHODS)} (or the config's "
                   "'method')")
    p.add_argument("--model", help=f"{MODEL_SPECS} (or the config's 'model')")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="keep image features here, reused by later runs")
    add_device(p)
    add_stage_arguments(p, "run folder (default: the config's 'out' or "
                        "runs/adapt-<method>-<time>)", "shots=4 options.epochs=50")


def run(args: argparse.Namespace) -> int:
    """`cliplab adapt`; 0 when it succeeds (bad input raises `CliplabError`)."""
    from cliplab.adapt.config import AdaptConfig
    from cliplab.adapt.run import checked_config, format_results, run_adapt
    from cliplab.errors import ConfigError

    cfg = stage_config(AdaptConfig, args, method=args.method, model=args.model,
                       cache_dir=args.cache_dir, device=args.device)
    try:
        checked_config(cfg, config_where(args))
    except ConfigError as error:
        replaced, options = _file_method(args.config)
        if replaced in (None, cfg.method) or not options:  # the file's options are not at fault
            raise
        raise ConfigError(f"{error} (the config's options are for its method {replaced!r}, "
                          f"replaced by {cfg.method!r})") from None
    with naming_models({cfg.model.name: given_by(args, "--model", "model")}):
        results = run_adapt(cfg, progress=not args.no_progress, where=config_where(args))
    print(format_results(results))
    print(f"results.json and what was learned: {results['out']}")
    return 0


def _file_method(path: str | None) -> tuple[str | None, dict]:
    """The ``method`` the config file names, if any, and its ``options`` (read again: the
    loaded config holds the command line's)."""
    from cliplab.config import load_yaml

    raw = load_yaml(path) if path else {}
    options = raw.get("options")
    return raw.get("method"), options if isinstance(options, dict) else {}
