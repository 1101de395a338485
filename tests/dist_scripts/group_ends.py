"""Run under ``torchrun --nproc-per-node 2`` as ``group_ends.py OUT MODE RECIPE.yaml...``.

``threads``: each recipe's ``run_pretrain``; each rank then writes how many threads it has to
``OUT/rank{R}.json``. ``own-group``: the script makes the process group, runs each recipe in it,
then sums its rank over the group; each rank writes whether the group outlived each run and the
sum.

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

from cliplab.config import load_yaml
from cliplab.train import pretrain


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def main(out: Path, mode: str, recipes: list[str]) -> None:
    if mode == "own-group":
        dist.init_process_group("gloo")
    kept = []
    for recipe in recipes:
        pretrain.run_pretrain(load_yaml(recipe), progress=False)
        kept.append(dist.is_initialized())
    if mode == "own-group":
        total = torch.tensor(float(dist.get_rank()))
        dist.all_reduce(total)
        dist.destroy_process_group()
        report = {"kept": kept, "sum": total.item()}
    else:
        report = threads()
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
