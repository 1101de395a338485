"""The merging papers' results on real data, from one LiT base model (lit-minilm with the
quickstart's architecture; pretrained here on 20 000 Fashion-MNIST images plus the first
--base-digits digits training images, 300 by default, so it starts with some skill at both, or
any model folder given with --base):

- greedy soup (Wortsman et al. 2022): several contrastive fine-tunes of the base on all ten
  Fashion-MNIST classes with different learning rates, seeds and augmentation; the greedy soup,
  chosen on a held-out validation split of the training images, against the best single
  fine-tune and the uniform soup on the test split; and Model Stock (Jang et al. 2024) of the
  same fine-tunes, which merges all of them around the base with no validation data;
- task arithmetic (Ilharco et al. 2023): a digits task vector (base fine-tuned on sklearn's
  digits); base + λ·τ for λ in --scales (default {-1, -0.5, 0, 0.5, 1}; 0, the base, is always
  scored) on digits and on Fashion-MNIST (the control). The paper: adding gains on digits;
  negating loses on digits while the control moves little. As in the paper, the negation λ is
  the largest-magnitude negative λ of the grid keeping the control at >= 95% of the base's
  control accuracy; it is recorded under "negation" with its digits and control accuracy. The
  README's results table says which of these held here.

Digits splits: ``load_digits`` splits sklearn's 1 797 images once into a fixed stratified 70/30
train/test split (1 257 / 540, seed 0). The base's digits and the task vector's fine-tune both
come from the train split, so neither has seen the 540 test digits that are scored; they overlap
each other, though: the base sees the first --base-digits train images and the fine-tune all
1 257, so the task vector is partly learnt on images the base was already trained on.

Zero-shot top-1 everywhere (class-description prompts for Fashion-MNIST, the digits templates
for digits). Prints one JSON object and writes it to OUT/results.json. Training runs in bf16
autocast where the CPU or GPU has bf16 units and in fp32 elsewhere (``precision: auto``; the
committed results ran on an AVX-512 BF16 CPU, so in bf16 — an AVX2 CPU trains in fp32 and
gets other numbers; forcing bf16 there would be emulated and far slower).

    python examples/merge_experiments.py --out runs/merge-exp [--base MODEL_DIR]
    python examples/merge_experiments.py --out runs/negation --only task-arithmetic \
        --base-digits 1257 --base-epochs 5 --threads 1 \
        --scales -1 -0.9 -0.8 -0.7 -0.6 -0.5 -0.4 -0.3 -0.2 -0.1 0 0.5 1
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from cliplab.data.digits import load_digits
from cliplab.data.fashion_mnist import load_fashion_mnist
from cliplab.data.pairs import labelled_to_pairs
from cliplab.data.types import ImageTextPairs, LabelledImages
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.zeroshot import zeroshot_classifier, zeroshot_metrics
from cliplab.merge import (apply_task_vector, greedy_soup, model_stock, task_vector,
                           uniform_soup)
from cliplab.models import DualEncoder, build_model
from cliplab.models.folder import model_fingerprint, weights_fingerprint, write_origin
from cliplab.train.trainer import TrainConfig, Trainer

# the benchmark scripts' argument types and help layout
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cli_args import existing_dir, make_parser, positive_float, positive_int  # noqa: E402

# ingredients: (learning rate, seed, augmentation) — the soup paper's recipe varies all three
SOUP_RECIPES = [(1e-4, 0, True), (3e-4, 1, True), (1e-3, 2, False), (3e-5, 3, True),
                (3e-4, 4, False)]
SCALES = (-1.0, -0.5, 0.0, 0.5, 1.0)
CONTROL_KEEP = 0.95  # the negation λ must keep the control at >= this share of the base's
PRECISION = "auto"  # bf16 autocast where the hardware has bf16 units, else fp32


BASE_TRAIN = slice(0, 20000)     # Fashion-MNIST training images the base is pretrained on
SOUP_TRAIN = slice(20000, 30000)  # fresh images the soup ingredients are fine-tuned on


def pretrain_base(out: Path, epochs: float, n_digits: int) -> Path:
    """LiT pretraining (quickstart architecture and settings) on Fashion-MNIST plus the first
    ``n_digits`` digits training images, so the base has some skill at both tasks before
    anything is merged."""
    fashion = load_fashion_mnist("train").subset(torch.arange(BASE_TRAIN.start, BASE_TRAIN.stop))
    digits_train = load_digits("train", image_size=28)  # batches with Fashion-MNIST
    if not 0 < n_digits <= len(digits_train):
        raise SystemExit(f"--base-digits must be in 1..{len(digits_train)}, got {n_digits}")
    digits = digits_train.subset(torch.arange(n_digits))
    a, b = labelled_to_pairs(fashion), labelled_to_pairs(digits)
    pairs = ImageTextPairs(torch.cat([a.images, b.images]), a.captions + b.captions,
                           torch.cat([a.groups, b.groups + 10]))
    model = build_model("lit-minilm", image_size=28, patch_size=7, width=192, layers=4, heads=3)
    cfg = TrainConfig(epochs=epochs, batch_size=256, lr=1e-3, warmup=0.05, lock_text=True,
                      augment={"hflip": False}, lr_scale={"text_projection": 0.1},
                      precision=PRECISION, progress=False)
    Trainer(model, cfg).fit(pairs)
    return model.save(out)


def zeroshot_acc(model: DualEncoder, data: LabelledImages) -> float:
    feats = encode_images(model, data.images, progress=False)
    head = zeroshot_classifier(model, data.prompt_names, data.templates)
    return zeroshot_metrics(feats.embeddings, data.labels, head)["acc1"]


def fine_tune(base: Path, data: LabelledImages, out: Path, lr: float, seed: int, augment: bool,
              epochs: float, batch_size: int) -> Path:
    """Contrastive fine-tune of ``base`` on ``data`` turned into caption pairs (frozen text
    tower, as the base was trained), saved with its origin recorded."""
    model = DualEncoder.load(base)
    origin = model_fingerprint(model)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, warmup=0.1, seed=seed,
                      lock_text=True, augment={"hflip": False} if augment else False,
                      lr_scale={"text_projection": 0.1}, precision=PRECISION, progress=False)
    torch.manual_seed(seed)
    Trainer(model, cfg).fit(labelled_to_pairs(data))
    model.save(out)
    write_origin(out, base, origin)
    return out


def soup_experiment(base: Path, out: Path, n_train: int, n_val: int, n_test: int,
                    epochs: float) -> dict:
    train_all = load_fashion_mnist("train")
    train = train_all.subset(torch.arange(SOUP_TRAIN.start, SOUP_TRAIN.start + n_train))
    val = train_all.subset(torch.arange(len(train_all) - n_val, len(train_all)))  # unseen
    test = load_fashion_mnist("test", limit=n_test)
    template = DualEncoder.load(base)
    cached: dict[str, float] = {}

    def val_acc(state) -> float:
        key = weights_fingerprint(state)
        if key not in cached:
            template.model.load_state_dict(state)
            cached[key] = zeroshot_acc(template, val)
        return cached[key]

    def test_acc(state) -> float:
        template.model.load_state_dict(state)
        return zeroshot_acc(template, test)

    folders, t0 = [], time.time()
    for i, (lr, seed, augment) in enumerate(SOUP_RECIPES):
        folders.append(fine_tune(base, train, out / f"soup-ft{i}", lr, seed, augment, epochs,
                                 256))
    finetune_s = time.time() - t0
    states = [DualEncoder.load(f).model.state_dict() for f in folders]
    names = [f"lr={lr:g} seed={s} aug={a}" for lr, s, a in SOUP_RECIPES]
    soup = greedy_soup(states, val_acc, names)
    uniform = uniform_soup(states)
    singles = {n: {"val": val_acc(s), "test": test_acc(s)} for n, s in zip(names, states)}
    best = max(singles, key=lambda n: singles[n]["val"])
    base_state = DualEncoder.load(base).model.state_dict()
    stock, ratios = model_stock(base_state, states, names)
    return {
        "train_images": n_train, "val_images": n_val, "test_images": n_test, "epochs": epochs,
        "finetune_wall_s": round(finetune_s, 1),
        "base": {"val": val_acc(base_state), "test": test_acc(base_state)},
        "ingredients": singles,
        "best_single_by_val": best,
        "uniform_soup": {"val": val_acc(uniform), "test": test_acc(uniform)},
        "greedy_soup": {"kept": [names[i] for i in soup.kept], "val": soup.score,
                        "test": test_acc(soup.state)},
        "model_stock": {"val": val_acc(stock), "test": test_acc(stock),
                        "mean_ratio": sum(ratios.values()) / len(ratios)},
    }


def negation_choice(rows: dict[float, dict[str, float]], keep: float = CONTROL_KEEP) -> dict:
    """The paper's negation pick: of the negative λ whose control accuracy is at least ``keep``
    times the base's (λ=0), the one of largest magnitude; ``lambda`` is None when none is."""
    base = rows[0.0]
    floor = keep * base["fashion_mnist_control"]
    ok = [s for s in rows if s < 0 and rows[s]["fashion_mnist_control"] >= floor]
    choice: dict = {"rule": f"largest |λ| < 0 with control >= {keep:g} x base control",
                    "control_floor": floor, "base": base, "lambda": None}
    if ok:
        scale = min(ok)
        choice.update({"lambda": scale, **rows[scale],
                       "digits_drop": base["digits"] - rows[scale]["digits"]})
    return choice


