"""Peak memory and time of one forward + backward of the contrastive loss, side by side:
cliplab's plain and tiled losses (InfoNCE and SigLIP) against OpenCLIP's ``ClipLoss`` and
``SigLipLoss``, at batch sizes B (features D = 512, fp32, CPU).

Every configuration runs in its own subprocess: it allocates the features, resets the peak RSS
(``/proc/self/clear_refs``), runs forward + backward once and reports ``VmHWM - VmRSS`` (the
peak memory above the features, gradients included) and the wall time. OpenCLIP runs in its own
environment (``openclip_env.py`` builds it once under ~/.cache; skipped with a message if it
cannot). A configuration that would not fit in the free memory is skipped, not swapped.

Prints one JSON line per B: ``memory_ratio`` / ``time_ratio`` are cliplab tiled InfoNCE over
OpenCLIP ``ClipLoss``; ``siglip_memory_ratio`` / ``siglip_time_ratio`` tiled SigLIP over
``SigLipLoss``; ``configs`` holds every measurement (peak MiB, seconds, loss value).

    python benchmarks/loss_memory.py [--sizes 4096 16384 32768] [--tile 2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cli_args import make_parser, positive_float, positive_int  # noqa: E402
from cli_args import run_main  # noqa: E402

CLIPLAB_CONFIGS = ("cliplab-clip-plain", "cliplab-clip-tiled", "cliplab-siglip-plain",
                   "cliplab-siglip-tiled")
OPENCLIP_CONFIGS = ("openclip-ClipLoss", "openclip-SigLipLoss")
LOG_SCALE, BIAS = 2.6593, -10.0  # log(1/0.07) as CLIP starts; SigLIP's initial bias


# --- measuring one configuration (runs in a subprocess; stdlib + torch only at import) --------

def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _features(b: int, d: int):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_()
    return image, text


def _loss_fn(config: str, tile: int):
    """``f(image, text, log_scale, bias) -> loss`` for a configuration."""
    if config.startswith("openclip-"):
        from open_clip.loss import ClipLoss, SigLipLoss

        if config == "openclip-ClipLoss":
            loss = ClipLoss()
            return lambda i, t, s, b: loss(i, t, s.exp())
        loss = SigLipLoss()
        return lambda i, t, s, b: loss(i, t, s.exp(), b)
    from cliplab.train.contrastive import contrastive_loss

    kind = "siglip" if "siglip" in config else "clip"
    tiled = tile if config.endswith("tiled") else None
    return lambda i, t, s, b: contrastive_loss(i, t, s, b if kind == "siglip" else None,
                                               kind=kind, tile=tiled, gather=False)


def measure(config: str, b: int, d: int, tile: int, threads: int) -> dict:
    """Peak RSS above the allocated features, and seconds, of one forward + backward."""
    import torch

    torch.set_num_threads(threads)
    fn = _loss_fn(config, tile)
    warm = _features(64, d)  # first-call set-up (thread pools, kernels) outside the measure
    fn(*warm, torch.tensor(LOG_SCALE), torch.tensor(BIAS)).backward()
    image, text = _features(b, d)
    log_scale = torch.tensor(LOG_SCALE, requires_grad=True)
    bias = torch.tensor(BIAS, requires_grad=True)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = fn(image, text, log_scale, bias)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"peak_mib": round((peak - base) / 1024, 1), "seconds": round(seconds, 2),
            "loss": round(loss.item(), 5), "d_log_scale": round(log_scale.grad.item(), 6),
            "torch": torch.__version__}  # OpenCLIP's environment has its own build


# --- the driver -----------------------------------------------------------------------------

def _mem_available_gib() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+) kB", text).group(1)) / 2**20


def _expected_gib(config: str, b: int) -> float:
    """A generous guess of the peak, to skip what cannot fit instead of swapping or OOM."""
    if config.endswith("tiled"):
        return 0.5
    # B x B fp32 matrices alive at the peak, as measured at B = 16384: InfoNCE 4.1 (plain and
    # ClipLoss), SigLIP 5.3 (plain) / 5.0 (SigLipLoss): its +-1 label matrix adds one
    matrices = 5.4 if "siglip" in config.lower() else 4.1
    return matrices * b * b * 4 / 2**30


def run_config(python: str, config: str, b: int, args, env: dict) -> dict:
    need = _expected_gib(config, b)
    free = _mem_available_gib()
    if need > free - 0.5:
        return {"skipped": f"needs about {need:.1f} GiB, {free:.1f} GiB available"}
    cmd = [python, str(Path(__file__).resolve()), "--measure", config, "--sizes", str(b),
           "--dim", str(args.dim), "--tile", str(args.tile), "--threads", str(args.threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"took more than {args.timeout} s"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        return {"skipped": f"failed: {last[:200]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(a: dict, b: dict, key: str) -> float | None:
    if key in a and key in b and b[key] > 0:
        return round(a[key] / b[key], 4)
    return None


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[4096, 16384, 32768],
                        help="batch sizes B, one JSON line each")
    parser.add_argument("--dim", type=positive_int, default=512, help="feature dimension D")
    parser.add_argument("--tile", type=positive_int, default=2048,
                        help="tile of the tiled losses")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads per measurement (1: steady timings on a shared "
                        "machine, where OpenMP threads fight for cores)")
    parser.add_argument("--configs", nargs="+", default=list(CLIPLAB_CONFIGS + OPENCLIP_CONFIGS),
                        choices=CLIPLAB_CONFIGS + OPENCLIP_CONFIGS, metavar="CONFIG",
                        help="losses to measure (any of the default's)")
    parser.add_argument("--openclip-env", default=None,
                        help="OpenCLIP virtualenv (default: openclip_env.default_env_dir())")
    parser.add_argument("--no-openclip", action="store_true", help="skip the OpenCLIP columns")
    parser.add_argument("--timeout", type=positive_float, default=1800,
                        help="seconds per measurement")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:  # child: one configuration, one JSON line
        print(json.dumps(measure(args.measure, args.sizes[0], args.dim, args.tile, args.threads)))
        return

    import cliplab  # the parent's cliplab (e.g. a worktree on PYTHONPATH) is the one measured

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cliplab.__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    pythons = {c: sys.executable for c in CLIPLAB_CONFIGS}
    configs = list(args.configs)
    if args.no_openclip:
        configs = [c for c in configs if c not in OPENCLIP_CONFIGS]
        if not configs:  # a results line without a measurement in it
            parser.error("argument --configs: only OpenCLIP losses, and --no-openclip skips "
                         "them: nothing to measure")
    elif any(c in OPENCLIP_CONFIGS for c in configs):
        from openclip_env import openclip_python

        python = openclip_python(args.openclip_env)
        if python is None:
            configs = [c for c in configs if c not in OPENCLIP_CONFIGS]
            if not configs:
                parser.exit(1, f"{parser.prog}: error: no OpenCLIP environment, and --configs "
                            "asks only for OpenCLIP losses: nothing measured\n")
        else:
            pythons.update({c: str(python) for c in OPENCLIP_CONFIGS})
            env_oc = dict(env)
            env_oc.pop("PYTHONPATH")  # OpenCLIP's environment has its own torch

    for b in args.sizes:
        results = {}
        for config in configs:
            run_env = env_oc if config in OPENCLIP_CONFIGS else env
            results[config] = run_config(pythons[config], config, b, args, run_env)
            print(f"B={b} {config}: {results[config]}", file=sys.stderr, flush=True)
        row = {"benchmark": "loss_memory", "B": b, "D": args.dim, "tile": args.tile,
               "threads": args.threads}
        for prefix, ours, theirs in (("", "cliplab-clip-tiled", "openclip-ClipLoss"),
                                     ("siglip_", "cliplab-siglip-tiled", "openclip-SigLipLoss")):
            a, o = results.get(ours, {}), results.get(theirs, {})
            row[prefix + "memory_ratio"] = _ratio(a, o, "peak_mib")
            row[prefix + "time_ratio"] = _ratio(a, o, "seconds")
        row["configs"] = results
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    run_main(main)
