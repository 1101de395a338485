"""Fine-tuning on Fashion-MNIST from a LiT checkpoint: full fine-tuning vs LoRA (accuracy and
trainable parameters), then WiSE-FT's α sweep on the test set and on shifted copies of it.

The paper results this checks (Wortsman et al. 2022; Hu et al. 2021):
- WiSE-FT: some α strictly between 0 and 1 is at least as good as both endpoints on a shifted set;
- LoRA trains a small fraction of the parameters and lands within a few points of full
  fine-tuning.

Prints one JSON line (and writes it to OUT/summary.json):

    .venv/bin/python benchmarks/finetune_wise_ft.py --model RUN/checkpoints/step-N/model \
        [--train-size 6000] [--test-size 2000] [--epochs 2] [--out runs/bench-finetune]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import check_model, make_parser, positive_float, positive_int  # noqa: E402
from cli_args import run_main  # noqa: E402

SHIFTS = ["invert", "noise:0.3", "blur:1.5"]


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--model", required=True, help="the LiT (quickstart) model folder")
    parser.add_argument("--train-size", type=positive_int, default=6000,
                        help="Fashion-MNIST training images to fine-tune on")
    parser.add_argument("--test-size", type=positive_int, default=2000,
                        help="Fashion-MNIST test images (and of each shifted copy)")
    parser.add_argument("--epochs", type=positive_float, default=2,
                        help="fine-tuning epochs (both methods)")
    parser.add_argument("--ft-lr", type=positive_float, default=1e-4,
                        help="full fine-tuning's learning rate")
    parser.add_argument("--lora-lr", type=positive_float, default=1e-3,
                        help="LoRA's learning rate")
    parser.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (alpha: 2 x rank)")
    parser.add_argument("--batch-size", type=positive_int, default=128,
                        help="fine-tuning batch (both methods); at most --train-size")
    parser.add_argument("--shifts", nargs="+", default=SHIFTS,
                        help="shifted copies of the test set WiSE-FT is also scored on")
    parser.add_argument("--out", default="runs/bench-finetune",
                        help="folder for the fine-tunes and summary.json")
    parser.add_argument("--skip-lora", action="store_true", help="full fine-tuning + WiSE-FT only")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args()
    if args.batch_size > args.train_size:
        parser.error(f"argument --batch-size: a batch of {args.batch_size} is larger than the "
                     f"{args.train_size} training images (--train-size); lower --batch-size")
    check_model(parser, "--model", args.model)
    from cliplab.data.shift import parse_shift
    from cliplab.errors import ConfigError

    for shift in args.shifts:  # a bad name: said now, not after the fine-tunes
        try:
            parse_shift(shift)
        except ConfigError as err:
            parser.error(f"argument --shifts: {err}")

    import torch

    from cliplab.adapt.finetune import load_finetuned
    from cliplab.adapt.head import zeroshot_classifier_head
    from cliplab.adapt.run import run_adapt
    from cliplab.adapt.wise_ft import DEFAULT_ALPHAS, wise_ft_sweep
    from cliplab.data.sources import as_labelled, load_source
    from cliplab.models.resolve import load_model

    torch.manual_seed(0)
    out = Path(args.out)
    test = {"source": "fashion-mnist", "split": "test", "limit": args.test_size}
    common = {"model": args.model, "shots": 0, "train_size": args.train_size, "seed": 0,
              "data": {"train": {"source": "fashion-mnist", "split": "train"}, "test": test}}
    train = {"epochs": args.epochs, "batch_size": args.batch_size, "warmup": 0.1,
             "augment": {"hflip": False}}
    start = time.time()
    ft = run_adapt({**common, "method": "finetune", "out": str(out / "finetune"),
                    "options": {"train": {**train, "lr": args.ft_lr, "weight_decay": 0.1}}},
                   progress=args.progress)
    lo = None if args.skip_lora else run_adapt(
        {**common, "method": "lora", "out": str(out / "lora"),
         "options": {"rank": args.rank, "alpha": 2 * args.rank,
                     "train": {**train, "lr": args.lora_lr, "weight_decay": 0.01}}},
        progress=args.progress)

    zeroshot = load_model(args.model)
    tuned, head = load_finetuned(ft["model_dir"])
    sets = {"target": as_labelled(load_source(test), "test")}
    for shift in args.shifts:
        sets[shift] = as_labelled(load_source({**test, "shift": shift}), shift)
    rows = wise_ft_sweep(zeroshot, zeroshot_classifier_head(zeroshot, sets["target"]).weight,
                         tuned, head.weight, sets, DEFAULT_ALPHAS, args.progress)
    wise = {}
    for name in sets:
        accs = {r["alpha"]: round(r[name]["acc1"], 4) for r in rows}
        interior = {a: v for a, v in accs.items() if 0 < a < 1}
        best = max(interior, key=interior.get)
        wise[name] = {"acc1_by_alpha": accs, "best_interior_alpha": best,
                      "interior_at_least_both_ends": interior[best] >= max(accs[0.0], accs[1.0])}
    summary = {
        "model": args.model, "train_images": args.train_size, "test_images": args.test_size,
        "epochs": args.epochs, "batch_size": args.batch_size, "ft_lr": args.ft_lr,
        "shifts": list(args.shifts),
        **({} if args.skip_lora else {"lora_lr": args.lora_lr, "rank": args.rank}),
        "zeroshot_acc1": round(ft["zeroshot"]["acc1"], 4),
        "finetune_acc1": round(ft["test"]["acc1"], 4),
        "finetune_trainable_params": ft["params"]["trainable"],
        "wise_ft": wise,
        "wall_time_s": round(time.time() - start, 1),
    }
    if lo is not None:
        summary.update({
            "lora_acc1": round(lo["test"]["acc1"], 4),
            "lora_minus_finetune": round(lo["test"]["acc1"] - ft["test"]["acc1"], 4),
            "lora_trainable_params": lo["params"]["trainable"],
            "lora_adapter_params": lo["params"]["lora"], "model_params": lo["params"]["total"]})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    run_main(main)
