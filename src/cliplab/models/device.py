"""Where a model runs: the ``device`` of every stage (``train.device``; ``device`` of eval,
adapt, merge, curate, index and serve), ``auto`` meaning the GPU when this machine has one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

import torch
from pydantic import AfterValidator

DEVICE_CHOICES = "cpu, cuda, cuda:N, mps or auto"


def resolve_device(name: str | torch.device) -> torch.device:
    """``name`` as a torch device (``auto``: CUDA when there is one, else the CPU; Apple's
    ``mps`` only when named); a ValueError for a name torch does not know or a device this
    machine lacks."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{str(name)!r} is no device ({DEVICE_CHOICES})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{str(name)!r}, but this PyTorch sees no CUDA device; use cpu or "
                             "auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{str(name)!r}, but this machine has {torch.cuda.device_count()} "
                             f"GPU(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{str(name)!r}, but this machine has no MPS device; use cpu or auto")
    return device


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """The block's random draws from ``seed`` (the CPU's generator, and ``device``'s if it is a
    GPU); the caller's generators as they were after it (a library does not reseed them)."""
    device = torch.device(device) if device is not None else None
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        # only the generators forked (torch.manual_seed would reseed every GPU's and MPS's)
        torch.random.default_generator.manual_seed(seed)
        for index in gpus:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _known_device(name: str) -> str:
    resolve_device(name)
    return name


# a config's device key: the name as given (``auto`` is resolved where the model is loaded)
Device = Annotated[str, AfterValidator(_known_device)]
