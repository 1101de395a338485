"""Wall time of zero-shot + linear probe + few-shot + retrieval on one model and dataset:
cliplab's suite against the same tasks run one after another the way CLIP_benchmark runs them.

CLIP_benchmark itself cannot run here: it imports open_clip and torchvision, which do not import
beside this machine's CPU torch, and its linear probe asserts a CUDA device. So the baseline is a
faithful CPU transcription of its algorithms (``ClipBenchmarkWay`` below), each step mirroring:

- zero-shot (``metrics/zeroshot_classification.py``): encode the test images; build the
  classifier for this run, class by class: embed the class's prompts, normalise each, average,
  renormalise; top-k accuracy and balanced accuracy (= mean per-class recall) of the logits.
- linear probe (``metrics/linear_probe.py``): encode train and test images into unit-length
  embeddings (its ``Featurizer``, ``normalize=True``) and save them under ``feature_root``;
  split ``val_proportion=0.2`` of train off for validation; ``tune_weight_decay``: a
  ``torch.nn.Linear`` trained with AdamW (lr 0.1, 10 epochs, batch 64, cosine schedule, seeded)
  for each weight decay its search visits on ``logspace(-6, 2, 97)`` (7 coarse points, then
  bisection with spans 8, 4, 2, 1: 19 trainings), then one training on train+val with the best
  weight decay; acc1, acc5, balanced accuracy on test.
- few-shot: CLIP_benchmark's few-shot runs reuse the features its linear probe saved under
  ``feature_root`` (no re-encoding); it has no nearest-class-mean classifier, so the baseline
  applies cliplab's NCM to those loaded features, one run per (k, seed), as separate invocations
  would.
- retrieval (``metrics/zeroshot_retrieval.py``): per batch of 64 images, encode the images and
  every caption of every image in the batch (duplicates included); scores = texts @ images;
  recall@k through its ``recall_at_k`` (top-k one-hot against the positive-pair matrix, in
  batches) in both directions.

Not handicapped: image batches for zero-shot and probe features are as large as cliplab's (500),
data loaders run in-process (no worker start-up), probe training uses cliplab's thread rule
(one thread for small problems), and every step runs in float32 as on a CPU.

On a labelled set turned into pairs, every caption is shared by all images of its class, so
image->text recall depends on how top-k orders tied scores; both sides use ``torch.topk`` once
per k on the same scores, which is what makes them agree exactly.

``metrics_equal`` compares every metric of every task: zero-shot, few-shot and retrieval are the
same algorithms and must agree within ``EXACT_TOL``; the linear probes are different algorithms
(cliplab: L-BFGS logistic regression on standardised features with its L2 chosen on a
validation split; CLIP_benchmark: AdamW epochs with a weight-decay search), so cliplab's
acc1/acc5/mean per-class recall must each be at least the baseline's less ``PROBE_TOL`` (an
equally good or better probe), and both accuracies are printed. One JSON line.

    .venv/bin/python benchmarks/eval_suite.py [--model PATH_OR_PRESET] [--n-train 10000]
        [--n-test 5000] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import check_model, make_parser, positive_int  # noqa: E402
from cli_args import run_main  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument("--model", default="lit-minilm",
                        help="preset, model, checkpoint or run folder, or Hub id")
    parser.add_argument("--n-train", type=positive_int, default=10000,
                        help="Fashion-MNIST training images (linear probe, few-shot)")
    parser.add_argument("--n-test", type=positive_int, default=5000,
                        help="Fashion-MNIST test images (every task)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="cliplab's suite precision (the baseline runs fp32)")
    args = parser.parse_args(argv)
    # offline unless the caller says otherwise: set before huggingface_hub is first imported
    # (it reads the variable once, then), which check_model's cliplab import does
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_model(parser, "--model", args.model)
    return args


# run as a script, --help and a bad value answer before the seconds of importing torch and
# cliplab below (the baseline's classes need torch where they are defined)
ARGS = parse_args() if __name__ == "__main__" else None

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from cliplab.data.sources import as_pairs, load_source  # noqa: E402
from cliplab.evaluate.feature_cache import FeatureCache  # noqa: E402
from cliplab.evaluate.features import encode_images  # noqa: E402
from cliplab.evaluate.few_shot import nearest_class_mean, sample_k_shot  # noqa: E402
from cliplab.evaluate.linear_probe import threads_for  # noqa: E402
from cliplab.evaluate.metrics import classification_metrics  # noqa: E402
from cliplab.evaluate.suite import plan_probes, run_task, suite_spec  # noqa: E402
from cliplab.evaluate.tasks import TaskContext  # noqa: E402
from cliplab.models.resolve import load_model  # noqa: E402
from cliplab.models.dual_encoder import DualEncoder, evaluating  # noqa: E402

EXACT_TOL = 1e-6
PROBE_TOL = 0.02
SHOTS, SEEDS = (1, 4, 16), (0, 1)


def suite(n_train: int, n_test: int, precision: str = "fp32") -> dict:
    train = {"source": "fashion-mnist", "split": "train", "limit": n_train}
    test = {"source": "fashion-mnist", "split": "test", "limit": n_test}
    return {"precision": precision, "tasks": [
        {"name": "zeroshot", "task": "zeroshot", "data": test},
        # CLIP_benchmark probes the unit image embeddings; the L2 is chosen on a validation split
        {"name": "linear_probe", "task": "linear_probe", "train": train, "test": test,
         "features": "embeddings"},
        {"name": "few_shot", "task": "few_shot", "train": train, "test": test,
         "shots": list(SHOTS), "seeds": list(SEEDS), "methods": ["ncm"],
         "features": "embeddings"},
        {"name": "retrieval", "task": "retrieval", "data": test, "ks": [1, 5, 10]},
    ]}


class FeatureDataset(Dataset):
    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i):
        return self.features[i], self.targets[i]


class ClipBenchmarkWay:
    """The four tasks as CLIP_benchmark computes them, one invocation after another."""

    def __init__(self, model: DualEncoder, feature_root: Path, batch_size: int = 64,
                 lr: float = 0.1, epochs: int = 10, val_proportion: float = 0.2, seed: int = 0):
        self.model, self.feature_root = model, feature_root
        self.batch_size, self.lr, self.epochs = batch_size, lr, epochs
        self.val_proportion, self.seed = val_proportion, seed

    # -- zero-shot ----------------------------------------------------------------------------
    @torch.no_grad()
    def zeroshot(self, data) -> dict:
        feats = encode_images(self.model, data.images, progress=False).embeddings
        weights = []
        for name in data.prompt_names:  # the classifier is built again for every run
            emb = self.model.encode_texts([t.format(name) for t in data.templates])
            weights.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0))
        return classification_metrics(feats @ torch.stack(weights, 1), data.labels)

    # -- linear probe -------------------------------------------------------------------------
    def _featurize(self, train, test) -> None:
        for split, data in (("train", train), ("test", test)):
            feats = encode_images(self.model, data.images, progress=False).embeddings
            torch.save(feats, self.feature_root / f"features_{split}.pt")
            torch.save(data.labels, self.feature_root / f"targets_{split}.pt")

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.load(self.feature_root / f"features_{split}.pt", weights_only=True),
                torch.load(self.feature_root / f"targets_{split}.pt", weights_only=True))

    def _loader(self, x, y, shuffle: bool) -> DataLoader:
        return DataLoader(FeatureDataset(x, y), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=0)

    def _train(self, loader: DataLoader, num_classes: int, weight_decay: float) -> torch.nn.Linear:
        with threads_for(loader.dataset.features.numel()):  # same thread rule as cliplab's
            return self._train_probe(loader, num_classes, weight_decay)

    def _train_probe(self, loader, num_classes: int, weight_decay: float) -> torch.nn.Linear:
        torch.manual_seed(self.seed)
        probe = torch.nn.Linear(loader.dataset[0][0].shape[0], num_classes)
        opt = torch.optim.AdamW(probe.parameters(), lr=self.lr, weight_decay=weight_decay)
        steps = self.epochs * len(loader)
        for epoch in range(self.epochs):
            for i, (x, y) in enumerate(loader):
                step = i + epoch * len(loader)  # cosine schedule, no warm-up
                for group in opt.param_groups:
                    group["lr"] = 0.5 * (1 + np.cos(np.pi * step / steps)) * self.lr
                opt.zero_grad()
                F.cross_entropy(probe(x), y).backward()
                opt.step()
        return probe

    @torch.no_grad()
    def _logits(self, probe, loader) -> tuple[torch.Tensor, torch.Tensor]:
        out, ys = [], []
        for x, y in loader:
            out.append(probe(x))
            ys.append(y)
        return torch.cat(out), torch.cat(ys)

    def _tune_weight_decay(self, train_loader, val_loader, num_classes: int) -> float:
        wd_list = np.logspace(-6, 2, num=97).tolist()
        coarse = np.logspace(-6, 2, num=7).tolist()

        def find_peak(idxs):
            best_idx, best_acc = 0, 0.0
            for idx in idxs:
                logits, y = self._logits(self._train(train_loader, num_classes, wd_list[idx]),
                                         val_loader)
                acc = (logits.argmax(1) == y).float().mean().item()
                if best_acc < acc:
                    best_idx, best_acc = idx, acc
            return best_idx

        peak = find_peak([i for i, v in enumerate(wd_list) if v in coarse])
        span = 8
        while span > 0:
            peak = find_peak([max(peak - span, 0), peak, min(peak + span, len(wd_list) - 1)])
            span //= 2
        return wd_list[peak]

    def linear_probe(self, train, test) -> dict:
        self._featurize(train, test)
        x, y = self._load("train")
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(len(y) * self.val_proportion))
        val, tr = perm[:n_val], perm[n_val:]
        num_classes = int(y.max()) + 1
        wd = self._tune_weight_decay(self._loader(x[tr], y[tr], True),
                                     self._loader(x[val], y[val], True), num_classes)
        probe = self._train(self._loader(x, y, True), num_classes, wd)  # train + val
        tx, ty = self._load("test")
        logits, target = self._logits(probe, self._loader(tx, ty, False))
        return {**classification_metrics(logits, target), "weight_decay": wd}

    # -- few-shot (features from feature_root, as CLIP_benchmark's fewshot_k runs) -----------
    def few_shot(self) -> dict:
        out = {}
        for k in SHOTS:
            accs = []
            for seed in SEEDS:
                x, y = self._load("train")
                tx, ty = self._load("test")
                idx = sample_k_shot(y, k, seed)
                accs.append(nearest_class_mean(x[idx], y[idx], tx, ty)["acc1"])
            t = torch.tensor(accs)
            out[f"ncm_{k}shot"] = {"acc1_mean": t.mean().item(),
                                   "acc1_std": t.std(unbiased=False).item(),
                                   "acc1_per_seed": accs}
        return out

    # -- retrieval ----------------------------------------------------------------------------
    @torch.no_grad()
    def retrieval(self, pairs, ks) -> dict:
        images_emb, texts_emb, text_image = [], [], []
        with evaluating(self.model):
            for start in range(0, len(pairs.images), self.batch_size):
                caps = pairs.captions[start:start + self.batch_size]
                pixels = self.model.preprocess(pairs.images[start:start + self.batch_size])
                images_emb.append(self.model.encode_image(pixels).float())
                tok = self.model.tokenize([c for cs in caps for c in cs])
                texts_emb.append(self.model.encode_text(**tok).float())
                text_image += [start + i for i, cs in enumerate(caps) for _ in cs]
        images, texts = torch.cat(images_emb), torch.cat(texts_emb)
        scores = texts @ images.t()
        positive = torch.zeros_like(scores, dtype=torch.bool)
        positive[torch.arange(len(scores)), torch.tensor(text_image)] = True
        metrics = {}
        for k in ks:
            metrics[f"image_retrieval_recall@{k}"] = (
                self._batched_recall(scores, positive, k) > 0).float().mean().item()
            metrics[f"text_retrieval_recall@{k}"] = (
                self._batched_recall(scores.T, positive.T, k) > 0).float().mean().item()
        return metrics

    def _batched_recall(self, scores, positive, k) -> torch.Tensor:
        out = []
        for start in range(0, len(scores), self.batch_size):
            s, p = scores[start:start + self.batch_size], positive[start:start + self.batch_size]
            top = torch.topk(s, k, dim=1)[1]
            onehot = F.one_hot(top, num_classes=s.shape[1])  # [b, k, n]
            true_pos = (onehot * p.view(len(s), 1, -1)).sum(dim=(1, 2))
            out.append(true_pos / p.sum(dim=1))
        return torch.cat(out)


def run_clip_benchmark_way(model: DualEncoder, spec: dict) -> tuple[dict, dict]:
    """(results by task name, seconds by task name) of the baseline."""
    zs, lp, fs, ret = spec["tasks"]
    results, seconds = {}, {}
    with tempfile.TemporaryDirectory() as root:
        way = ClipBenchmarkWay(model, Path(root))
        steps = {
            "zeroshot": lambda: way.zeroshot(load_source(zs["data"])),
            "linear_probe": lambda: way.linear_probe(load_source(lp["train"]),
                                                     load_source(lp["test"])),
            "few_shot": way.few_shot,
            "retrieval": lambda: way.retrieval(as_pairs(load_source(ret["data"])), ret["ks"]),
        }
        for name, step in steps.items():
            start = time.perf_counter()
            results[name] = step()
            seconds[name] = round(time.perf_counter() - start, 2)
    return results, seconds


def run_cliplab(model: DualEncoder, spec: dict) -> tuple[dict, dict]:
    """(results, seconds by task) of cliplab's suite with one shared cache."""
    results, seconds = {}, {}
    checked = suite_spec(spec)
    context = TaskContext(FeatureCache(), progress=False, precision=checked.precision,
                          probe_plan=plan_probes(checked.tasks))
    for name, task in zip(checked.task_names(), checked.tasks):  # run_suite's loop, timed
        start = time.perf_counter()
        results[name] = run_task(model, task, context)
        seconds[name] = round(time.perf_counter() - start, 2)
    return results, seconds


