"""Wall time of zero-shot + linear probe + few-shot + retrieval on one model and dataset:
cliplab's suite (one feature cache shared by the tasks) against the same tasks run one after
another the way CLIP_benchmark runs them, each recomputing its image features.

CLIP_benchmark itself cannot be installed here (it needs open_clip and torchvision, which do not
import beside the CPU torch), so the baseline is the equivalent loop: the same task code with a
fresh cache per task. Prints one JSON line with ``speedup`` and ``metrics_equal``.

    .venv/bin/python benchmarks/eval_suite.py [--model PATH_OR_PRESET] [--n-train 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.suite import run_suite, run_task
from cliplab.models import build_model


def suite(n_train: int, n_test: int) -> dict:
    train = {"source": "fashion-mnist", "split": "train", "limit": n_train}
    test = {"source": "fashion-mnist", "split": "test", "limit": n_test}
    return {"tasks": [
        {"name": "zeroshot", "task": "zeroshot", "data": test},
        {"name": "linear_probe", "task": "linear_probe", "train": train, "test": test,
         "features": "backbone", "l2": 1e-3},
        {"name": "few_shot", "task": "few_shot", "train": train, "test": test,
         "shots": [1, 4, 16], "seeds": [0, 1], "methods": ["ncm"]},
        {"name": "retrieval", "task": "retrieval", "data": test, "ks": [1, 5, 10]},
    ]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lit-minilm")
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-test", type=int, default=5000)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = build_model(args.model)
    spec = suite(args.n_train, args.n_test)

    start = time.perf_counter()
    ours = run_suite(model, spec, progress=False, cache=FeatureCache())
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    theirs = {t["name"]: run_task(model, t, progress=False, cache=FeatureCache())
              for t in spec["tasks"]}
    theirs_s = time.perf_counter() - start

    print(json.dumps({"benchmark": "eval_suite", "model": args.model, "tasks": len(spec["tasks"]),
                      "cliplab_s": round(ours_s, 2), "per_task_recompute_s": round(theirs_s, 2),
                      "speedup": round(theirs_s / ours_s, 2), "metrics_equal": ours == theirs}))


if __name__ == "__main__":
    main()
