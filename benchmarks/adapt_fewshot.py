"""Few-shot adaptation against the hand-written-prompt zero-shot head (CoOp's and Tip-Adapter's
headline comparison), on one model and one labelled dataset, over shots and seeds.

    python benchmarks/adapt_fewshot.py --model runs/quickstart-*/checkpoints/step-*/model \
        --data fashion-mnist --shots 1 16 --seeds 1 2 3 --methods tip-adapter coop

Prints one JSON line per (method, shots) with acc1 mean, std (the sample std over seeds, as in
every table of the README) and per seed, the zero-shot head's acc1 on the same test set, and the
gain over it (also written to ``--out FILE``, one line each); never asserts. Image features are
computed once (one in-memory cache), so every further method and seed costs only its own
fitting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import check_model, make_parser, non_negative_int, positive_int  # noqa: E402
from cli_args import run_main  # noqa: E402

from cliplab.adapt import ADAPT_METHODS  # noqa: E402  (a name list: no torch)
from cliplab.errors import ConfigError  # noqa: E402

DATA = {"fashion-mnist": ({"source": "fashion-mnist", "split": "train"},
                          {"source": "fashion-mnist", "split": "test"}),
        "digits": ({"source": "digits", "split": "train"}, {"source": "digits", "split": "test"})}


def method_options(parser: argparse.ArgumentParser, items: list[str],
                   methods: list[str]) -> dict[str, dict]:
    """``--option METHOD.KEY=VALUE`` items as {method: {key: value}} (values read as YAML); a
    usage error for an item not of that form or whose METHOD is not one of ``methods`` (it
    would be dropped without a word). The keys themselves are cliplab's to check."""
    import yaml

    options: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not eq or not dot or not method or not name:
            parser.error(f"argument --option: expected METHOD.KEY=VALUE (e.g. "
                         f"tip-adapter.search=true), got {item!r}")
        if method not in methods:
            parser.error(f"argument --option: {item!r} is for {method!r}, which is not one of "
                         f"--methods ({', '.join(methods)})")
        try:
            options.setdefault(method, {})[name] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            parser.error(f"argument --option: {item!r}: the value is not YAML "
                         f"({str(err).splitlines()[0]})")
    return options


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__)
    ap.add_argument("--model", required=True,
                    help="model, checkpoint or run folder, preset or Hub id to adapt")
    ap.add_argument("--data", choices=sorted(DATA), default="fashion-mnist",
                    help="labelled dataset (its train and test splits)")
    ap.add_argument("--test-limit", type=positive_int, default=None,
                    help="first N test images only (fashion-mnist; default: all)")
    ap.add_argument("--shots", type=non_negative_int, nargs="+", default=[1, 16],
                    help="training images per class, one row each (0: all)")
    ap.add_argument("--seeds", type=non_negative_int, nargs="+", default=[1, 2, 3],
                    help="seeds per (method, shots): mean and std over them")
    ap.add_argument("--methods", nargs="+", default=["tip-adapter", "coop"],
                    choices=list(ADAPT_METHODS), metavar="METHOD",
                    help="adaptation methods (cliplab adapt's: " + ", ".join(ADAPT_METHODS) + ")")
    ap.add_argument("--val-shots", type=non_negative_int, default=0,
                    help="validation shots per class (Tip-Adapter's search)")
    ap.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="an option of one of --methods, e.g. tip-adapter.search=true")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="torch CPU threads (1 is fastest on a busy shared machine; default: "
                    "torch's)")
    ap.add_argument("--out", type=Path, default=None,
                    help="also write the JSON lines to this file (replaced)")
    args = ap.parse_args(argv)
    options = method_options(ap, args.option, args.methods)
    check_model(ap, "--model", args.model)

    from cliplab.adapt.run import checked_config, run_adapt
    from cliplab.evaluate.feature_cache import FeatureCache
    from cliplab.models.resolve import load_model

    lines = []
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    train, test = DATA[args.data]
    if args.test_limit:
        test = {**test, "limit": args.test_limit} if args.data == "fashion-mnist" else test

    def config(method: str, k: int, seed: int) -> dict:
        return {"method": method, "model": args.model, "data": {"train": train, "test": test},
                "shots": k, "seed": seed, "val_shots": args.val_shots,
                "options": options.get(method, {})}

    for method in args.methods:  # every method's options checked before any model or data
        try:
            checked_config(config(method, args.shots[0], args.seeds[0]))
        except ConfigError as err:
            ap.error(f"argument --option: {err}" if method in options else str(err))
    model = load_model(args.model)
    cache = FeatureCache()
    for method in args.methods:
        for k in args.shots:
            accs, zs, times = [], None, []
            for seed in args.seeds:
                start = time.time()
                cfg = config(method, k, seed)
                res = run_adapt(cfg, model=model, progress=False, cache=cache, write=False)
                accs.append(res["test"]["acc1"])
                zs = res["zeroshot"]["acc1"]
                times.append(time.time() - start)
            mean = statistics.mean(accs)
            lines.append(json.dumps({
                "model": args.model, "data": args.data, "method": method, "shots": k,
                "seeds": args.seeds, "acc1_mean": round(mean, 4),
                "acc1_std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
                "acc1_per_seed": [round(a, 4) for a in accs], "zeroshot_acc1": round(zs, 4),
                "gain_over_zeroshot": round(mean - zs, 4),
                "fit_and_eval_s_per_seed": round(statistics.mean(times), 1),
                "options": options.get(method, {})}))
            print(lines[-1], flush=True)
            if args.out:  # what is done so far survives
                args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    run_main(main)
