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

``--streamed-set train`` compares the training set instead: ``shots: 0`` (every image of the
folder trains linear-probe), ``data.train`` streamed (listed, then decoded and encoded 500 at a
time, its features kept: a method reading only features) against it decoded whole before
training (as adapt read all of a training set before, and as methods training on pixels
still do); ``data.test`` is the same folder, streamed in both modes (in the streamed mode
its features are the training set's, served by the cache).

    python benchmarks/adapt_memory.py [--images 10000] [--size 224] [--shots 4] [--repeats 3]
        [--streamed-set test|train] [--out FILE]
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


def measure(mode: str, folder: str, model: str, shots: int, streamed_set: str = "test"
            ) -> dict:
    """One adapt run on ``folder`` (run in a subprocess: its peak RSS is its own); the
    ``streamed_set`` (``test``, or ``train``: with ``shots`` 0) decoded whole in mode
    ``whole``."""
    import resource

    import cliplab.adapt.linear_probe as linear_probe
    from cliplab.adapt.run import run_adapt

    if streamed_set == "train":
        shots = 0
        if mode == "whole":  # as a method training on pixels holds it
            linear_probe.trains_on_features = lambda options: False
    elif mode == "whole":  # the test set held whole, as a method that scores it many times
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
            "zeroshot_acc1": results["zeroshot"]["acc1"], "test_size": results["test_size"],
            "train_size": results["train_size"]}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__)
    add_mode_arguments(parser)
    parser.add_argument("--shots", type=positive_int, default=4,
                        help="per class, to train (with --streamed-set test)")
    parser.add_argument("--streamed-set", choices=("test", "train"), default="test",
                        help="the set streamed in one mode and decoded whole in the other "
                             "(train: shots 0, every image trains)")
    args = parser.parse_args(argv)
    if args.measure:  # the subprocess of one mode
        print(json.dumps(measure(args.measure, args.folder, args.model, args.shots,
                                 args.streamed_set)))
        return {}
    shots = 0 if args.streamed_set == "train" else args.shots
    return compare_modes(__file__, args.images, args.size,
                         ["--shots", str(args.shots), "--streamed-set", args.streamed_set],
                         ("acc1", "zeroshot_acc1", "test_size", "train_size"),
                         {"shots": shots, "method": "linear-probe",
                          "streamed_set": args.streamed_set}, args.out, args.repeats)


if __name__ == "__main__":
    run_main(main)
