"""Distribution shifts applied to a dataset's images: ``shift: invert|noise:0.3|blur:1.5``.

Any source spec can carry ``shift`` (and ``shift_seed``); the images are transformed after
loading, into new tensors (the source files and the loaded tensors are never changed). Steps
join with ``+`` and apply left to right, e.g. ``invert+noise:0.1``:

- ``invert``: ``255 - x`` (inverted contrast: dark garments on a light background);
- ``noise:S``: add Gaussian noise of standard deviation ``S`` in units of the full range
  (``S * 255`` grey levels), rounded and clipped to 0..255; seeded by ``shift_seed`` (default 0);
- ``blur:S``: Gaussian blur of standard deviation ``S`` pixels (kernel radius ``ceil(3 S)``,
  reflected borders), per channel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cliplab.errors import ConfigError

SHIFTS = ("invert", "noise", "blur")


def invert(images: torch.Tensor) -> torch.Tensor:
    """``255 - x`` for uint8 images."""
    return 255 - images


def gaussian_noise(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """Add N(0, (std*255)^2) noise per pixel, round and clip to uint8."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=gen) * (std * 255.0)
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of standard deviation ``sigma`` over ``[-r, r]``, r = ceil(3σ)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)  # not x²/(2σ²): σ² of a tiny σ underflows to 0
    return (k / k.sum()).float()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of uint8 ``[N, H, W, C]`` images, reflected borders."""
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    n, h, w, c = images.shape
    x = images.permute(0, 3, 1, 2).reshape(n * c, 1, h, w).float()
    mode = "reflect" if min(h, w) > r else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    x = x.round().clamp(0, 255).to(torch.uint8)
    return x.reshape(n, c, h, w).permute(0, 2, 3, 1).contiguous()


def parse_shift(spec: str) -> list[tuple[str, float | None]]:
    """``"invert+noise:0.3"`` → ``[("invert", None), ("noise", 0.3)]``, with one-line errors."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"shift must be a string such as 'invert', 'noise:0.3' or 'blur:1.5', "
                          f"not {spec!r}")
    steps = []
    for part in spec.split("+"):
        name, _, arg = part.strip().partition(":")
        if name not in SHIFTS:
            raise ConfigError(f"unknown shift {name!r} in {spec!r}; choose from "
                              f"{', '.join(SHIFTS)} (join several with '+')")
        if name == "invert":
            if arg:
                raise ConfigError(f"shift 'invert' takes no value (got {part!r})")
            steps.append((name, None))
            continue
        try:
            value = float(arg)
        except ValueError:
            raise ConfigError(f"shift {name!r} needs a number, e.g. '{name}:0.5' "
                              f"(got {part!r})") from None
        if not math.isfinite(value) or value < 0 or (name == "blur" and value == 0):
            raise ConfigError(f"shift {part!r}: the value must be a finite positive number")
        steps.append((name, value))
    return steps


def apply_shift(images: torch.Tensor, spec: str, seed: int = 0) -> torch.Tensor:
    """New uint8 images with the shift ``spec`` applied (the input is left unchanged)."""
    out = images
    for name, value in parse_shift(spec):
        if name == "invert":
            out = invert(out)
        elif name == "noise":
            out = gaussian_noise(out, value, seed)
        else:
            out = gaussian_blur(out, value)
    return out.clone() if out is images else out