def task_arithmetic_experiment(base: Path, out: Path, epochs: float, n_control: int,
                               scales: list[float]) -> dict:
    digits_train, digits_test = (load_digits(s, image_size=28) for s in ("train", "test"))
    control = load_fashion_mnist("test", limit=n_control)
    folder = fine_tune(base, digits_train, out / "digits-ft", 3e-4, 0, False, epochs, 128)
    base_state = DualEncoder.load(base).model.state_dict()
    vector = task_vector(DualEncoder.load(folder).model.state_dict(), base_state)
    template = DualEncoder.load(base)
    rows: dict[float, dict[str, float]] = {}
    for scale in sorted(set(scales) | {0.0}):
        template.model.load_state_dict(apply_task_vector(base_state, vector, scale))
        rows[scale] = {"digits": zeroshot_acc(template, digits_test),
                       "fashion_mnist_control": zeroshot_acc(template, control)}
    return {"digits_train_images": len(digits_train), "digits_test_images": len(digits_test),
            "control_images": len(control), "epochs": epochs,
            "by_scale": {f"{s:+g}": r for s, r in rows.items()},
            "negation": negation_choice(rows)}


def main() -> None:
    ap = make_parser(__doc__, paragraphs=2)  # the first paragraph ends in ":", the list
    ap.add_argument("--base", type=existing_dir,
                    help="model folder to fine-tune from (default: pretrain one)")
    ap.add_argument("--base-epochs", type=positive_float, default=2.0,
                    help="epochs of the base's pretraining")
    ap.add_argument("--base-digits", type=positive_int, default=300,
                    help="digits training images in the base's pretraining (at most 1257)")
    ap.add_argument("--out", default="runs/merge-experiments",
                    help="folder for the models and results.json")
    ap.add_argument("--n-train", type=positive_int, default=4000,
                    help="Fashion-MNIST images each soup ingredient is fine-tuned on")
    ap.add_argument("--n-val", type=positive_int, default=2000,
                    help="held-out training images the greedy soup is chosen on")
    ap.add_argument("--n-test", type=positive_int, default=5000,
                    help="Fashion-MNIST test images (soup test, task-arithmetic control)")
    ap.add_argument("--soup-epochs", type=positive_float, default=1.0,
                    help="epochs of each soup ingredient's fine-tune")
    ap.add_argument("--digits-epochs", type=positive_float, default=4.0,
                    help="epochs of the digits fine-tune (the task vector)")
    ap.add_argument("--scales", type=float, nargs="+", default=list(SCALES),
                    help="task-arithmetic λ grid (0, the base, is always added)")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    ap.add_argument("--only", choices=("soup", "task-arithmetic"),
                    help="run one experiment (default: both)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out, start = Path(args.out), time.time()
    base = (Path(args.base) if args.base
            else pretrain_base(out / "base", args.base_epochs, args.base_digits))
    results: dict = {"base": str(base), "base_pretrain_s": round(time.time() - start, 1),
                     "base_epochs": None if args.base else args.base_epochs,
                     "base_digits": None if args.base else args.base_digits}
    if args.only != "task-arithmetic":
        results["greedy_soup"] = soup_experiment(base, out, args.n_train, args.n_val,
                                                 args.n_test, args.soup_epochs)
    if args.only != "soup":
        results["task_arithmetic"] = task_arithmetic_experiment(base, out, args.digits_epochs,
                                                                args.n_test, args.scales)
    results["wall_time_s"] = round(time.time() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
