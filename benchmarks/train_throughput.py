"""Images/s of a contrastive training step, cliplab vs OpenCLIP, same architecture, one run.

Architecture (issue 3): ViT image 64 px, patch 8, width 256, 6 layers; text width 256, 6 layers,
context 32; embed 256; batch 128; GELU MLPs on both sides (OpenCLIP's default for models built
from scratch; same parameter count, printed). cliplab runs its real `Trainer` (uint8 images →
preprocessing → both towers → loss → AdamW step); OpenCLIP runs `CLIP` + `ClipLoss` + AdamW on
ready tensors (its data loader's work is not counted), in a separate environment that
`benchmarks/openclip_env.py` creates (OpenCLIP needs torchvision, which does not import beside
this machine's CPU torch). Prints one JSON line per precision with ``ratio`` = cliplab / OpenCLIP,
and with ``--profile`` the ops where cliplab's step spends its time.

    .venv/bin/python benchmarks/train_throughput.py [--precision fp32 bf16] [--steps 8]
        [--repeats 3] [--profile]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cliplab.data.types import ImageTextPairs

sys.path.insert(0, str(Path(__file__).parent))
from cli_args import make_parser, positive_int  # noqa: E402
from cli_args import run_main  # noqa: E402
from openclip_env import openclip_python  # noqa: E402

# torch and cliplab are imported where used: --help and a bad value answer at once
ARCH = dict(image_size=64, patch_size=8, width=256, layers=6, heads=4, text_width=256,
            text_layers=6, embed_dim=256, context_length=32, batch_size=128)


def synthetic_pairs(n: int, seed: int = 0) -> ImageTextPairs:
    """Random 64 px images with distinct captions long enough to fill the 32-token context."""
    import torch

    from cliplab.data.types import ImageTextPairs

    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, ARCH["image_size"], ARCH["image_size"], 3),
                           dtype=torch.uint8, generator=gen)
    captions = [[f"a photo of object number {i:05d} on a plain background"] for i in range(n)]
    return ImageTextPairs(images, captions)


def cliplab_throughput(precision: str, warmup: int, steps: int, profile: bool) -> dict:
    from cliplab.models import build_model
    from cliplab.runs import RunDir
    from cliplab.train.trainer import TrainConfig, Trainer

    arch = {k: v for k, v in ARCH.items() if k != "batch_size"}
    model = build_model("tiny-clip", activation="gelu", **arch)  # OpenCLIP's default MLP
    b = ARCH["batch_size"]
    pairs = synthetic_pairs(b * (warmup + steps))
    cfg = TrainConfig.from_dict(dict(steps=warmup + steps, batch_size=b, lr=1e-4, warmup=0,
                                     augment=False, multi_positive=False, precision=precision,
                                     log_every=1, progress=False, device="cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp, tensorboard=False)  # as the OpenCLIP side: no event files
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                Trainer(model, cfg, run).fit(pairs)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            print(table, file=sys.stderr)
        else:
            Trainer(model, cfg, run).fit(pairs)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").open()]
    t = {r["step"]: r["time_s"] for r in records}
    return {"images_per_s": b * steps / (t[warmup + steps] - t[warmup]),
            "params": sum(p.numel() for p in model.parameters())}


def openclip_throughput(python: Path, precision: str, warmup: int, steps: int) -> dict:
    import torch

    from cliplab.models.tokenizer import byte_level_tokenizer
    args = {**ARCH, "precision": precision, "warmup": warmup, "steps": steps,
            "threads": torch.get_num_threads(),
            "vocab_size": len(byte_level_tokenizer(ARCH["context_length"]))}
    script = Path(__file__).parent / "openclip_train_step.py"
    out = subprocess.run([str(python), str(script), json.dumps(args)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16"], help="precisions, one JSON line each")
    parser.add_argument("--warmup", type=positive_int, default=2,
                        help="steps before the timed ones (at least 1: timing starts after it)")
    parser.add_argument("--steps", type=positive_int, default=8, help="timed steps per run")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="alternate the two sides this many times and report medians "
                        "(a shared machine's load swings single runs by 2x)")
    parser.add_argument("--profile", action="store_true",
                        help="print cliplab's top ops (torch profiler) to stderr, from one "
                        "extra run that is not timed")
    parser.add_argument("--no-openclip", action="store_true",
                        help="cliplab's side only (no OpenCLIP environment is built)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    # None (with the reason on stderr) if it cannot be built
    python = None if args.no_openclip else openclip_python()
    for precision in args.precision:
        if args.profile:  # its own run: the profiler's overhead stays out of the timing
            cliplab_throughput(precision, args.warmup, args.steps, True)
        mine, peer = [], []
        for i in range(args.repeats):
            # the sides swap order every repeat: a drifting machine's load hits both alike
            first_mine = i % 2 == 0 or python is None
            if first_mine:
                mine.append(cliplab_throughput(precision, args.warmup, args.steps, False))
            if python is not None:
                peer.append(openclip_throughput(python, precision, args.warmup, args.steps))
            if not first_mine:
                mine.append(cliplab_throughput(precision, args.warmup, args.steps, False))
        ours = statistics.median(m["images_per_s"] for m in mine)
        line = {"precision": precision, "batch": ARCH["batch_size"], "repeats": args.repeats,
                "cliplab_images_per_s": round(ours, 2),
                "cliplab_runs": [round(m["images_per_s"], 1) for m in mine],
                "cliplab_params": mine[0]["params"], "cliplab_torch": torch.__version__}
        if python is None:
            line["openclip"] = "skipped (--no-openclip)" if args.no_openclip else \
                "skipped (see stderr)"
        else:
            theirs = statistics.median(p["images_per_s"] for p in peer)
            line.update(openclip_images_per_s=round(theirs, 2),
                        openclip_runs=[round(p["images_per_s"], 1) for p in peer],
                        openclip_params=peer[0]["params"], openclip_torch=peer[0]["torch"],
                        ratio=round(ours / theirs, 3))
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    run_main(main)
