"""Long-tail demo: train tiny-clip on `shapes` captions whose colours are exponentially imbalanced
(the most frequent colour in `largest` samples, each next one in `ratio` times as many), then
plot zero-shot colour accuracy against each colour's frequency in the training captions.

    python scripts/long_tail_demo.py [--out runs/long-tail-demo] [--order-seed 0] [--epochs 8]
        [--results examples/results/long_tail_demo_order0.json]
    cliplab report --inputs runs/long-tail-demo --out runs/long-tail-report

Writes a new run folder (config.yaml, metrics.jsonl, checkpoint, results.json with the
long-tail analysis under evals.long_tail; by default runs/long-tail-demo-<time>; an --out
that holds another run or other files is refused, as by `cliplab pretrain`) and prints the
fit as one JSON line (also written to ``--results``: the README's numbers are
examples/results/long_tail_demo_order{0,1,2}.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cliplab.curate.concept_frequency import count_concepts
from cliplab.curate.imbalance import exponential_counts, exponential_subsample
from cliplab.data.shapes import COLORS, load_shapes_with_scenes, shapes_classification
from cliplab.data.types import ImageTextPairs
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.long_tail import long_tail_analysis
from cliplab.evaluate.metrics import per_class_accuracy
from cliplab.evaluate.zeroshot import zeroshot_classifier, zeroshot_logits
from cliplab.models import build_model
from cliplab.errors import CliplabError
from cliplab.runs import RunDir, check_run_out, default_run_dir
from cliplab.train.trainer import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cli_args import fraction, positive_float, positive_int  # noqa: E402

MODEL = {"image_size": 32, "patch_size": 8, "width": 128, "layers": 3, "heads": 4,
         "embed_dim": 128}


def run_demo(out: str, largest: int = 600, ratio: float = 0.5, epochs: float = 8,
             order_seed: int = 0, batch_size: int = 64, progress: bool = True) -> dict:
    """Train on the imbalanced set, evaluate per colour; returns the long-tail analysis."""
    start = time.time()
    check_run_out(out)  # never into another run, or over a user's files
    colors = list(COLORS)
    order = torch.randperm(len(colors), generator=torch.Generator().manual_seed(order_seed))
    counts = exponential_counts(len(colors), largest, ratio)
    pool, scenes = load_shapes_with_scenes(n=len(colors) * largest * 3 // 2, seed=0,
                                           kinds=["single"], image_size=32)
    color_of = torch.tensor([colors.index(s.objects[0].color) for s in scenes])
    keep = exponential_subsample(color_of, counts, order.tolist(), seed=order_seed)
    pairs = ImageTextPairs(pool.images[keep], [pool.captions[i] for i in keep],
                           pool.groups[keep], name="shapes-long-tail")

    config = {"model": {"preset": "tiny-clip", "options": MODEL},
              "data": {"source": "shapes (single, colours exponentially imbalanced)",
                       "counts": {colors[c]: k for c, k in zip(order.tolist(), counts)}},
              "train": {"epochs": epochs, "batch_size": batch_size, "lr": 1e-3, "warmup": 0.1,
                        "augment": False, "multi_positive": True, "log_every": 5}}
    run = RunDir(out)
    run.write_config(config)
    model = build_model("tiny-clip", **MODEL)
    trainer = Trainer(model, TrainConfig.from_dict({**config["train"], "progress": progress}),
                      run)
    trainer.fit(pairs)

    test = shapes_classification(n=1600, seed=1, attribute="color", image_size=32)
    feats = encode_images(model, test.images, progress=progress)
    head = zeroshot_classifier(model, test.prompt_names, test.templates)
    acc = per_class_accuracy(zeroshot_logits(feats.embeddings, head), test.labels,
                             test.classnames)
    freq = count_concepts(pairs.captions, test.classnames).as_dict()
    analysis = long_tail_analysis(acc, freq)
    analysis["n_train_samples"] = len(pairs)
    results = {"evals": {"long_tail": analysis}, "train_pairs": len(pairs), "steps": trainer.step,
               "model_dir": str(trainer.last_checkpoint / "model"),
               "wall_time_s": round(time.time() - start, 1)}
    run.write_json("results.json", results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="new run folder (default: runs/long-tail-demo-<time>)")
    parser.add_argument("--largest", type=positive_int, default=600,
                        help="samples of the most frequent colour (default 600)")
    parser.add_argument("--ratio", type=fraction, default=0.5,
                        help="each next colour has this many times the samples (default 0.5)")
    parser.add_argument("--epochs", type=positive_float, default=8,
                        help="training epochs (default 8)")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="batch size (default 64)")
    parser.add_argument("--order-seed", type=int, default=0,
                        help="which colour gets which frequency (a random permutation; default 0)")
    parser.add_argument("--results", type=Path, default=None,
                        help="also write the printed JSON line to this file")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args()
    args.out = args.out or str(default_run_dir("long-tail-demo"))
    try:
        results = run_demo(args.out, args.largest, args.ratio, args.epochs, args.order_seed,
                           args.batch_size, not args.no_progress)
    except CliplabError as err:
        parser.exit(2, f"long_tail_demo: error: {err}\n")
    lt = results["evals"]["long_tail"]
    line = {"fit": lt["fit"], "per_class": lt["per_class"],
            "settings": {"largest": args.largest, "ratio": args.ratio, "epochs": args.epochs,
                         "batch_size": args.batch_size, "order_seed": args.order_seed},
            "wall_time_s": results["wall_time_s"]}
    print(json.dumps({**line, "out": args.out}))
    if args.results:  # without the run folder: where it lies is this machine's business
        args.results.write_text(json.dumps(line, indent=2) + "\n")


if __name__ == "__main__":
    main()
