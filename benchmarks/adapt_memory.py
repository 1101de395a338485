"""Peak memory of `cliplab adapt` scoring an image folder, side by side: ``data.test``
streamed (listed, then decoded and encoded 500 images at a time when scored, as adapt reads a
test folder or manifest) against the test set decoded whole before training (as adapt read it
before, and as WiSE-FT, whose sweep scores it once per α, still does).

The folder and the model are `eval_memory.py`'s (``--images`` Fashion-MNIST test images as
``--size`` px PNGs; a tiny-clip built for that input). Each mode runs in its own subprocess:
``linear-probe`` with ``--shots`` per class drawn from the same folder (only the drawn files
are decoded, in both modes), the zero-shot comparison on, fp32 on CPU; it reports its peak RSS
(``ru_maxrss``), wall time and accuracies, ``--repeats`` times: the medians and ranges are
reported, ``memory_ratio`` the medians' (streamed over whole). The accuracies must be equal.

    python benchmarks/adapt_memory.py [--images 10000] [--size 224] [--shots 4] [--repeats 3]
        [--out FILE]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cli_args import make_parser, positive_int  # noqa: E402
from cli_args import run_main  # noqa: E402
from eval_memory import add_mode_arguments, compare_modes  # noqa: E402


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
    add_mode_arguments(parser)
    parser.add_argument("--shots", type=positive_int, default=4, help="per class, to train")
    args = parser.parse_args(argv)
    if args.measure:  # the subprocess of one mode
        print(json.dumps(measure(args.measure, args.folder, args.model, args.shots)))
        return {}
    return compare_modes(__file__, args.images, args.size, ["--shots", str(args.shots)],
                         ("acc1", "zeroshot_acc1", "test_size"),
                         {"shots": args.shots, "method": "linear-probe"}, args.out,
                         args.repeats)


if __name__ == "__main__":
    run_main(main)
