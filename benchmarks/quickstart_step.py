"""Training steps/s of the quickstart's model: ViT last block at the class token only vs HF's
full forward, alternated in one process.

The model is `configs/quickstart.yaml`'s (lit-minilm: 28 px ViT, patch 7, width 192, 4 blocks,
frozen MiniLM text tower whose caption features are cached) and the step is the quickstart's,
run by cliplab's real `Trainer` with the recipe's `train:` section (its batch size and precision,
shift/scale/rotate augmentation, multi-positive captions), on random uint8 28x28 grayscale
images with 7 classes x 8 prompt templates as captions. "hf" runs the image tower's plain
`ViTModel.forward` (the pooled path switched off), "pooled" the default. Both sides train the
same initial weights; the order alternates each repeat and the per-repeat ratios are reported
with the medians (a shared machine's load swings single runs). With ``--profile``, one extra
pooled run under torch.profiler prints the top ops and the time per phase to stderr.

    .venv/bin/python benchmarks/quickstart_step.py [--steps 10] [--warmup 2] [--repeats 5]
        [--precision fp32|bf16] [--threads N] [--profile]
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

if TYPE_CHECKING:
    from cliplab.data.types import ImageTextPairs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import make_parser, positive_int  # noqa: E402
from cli_args import run_main  # noqa: E402

# torch and cliplab are imported where used: --help and a bad value answer at once
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
SEEN_CLASSES = 7  # the quickstart trains on 10 - 3 held-out classes


def quickstart_recipe() -> tuple[dict, dict]:
    """The quickstart's model options and ``train:`` section."""
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    return recipe["model"].get("options") or {}, recipe["train"]


def synthetic_pairs(n: int, image_size: int, seed: int = 0) -> ImageTextPairs:
    """Random grayscale images (as Fashion-MNIST's) with the quickstart's kind of captions."""
    import torch

    from cliplab.data.fashion_mnist import PLAIN_PHRASES, TEMPLATES
    from cliplab.data.types import ImageTextPairs

    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, image_size, image_size, 1), dtype=torch.uint8,
                           generator=gen)
    labels = torch.randint(0, SEEN_CLASSES, (n,), generator=gen)
    per_class = [[t.format(p) for t in TEMPLATES] for p in PLAIN_PHRASES[:SEEN_CLASSES]]
    return ImageTextPairs(images, [per_class[int(y)] for y in labels], groups=labels)


@contextlib.contextmanager
def hf_image_forward():
    """Image towers run HF's own forward (every block on every token)."""
    with mock.patch("cliplab.models.dual_encoder.supports_pooled_forward",
                    lambda tower: False):
        yield


def run_steps(model, initial: dict, train: dict, pairs: ImageTextPairs, warmup: int,
              steps: int, profiler=None) -> float:
    """Steps/s over ``steps`` quickstart steps after ``warmup`` ones, from the Trainer's log."""
    from cliplab.runs import RunDir
    from cliplab.train.trainer import TrainConfig, Trainer

    model.load_state_dict(initial)
    cfg = TrainConfig.from_dict({**train, "steps": warmup + steps, "warmup": 0,
                                 "log_every": 1, "progress": False, "device": "cpu"})
    with tempfile.TemporaryDirectory() as tmp:
        with profiler or contextlib.nullcontext():
            Trainer(model, cfg, RunDir(tmp, tensorboard=False)).fit(pairs)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").open()]
    t = {r["step"]: r["time_s"] for r in records}
    return steps / (t[warmup + steps] - t[warmup])


def profile_step(model, initial: dict, train: dict, pairs: ImageTextPairs, steps: int) -> None:
    """Top ops and time per phase (preprocess+augment, image forward, backward, optimizer) of
    ``steps`` + 1 pooled quickstart steps, to stderr."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def labelled(name, fn):
        def wrapper(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)
        return wrapper

    # instance attributes shadow the methods for this run only
    model.preprocess = labelled("phase: preprocess + augment", model.preprocess)
    model.encode_image = labelled("phase: image tower forward", model.encode_image)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof, record_function("fit"):
            run_steps(model, initial, train, pairs, 1, steps)
    finally:
        del model.preprocess, model.encode_image
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    phases = {e.key: e.cpu_time_total for e in events if e.key.startswith("phase: ")}
    phases["phase: backward (autograd nodes)"] = sum(
        e.cpu_time_total for e in events
        if e.key.startswith("autograd::engine::evaluate_function"))
    phases["phase: optimizer step"] = sum(e.cpu_time_total for e in events
                                          if e.key.startswith("Optimizer.step#"))
    # "fit" also holds the once-per-run work: caching caption features, the final checkpoint
    total = next(e.cpu_time_total for e in events if e.key == "fit")
    print(json.dumps({"profile_steps": steps, "fit_cpu_ms": round(total / 1e3, 1),
                      **{k: f"{v / total:.1%}" for k, v in phases.items()}}), file=sys.stderr)


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--warmup", type=positive_int, default=2,
                        help="steps before the timed ones (at least 1: timing starts after it)")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per run")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="runs of each side (alternating; medians reported)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="override the recipe's train.precision (bf16 autocast is ~10x "
                        "slower than fp32 on CPUs without native bf16, e.g. AVX2-only)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default torch's); on a loaded machine 1 thread "
                        "avoids OpenMP barrier stalls that hide compute differences")
    parser.add_argument("--profile", action="store_true",
                        help="also profile pooled steps (top ops and phases to stderr)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from cliplab.models import build_model

    options, train = quickstart_recipe()
    if args.precision:
        train["precision"] = args.precision
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model("lit-minilm", **options)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = synthetic_pairs(train["batch_size"] * (args.warmup + args.steps),
                            options["image_size"])
    runs: dict[str, list[float]] = {"pooled": [], "hf": []}
    for i in range(args.repeats):
        for side in (("pooled", "hf") if i % 2 == 0 else ("hf", "pooled")):
            with hf_image_forward() if side == "hf" else contextlib.nullcontext():
                runs[side].append(run_steps(model, initial, train, pairs, args.warmup,
                                            args.steps))
    if args.profile:
        profile_step(model, initial, train, pairs, args.steps)
    ratios = [p / h for p, h in zip(runs["pooled"], runs["hf"])]
    print(json.dumps({
        "model": {"preset": "lit-minilm", **options}, "batch": train["batch_size"],
        "precision": train.get("precision"),
        "cpu_native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "threads": torch.get_num_threads(),
        "steps": args.steps, "repeats": args.repeats,
        "pooled_steps_per_s": round(statistics.median(runs["pooled"]), 3),
        "hf_steps_per_s": round(statistics.median(runs["hf"]), 3),
        "ratio_of_medians": round(statistics.median(runs["pooled"])
                                  / statistics.median(runs["hf"]), 3),
        "median_paired_ratio": round(statistics.median(ratios), 3),
        "paired_ratios": [round(r, 3) for r in ratios],
        "pooled_runs": [round(r, 3) for r in runs["pooled"]],
        "hf_runs": [round(r, 3) for r in runs["hf"]]}), flush=True)


if __name__ == "__main__":
    run_main(main)
