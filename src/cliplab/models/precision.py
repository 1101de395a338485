"""Which precision a device trains and evaluates in: ``fp32``, ``bf16`` or ``auto`` (bf16 where
the hardware computes it natively, else fp32), and the autocast context that runs it.

On CPUs without bf16 units (no AVX512-BF16/AMX) PyTorch emulates bf16 matrix products, slower
than fp32: many times on AVX2 (one quickstart-sized product: 40 ms fp32 against 1.5 s bf16 on an
AVX2 EPYC), about twice on plain AVX-512 (Skylake, Cascade Lake); ``auto`` keeps such machines on
fp32.
"""

from __future__ import annotations

import contextlib
import platform
from typing import Literal, get_args

import torch

from cliplab.errors import warn

# a config's precision key (train.precision, an eval suite's precision)
Precision = Literal["fp32", "bf16", "auto"]
PRECISION_CHOICES = get_args(Precision)


def bf16_is_native(device: torch.device) -> bool:
    """True where bf16 matrix products run on hardware units: a CUDA GPU with bf16 (Ampere on),
    an x86 CPU with AVX512-BF16 or AMX, another CPU (ARM) whose bf16 oneDNN reports."""
    if device.type == "cuda":  # not pre-Ampere GPUs, where torch counts emulation as support
        named = torch.cuda.device(device.index) if device.index is not None else \
            contextlib.nullcontext()  # the GPU named (cuda:N), not the current one
        with named:
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        # oneDNN's own query says yes from plain AVX-512 on (Skylake, Cascade Lake), where it
        # emulates bf16 at twice fp32's time: ask for the units themselves
        return torch.backends.mkldnn.is_available() and bool(
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    # a build without oneDNN has no such query (and no bf16 units)
    return torch.backends.mkldnn.is_available() and \
        bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for ``precision`` on ``device``; an explicit ``bf16`` on hardware
    that only emulates it is kept, with a warning saying how much slower it will be."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, not {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_is_native(device) else "fp32"
    if precision == "bf16" and not bf16_is_native(device) and device.type not in _WARNED:
        _WARNED.add(device.type)  # once per process: training and eval each resolve it
        warn(f"precision bf16 on {device.type}: this device has no native bf16 units, "
             "so bf16 is emulated and much slower than fp32; use precision auto or "
             "fp32", stacklevel=2)
    return precision


_WARNED: set[str] = set()


def autocast(precision: str, device_type: str = "cpu"):
    """An autocast context for a resolved ``precision`` (``fp32``: plain float32, autocast
    disabled; ``bf16``: bfloat16 autocast)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16 once resolved, not {precision!r}")
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
