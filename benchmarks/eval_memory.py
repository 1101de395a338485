"""Peak memory of a one-off evaluation of an image folder, side by side: the set streamed
(decoded and encoded 500 images at a time, as ``cliplab eval`` reads a set its tasks only
encode) against the set decoded whole before encoding (a context that holds its sets: how
``cliplab eval`` read every set before, and how a reader that stacks a set's pixels does).

The folder is made once from Fashion-MNIST's test split (``--images`` PNGs in class folders,
resized to ``--size`` px); the model is a tiny-clip preset built for ``--size`` px input, so the
set's pixels, not the model, dominate. Each mode runs in its own subprocess (a zeroshot task,
fp32, CPU) and reports its peak RSS (``ru_maxrss``), wall time and accuracy, ``--repeats``
times, the modes taking turns (a peak moves by ~10% from run to run): the medians and ranges
are reported, ``memory_ratio`` the medians' (streamed over whole). The accuracies must be
equal.

    python benchmarks/eval_memory.py [--images 10000] [--size 224] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cli_args import make_parser, positive_int  # noqa: E402
from cli_args import run_main  # noqa: E402

MODES = ("whole", "streamed")


def make_folder(root: Path, images: int, size: int) -> None:
    """``images`` Fashion-MNIST test images as ``size`` px PNGs in class folders."""
    from PIL import Image

    from cliplab.data.fashion_mnist import load_fashion_mnist

    data = load_fashion_mnist("test", limit=images)
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        folder = root / data.classnames[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.numpy().squeeze()).resize((size, size)).save(folder / f"{i}.png")


def make_model(folder: Path, size: int) -> None:
    """A small tiny-clip for ``size`` px input, saved as a model folder."""
    from cliplab.models import build_model

    build_model("tiny-clip", image_size=size, patch_size=32, width=64, layers=2, heads=2,
                embed_dim=64).save(folder)


def measure(mode: str, folder: str, model: str) -> dict:
    """One evaluation of ``folder`` (run in a subprocess: its peak RSS is its own)."""
    import resource

    from cliplab.evaluate.suite import run_suite
    from cliplab.evaluate.tasks import TaskContext

    suite = [{"name": "zs", "task": "zeroshot",
              "data": {"source": "image-folder", "path": folder}}]
    start = time.perf_counter()
    results = run_suite(model, suite, TaskContext(progress=False, hold=mode == "whole"))
    seconds = time.perf_counter() - start
    return {"mode": mode, "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                            / 1024, 1),
            "seconds": round(seconds, 2), "acc1": results["zs"]["acc1"],
            "n": results["zs"]["n"]}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__)
    add_mode_arguments(parser)
    args = parser.parse_args(argv)
    if args.measure:  # the subprocess of one mode
        print(json.dumps(measure(args.measure, args.folder, args.model)))
        return {}
    return compare_modes(__file__, args.images, args.size, [], ("acc1",), {}, args.out,
                         args.repeats)


def add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    """The folder's ``--images`` and ``--size``, ``--out``, and the hidden arguments of the
    subprocess measuring one mode (`compare_modes`)."""
    parser.add_argument("--images", type=positive_int, default=10000,
                        help="images in the folder")
    parser.add_argument("--size", type=positive_int, default=224,
                        help="their side and the model's input, px")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="runs of each mode (their median and range reported)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the result as JSON here")
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)  # the subprocess's
    parser.add_argument("--folder", help=argparse.SUPPRESS)  # the subprocess's
    parser.add_argument("--model", help=argparse.SUPPRESS)  # the subprocess's


def compare_modes(script: str, images: int, size: int, extra: list[str], same: tuple[str, ...],
                  fields: dict, out: Path | None, repeats: int = 3) -> dict:
    """Each of `MODES` measured ``repeats`` times, the modes taking turns, by ``script
    --measure MODE --folder F --model M *extra`` in its own process (its peak RSS its own), on
    a folder of ``images`` PNGs and a model made for ``size`` px; every run must agree on
    ``same``. Per mode the median peak and time and their ranges (a peak moves by ~10% from
    run to run); ``memory_ratio``: the medians' (streamed over whole). The result (``fields``
    after the folder's size) printed as one JSON line, and written to ``out`` if given."""
    with tempfile.TemporaryDirectory(prefix="cliplab-memory-") as tmp:
        folder, model = Path(tmp) / "images", Path(tmp) / "model"
        make_folder(folder, images, size)
        make_model(model, size)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(repeats):
            for mode in MODES:
                printed = subprocess.run([sys.executable, script, "--measure", mode, "--folder",
                                          str(folder), "--model", str(model), *extra],
                                         env=env, check=True, capture_output=True,
                                         text=True).stdout
                runs[mode].append(json.loads(printed.strip().splitlines()[-1]))
    first = runs[MODES[0]][0]
    if any(run[key] != first[key] for mode in MODES for run in runs[mode] for key in same):
        raise SystemExit(f"{Path(script).stem}: the runs disagree: {runs}")
    summary = {mode: _summary(runs[mode]) for mode in MODES}
    result = {"images": images, "size": size, **fields, "repeats": repeats,
              "pixels_mib": round(images * size ** 2 * 3 / 2 ** 20, 1),
              "memory_ratio": round(summary["streamed"]["peak_mib"] /
                                    summary["whole"]["peak_mib"], 3),
              "runs": list(summary.values())}
    print(json.dumps(result))
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _summary(runs: list[dict]) -> dict:
    """One mode's runs as the first's record with the median ``peak_mib`` and ``seconds``,
    and their ranges (``*_range``: min, max)."""
    record = dict(runs[0])
    for key in ("peak_mib", "seconds"):
        values = sorted(run[key] for run in runs)
        record[key] = round(statistics.median(values), 2)
        record[f"{key}_range"] = [values[0], values[-1]]
    return record


if __name__ == "__main__":
    run_main(main)
