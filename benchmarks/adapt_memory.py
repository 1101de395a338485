"""Peak memory of `cliplab adapt` scoring an image folder, side by side: ``data.test``
streamed (listed, then decoded and encoded 500 images at a time when scored, as adapt reads a
test folder or manifest) against the test set decoded whole before training (as adapt read it
before, and as WiSE-FT, whose sweep scores it once per α, still does).

The folder and the model are `eval_memory.py`'s (``--images`` Fashion-MNIST test images as
``--size`` px PNGs; a tiny-clip built for that input). Each mode runs in its own subprocess:
``linear-probe`` with ``--shots`` per class drawn from the same folder (only the drawn files
are decoded, in both modes), the zero-shot comparison on, fp32 on CPU; it reports its peak RSS
(``ru_maxrss``), wall time and accuracies; ``memory_ratio`` is streamed over whole. The
accuracies must be equal.

    python benchmarks/adapt_memory.py [--images 10000] [--size 224] [--shots 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cli_args import make_parser, positive_int  # noqa: E402
from cli_args import run_main  # noqa: E402
from eval_memory import make_folder, make_model  # noqa: E402

MODES = ("whole", "streamed")


def measure(mode: str, folder: str, model: str, shots: int) -> dict:
    """One adapt run on ``folder`` (run in a subprocess: its peak RSS is its own)."""
    import resource

    import cliplab.adapt.linear_probe as linear_probe
    from cliplab.adapt.run import run_adapt

    if mode == "whole":  # the test set held whole, as a method that scores it many times
        linear_probe.SCORED_WHOLE = True
    spec = {"source": "image-folder", "path": folder}
    cfg = {"method": "linear-probe", "model": model, "shots": shots,
           "data": {"train": spec, "test": spec}}
    start = time.perf_counter()
    results = run_adapt(cfg, progress=False, write=False)
    seconds = time.perf_counter() - start
    return {"mode": mode, "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                            / 1024, 1),
            "seconds": round(seconds, 2), "acc1": results["test"]["acc1"],
            "zeroshot_acc1": results["zeroshot"]["acc1"], "test_size": results["test_size"]}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__)
    parser.add_argument("--images", type=positive_int, default=10000,
                        help="images in the folder")
    parser.add_argument("--size", type=positive_int, default=224,
                        help="their side and the model's input, px")
    parser.add_argument("--shots", type=positive_int, default=4, help="per class, to train")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the result as JSON here")
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)  # the subprocess's
    parser.add_argument("--folder", help=argparse.SUPPRESS)  # the subprocess's
    parser.add_argument("--model", help=argparse.SUPPRESS)  # the subprocess's
    args = parser.parse_args(argv)
    if args.measure:  # the subprocess of one mode
        print(json.dumps(measure(args.measure, args.folder, args.model, args.shots)))
        return {}
    with tempfile.TemporaryDirectory(prefix="cliplab-adapt-memory-") as tmp:
        folder, model = Path(tmp) / "images", Path(tmp) / "model"
        make_folder(folder, args.images, args.size)
        make_model(model, args.size)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        runs = {}
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--measure", mode, "--folder",
                                  str(folder), "--model", str(model), "--shots",
                                  str(args.shots)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs[mode] = json.loads(out.strip().splitlines()[-1])
    same = ("acc1", "zeroshot_acc1", "test_size")
    if any(runs["whole"][key] != runs["streamed"][key] for key in same):
        raise SystemExit(f"adapt_memory: the modes disagree: {runs}")
    result = {"images": args.images, "size": args.size, "shots": args.shots,
              "method": "linear-probe",
              "pixels_mib": round(args.images * args.size ** 2 * 3 / 2 ** 20, 1),
              "memory_ratio": round(runs["streamed"]["peak_mib"] / runs["whole"]["peak_mib"],
                                    3),
              "runs": [runs[mode] for mode in MODES]}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    run_main(main)
