"""Images/s of the image tower: PyTorch fp32, PyTorch bf16, PyTorch int8 (dynamic), ONNX fp32 and
ONNX int8 (onnxruntime dynamic quantization), side by side in one run, one JSON line per row.

Sizes: ``vit-b32`` (224 px, patch 32, width 768, 12 layers, random weights: speed only) and
``quickstart`` (the quickstart's lit-minilm image tower: 28 px, patch 7, width 192, 4 layers).
Every row runs the same uint8 → embedding work minus preprocessing (pixels are made once), with
the same number of threads (``--threads``, default torch's), timed as the median of
``--repeats`` passes over ``--batches`` batches after a warm-up, the rows taking turns pass by
pass (``images_per_s_range``: the slowest and fastest pass). ``speedup`` is images/s over
PyTorch fp32 of the same size. Every row also says how it was made: ``batches``, ``repeats``,
the ``torch`` and ``onnxruntime`` versions, the ``cpu`` model and ``cpu_native_bf16``.

``--accuracy MODEL`` (a model folder or run folder of ``cliplab quickstart``) also reports
zero-shot top-1 on the Fashion-MNIST test split (all 10 classes, the quickstart's prompts) for
every timed variant of that model: PyTorch fp32, bf16 (where timed), dynamic int8 (both towers),
ONNX fp32 and ONNX int8.

    .venv/bin/python benchmarks/inference_speed.py [--sizes vit-b32 quickstart] [--accuracy RUN]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import check_model, make_parser, positive_int  # noqa: E402
from cli_args import require, run_main  # noqa: E402


def _preset(name: str, **options):
    from cliplab.models import presets  # imported on use: --help stays instant

    return getattr(presets, name)(**options)


SIZES = {
    "vit-b32": dict(batch=32, build=lambda: _preset(
        "tiny_clip", image_size=224, patch_size=32, width=768, layers=12, heads=12,
        text_width=96, text_layers=1, embed_dim=512, context_length=16)),
    "quickstart": dict(batch=256, build=lambda: _preset(
        "lit_minilm", image_size=28, patch_size=7, width=192, layers=4, heads=3)),
}


def _interleaved_rates(fns: list, pixels: list[torch.Tensor], repeats: int
                       ) -> list[list[float]]:
    """Images/s of each of ``fns`` in each of ``repeats`` passes over all ``pixels`` batches;
    the passes take turns (one pass of every row per repeat), so a machine that slows or speeds
    up during the run touches every row alike."""
    for fn in fns:
        fn(pixels[0])  # warm-up
    n = sum(len(p) for p in pixels)
    rates: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, row in zip(fns, rates):
            start = time.perf_counter()
            for p in pixels:
                fn(p)
            row.append(n / (time.perf_counter() - start))
    return rates


def speed_rows(size: str, batches: int, repeats: int, threads: int, tmp: Path) -> list[dict]:
    import torch

    from cliplab.models.onnx_encoder import load_onnx
    from cliplab.models.onnx_export import export_onnx
    from cliplab.models.precision import bf16_is_native

    spec = SIZES[size]
    model = spec["build"]().eval()
    s = model.preprocess_config.image_size
    gen = torch.Generator().manual_seed(0)
    pixels = [torch.randn(spec["batch"], 3, s, s, generator=gen) for _ in range(batches)]
    fp32_dir = export_onnx(model, tmp / f"{size}-fp32")
    int8_dir = export_onnx(model, tmp / f"{size}-int8", quantize="int8")
    onnx_fp32, onnx_int8 = load_onnx(fp32_dir, threads=threads), load_onnx(int8_dir, threads=threads)
    torch_int8 = torch.ao.quantization.quantize_dynamic(
        spec["build"]().eval(), {torch.nn.Linear}, dtype=torch.qint8)

    def pytorch(m, bf16=False):
        def run(p):
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                return m.encode_image(p)
        return run

    # emulated bf16 (CPUs without bf16 units) is tens of times slower: not worth timing
    bf16 = [("pytorch", "bf16", pytorch(model, True))] \
        if bf16_is_native(torch.device("cpu")) else []
    rows = [("pytorch", "fp32", pytorch(model)), *bf16,
            ("pytorch", "int8-dynamic", pytorch(torch_int8)),
            ("onnx", "fp32", onnx_fp32.encode_image), ("onnx", "int8", onnx_int8.encode_image)]
    passes = _interleaved_rates([fn for _, _, fn in rows], pixels, repeats)
    base = statistics.median(passes[0])
    import onnxruntime

    how = {"batches": batches, "repeats": repeats, "torch": torch.__version__,
           "onnxruntime": onnxruntime.__version__, "cpu": cpu_model(),
           "cpu_native_bf16": bf16_is_native(torch.device("cpu"))}  # how the row was made
    return [{"size": size, "runtime": runtime, "precision": precision, "batch": spec["batch"],
             "threads": threads, "images_per_s": round(statistics.median(rates), 1),
             "images_per_s_range": [round(min(rates), 1), round(max(rates), 1)],
             "speedup": round(statistics.median(rates) / base, 2), **how}
            for (runtime, precision, _), rates in zip(rows, passes)]


def cpu_model() -> str | None:
    """The CPU's model name (Linux's /proc/cpuinfo), None where it is not told."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return None