def compare(ours: dict, theirs: dict) -> dict:
    """Per task, over every metric both report: the largest absolute difference and whether it
    is within tolerance; for the linear probe (a different algorithm) whether cliplab's is at
    least as good as the baseline's on every metric, less ``PROBE_TOL``."""
    out = {}
    for task, metrics in theirs.items():
        diffs = [a - b for a, b in _numbers(ours[task], metrics)]
        if task == "linear_probe":
            out[task] = {"rule": f"cliplab >= clip_benchmark_way - {PROBE_TOL}",
                         "min_diff": min(diffs), "metrics": len(diffs),
                         "equal": min(diffs) >= -PROBE_TOL}
        else:
            worst = max(abs(d) for d in diffs)
            out[task] = {"rule": f"|cliplab - clip_benchmark_way| <= {EXACT_TOL}",
                         "max_abs_diff": worst, "metrics": len(diffs), "equal": worst <= EXACT_TOL}
    return out


def _numbers(a, b):
    if isinstance(b, dict):
        for key in b:
            if key in ("weight_decay",):  # the probes' own hyper-parameter, not a metric
                continue
            if key not in a:
                raise KeyError(f"cliplab's results lack {key!r}")
            yield from _numbers(a[key], b[key])
    elif isinstance(b, list):
        for x, y in zip(a, b, strict=True):
            yield from _numbers(x, y)
    elif not (isinstance(b, float) and math.isnan(b)):
        yield float(a), float(b)


