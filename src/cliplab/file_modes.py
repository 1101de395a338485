"""Files and folders with the modes the user's umask gives.

safetensors (0.8) writes its files 0600 and ``tempfile.mkdtemp`` makes folders 0700: models,
adapters and exports came out readable by their owner only, so a serving account or a
colleague could not open them, unlike every other file a run writes."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask(path: str | Path) -> None:
    """Give ``path`` the mode a new file (0666) or folder (0777) gets under the umask."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, the file then given the umask's mode."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    as_umask(path)