def accuracy_rows(model_path: str, tmp: Path) -> list[dict]:
    import torch

    from cliplab.data.fashion_mnist import load_fashion_mnist
    from cliplab.evaluate.features import encode_images
    from cliplab.evaluate.zeroshot import zeroshot_classifier, zeroshot_metrics
    from cliplab.models.onnx_encoder import load_onnx
    from cliplab.models.onnx_export import export_onnx
    from cliplab.models.precision import bf16_is_native
    from cliplab.models.resolve import load_model, resolve_model_path

    path = resolve_model_path(model_path)  # a run folder: its newest checkpoint
    model = load_model(str(path))
    test = load_fashion_mnist("test")
    # every timed row's runtime and precision (the PyTorch ones on both towers)
    variants = [("pytorch-fp32", model, "fp32")]
    if bf16_is_native(torch.device("cpu")):
        variants.append(("pytorch-bf16", model, "bf16"))
    variants += [("pytorch-int8-dynamic", torch.ao.quantization.quantize_dynamic(  # a copy
                      model, {torch.nn.Linear}, dtype=torch.qint8), "fp32"),
                 ("onnx-fp32", load_onnx(export_onnx(model, tmp / "acc-fp32")), "fp32"),
                 ("onnx-int8", load_onnx(export_onnx(model, tmp / "acc-int8", quantize="int8")),
                  "fp32")]
    rows = []
    for name, m, precision in variants:
        head = zeroshot_classifier(m, test.prompt_names, test.templates, precision=precision)
        feats = encode_images(m, test.images, progress=False, precision=precision)
        metrics = zeroshot_metrics(feats.embeddings, test.labels, head)
        rows.append({"accuracy": "fashion-mnist test, zero-shot all 10 classes",
                     "model": str(path), "variant": name,
                     "acc1": round(float(metrics["acc1"]), 4), "n": len(test.labels)})
    return rows


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES),
                        help="image towers to time")
    parser.add_argument("--batches", type=positive_int, default=4,
                        help="batches per timed pass")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed passes (the median is reported)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads of every runtime (default: torch's default)")
    parser.add_argument("--accuracy", metavar="MODEL_OR_RUN",
                        help="also report zero-shot top-1 of this model on Fashion-MNIST")
    args = parser.parse_args()
    require(parser, "onnx", "onnxscript", "onnxruntime")  # the export and its runtime
    if args.accuracy:  # before minutes of timing
        check_model(parser, "--accuracy", args.accuracy, presets=False)

    import torch

    if args.threads is None:
        args.threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for row in speed_rows(size, args.batches, args.repeats, args.threads, Path(tmp)):
                print(json.dumps(row), flush=True)
        if args.accuracy:
            for row in accuracy_rows(args.accuracy, Path(tmp)):
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    run_main(main)
