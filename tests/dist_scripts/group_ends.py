"""Run under ``torchrun --nproc-per-node 2`` as ``group_ends.py OUT plain|fsdp``: one
``run_pretrain``; each rank then writes how many threads it has to ``OUT/rank{R}.json``.

A run that ends its process group joins gloo's worker threads. One whose group lives on (FSDP's
mesh kept it) leaves them running into the interpreter's exit, where one releasing a finished
collective's tensors aborts the process."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cliplab.train import pretrain

RECIPE = {"model": {"name": "tiny-clip", "options": {"image_size": 16, "patch_size": 8,
                                                     "width": 32, "layers": 1, "heads": 2,
                                                     "embed_dim": 16, "context_length": 48}},
          "data": {"train": {"source": "shapes", "n": 64, "seed": 0, "kinds": ["single"],
                             "image_size": 32}},
          "train": {"steps": 2, "batch_size": 32, "save_every": 1}}


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def main(out: Path, kind: str) -> None:
    recipe = {**RECIPE, "train": {**RECIPE["train"], "fsdp": kind == "fsdp"}, "out": str(out)}
    pretrain.run_pretrain(recipe, progress=False)
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(threads()))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