def main(argv: list[str] | None = None) -> None:
    args = ARGS if ARGS is not None and argv is None else parse_args(argv)
    torch.manual_seed(0)
    model = load_model(args.model)
    spec = suite(args.n_train, args.n_test, args.precision)
    encode_images(model, load_source(spec["tasks"][0]["data"]).images[:200], progress=False)
    model.encode_texts(["warm up the text tower"])  # one-off start-up cost out of both timings

    theirs, their_s = run_clip_benchmark_way(model, spec)
    ours, our_s = run_cliplab(model, spec)
    total_ours, total_theirs = sum(our_s.values()), sum(their_s.values())
    checks = compare(ours, theirs)
    print(json.dumps({
        "benchmark": "eval_suite", "model": args.model, "precision": args.precision,
        "n_train": args.n_train, "n_test": args.n_test, "baseline": "clip_benchmark_way",
        "cliplab_s": round(total_ours, 2), "clip_benchmark_way_s": round(total_theirs, 2),
        "speedup": round(total_theirs / total_ours, 2),
        "metrics_equal": all(c["equal"] for c in checks.values()),
        "cliplab_task_s": our_s, "clip_benchmark_way_task_s": their_s, "checks": checks,
        "probe": {"cliplab_acc1": ours["linear_probe"]["acc1"],
                  "cliplab_l2": ours["linear_probe"]["l2"],
                  "clip_benchmark_way_acc1": theirs["linear_probe"]["acc1"],
                  "clip_benchmark_way_weight_decay": theirs["linear_probe"]["weight_decay"]},
    }))


if __name__ == "__main__":
    run_main(main)
