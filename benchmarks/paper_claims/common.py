"""What every claim of `benchmarks/papers.py` shares: the competent base model, the data splits
(training pool, validation pool, test set — disjoint), the context a claim runs in, and the
shape of one result entry.

The competent base is the quickstart's LiT model (a small ViT trained from scratch against the
frozen pretrained MiniLM text tower) on Fashion-MNIST with three classes (shirt, sneaker, bag)
never seen in pretraining and the last 10 000 training images held out of it: its zero-shot
accuracy on all ten classes is well above chance (~60%), so adapting it has something to gain and
to lose. Splits, all disjoint:

- ``train_pool()``: the first 50 000 training images (few-shot and fine-tuning data),
- ``validation_pool()``: the last 10 000 training images, never seen by the base; every
  hyperparameter a claim chooses (α, λ, soup ingredients, ...) is chosen on it,
- ``test_set()``: the 10 000 test images (``--quick``: the first 2 000), only ever reported.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HELDOUT = ["shirt", "sneaker", "bag"]  # novel classes: never in the base's pretraining
SEEN = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "ankle boot"]
POOL_SIZE = 50_000


@dataclass
class ClaimContext:
    """Where a claim runs: the base model folder, the seeds, ``quick`` (smaller sizes), a work
    folder of its own, and the Fashion-MNIST folder (None: Debian's)."""

    base: Path
    seeds: list[int]
    quick: bool
    work: Path
    data_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _fmnist(split: str, data_dir: str | None, **options: Any) -> dict:
    spec = {"source": "fashion-mnist", "split": split, **options}
    return {**spec, "data_dir": data_dir} if data_dir else spec


def train_pool(ctx: ClaimContext) -> dict:
    """Source spec of the training pool (first 50 000 training images)."""
    return _fmnist("train", ctx.data_dir, limit=POOL_SIZE)


def validation_pool(ctx: ClaimContext, limit: int | None = None) -> dict:
    """Source spec of the validation pool (the last 10 000 training images, or the first
    ``limit`` of them)."""
    return _fmnist("train", ctx.data_dir, offset=POOL_SIZE, **({"limit": limit} if limit else {}))


def test_set(ctx: ClaimContext) -> dict:
    """Source spec of the reported test set (``--quick``: its first 2 000 images)."""
    return _fmnist("test", ctx.data_dir, **({"limit": 2000} if ctx.quick else {}))


def base_recipe(quick: bool) -> dict:
    """The quickstart config that trains the competent base: the quickstart's recipe as the
    committed table was measured with (1360 steps of batch 128 — 5 epochs of the 35 000 seen-class
    pairs outside the validation pool — with shift/scale/rotate jitter, which the quickstart has
    since dropped) with the validation pool held out (``--quick``: 3 epochs of batch 256)."""
    cfg: dict[str, Any] = {"data": {"validation": 60_000 - POOL_SIZE},
                           "train": {"augment": {"hflip": False}}}
    if quick:
        cfg["train"].update(epochs=3, batch_size=256)
    return cfg


def competent_base(out: Path, quick: bool, data_dir: str | None = None,
                   progress: bool = True) -> Path:
    """The base model folder, trained once into ``out`` by the quickstart and reused after
    (its ``results.json`` holds its validation accuracies)."""
    results = out / "results.json"
    if results.is_file():
        return Path(json.loads(results.read_text())["model_dir"])
    from cliplab.quickstart import run_quickstart

    cfg = base_recipe(quick)
    cfg["out"] = str(out)
    if data_dir:
        cfg["data"]["data_dir"] = data_dir
    return Path(run_quickstart(cfg, progress=progress)["model_dir"])


def pretrain_once(run_path: Path, pairs, train: dict, where: str) -> Path:
    """The quickstart's model pretrained on ``pairs`` (an ``ImageTextPairs``) with the
    quickstart's recipe updated by ``train``, into ``run_path`` once (a run folder, written
    under a temporary name and renamed when done) and reused after; its model folder."""
    import shutil

    from cliplab.models.resolve import load_model, model_folder
    from cliplab.quickstart import DEFAULT_MODEL, quickstart_config
    from cliplab.runs import RunDir
    from cliplab.train.trainer import Trainer

    if run_path.is_dir():
        return model_folder(run_path)
    recipe = quickstart_config({"train": train}, where).train.model_copy(
        update={"progress": False})
    tmp = run_path.with_name(run_path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Trainer(load_model(DEFAULT_MODEL), recipe, RunDir(tmp)).fit(pairs)
    tmp.rename(run_path)
    return model_folder(run_path)


def mean_std(values: list[float]) -> dict:
    """``{"mean", "std", "values"}`` in percent points (std 0 for one value)."""
    pct = [100.0 * v for v in values]
    return {"mean": round(statistics.fmean(pct), 2),
            "std": round(statistics.stdev(pct), 2) if len(pct) > 1 else 0.0,
            "values": [round(v, 2) for v in pct]}


def entry(claim: str, paper: str, reproduced: bool, seeds: list[int], numbers: dict,
          base: str, paper_numbers: str = "", note: str = "") -> dict:
    """One row of ``papers.json``: the claim, its paper, whether it reproduced, the seeds, our
    numbers (mean/std/values per arm), which base, the paper's own numbers for reference, and a
    note saying why when it did not reproduce."""
    return {"claim": claim, "paper": paper, "reproduced": bool(reproduced), "seeds": list(seeds),
            "numbers": numbers, "base": base, "paper_numbers": paper_numbers, "note": note}


def pooled_std(a: Sequence[float], b: Sequence[float]) -> float:
    """The noise every claim's rule compares a gap with: ``sqrt((var a + var b) / 2)`` of two
    arms' per-seed values (sample variances; 0 for an arm of one value)."""
    var = [statistics.variance(x) if len(x) > 1 else 0.0 for x in (a, b)]
    return math.sqrt(sum(var) / 2)
