"""Run under ``torchrun --nproc-per-node 2`` as ``group_ends.py OUT plain|fsdp|own-group``.

``plain``, ``fsdp``: one ``run_pretrain``; each rank then writes how many threads it has to
``OUT/rank{R}.json``. ``own-group``: the script makes the process group, runs a plain and a
sharded ``run_pretrain`` in it, then sums its rank over the group; each rank writes whether
the group outlived each run and the sum.

A run that ends its process group joins gloo's worker threads. One whose group lives on (FSDP's
mesh kept it) leaves them running into the interpreter's exit, where one releasing a finished
collective's tensors aborts the process."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

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
    if kind == "own-group":
        dist.init_process_group("gloo")
        kept = []
        for name, sharded in (("plain", False), ("fsdp", True)):
            pretrain.run_pretrain({**RECIPE, "train": {**RECIPE["train"], "fsdp": sharded},
                                   "out": str(out / name)}, progress=False)
            kept.append(dist.is_initialized())
        total = torch.tensor(float(dist.get_rank()))
        dist.all_reduce(total)
        dist.destroy_process_group()
        report = {"kept": kept, "sum": total.item()}
    else:
        recipe = {**RECIPE, "train": {**RECIPE["train"], "fsdp": kind == "fsdp"},
                  "out": str(out)}
        pretrain.run_pretrain(recipe, progress=False)
        report = threads()
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
