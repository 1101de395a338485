"""Files and folders with the modes the user's umask gives.

safetensors (0.8) writes its files 0600 and ``tempfile.mkdtemp`` makes folders 0700: models,
adapters and exports came out readable by their owner only, so a serving account or a
colleague could not open them, unlike every other file a run writes."""

from __future__ import annotations

import os
import re
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
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:  # a refused write as the OSError it is, naming the file
        code = rust_os_error(err)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from err
    as_umask(path)


def rust_os_error(err: BaseException) -> int | None:
    """The errno a Rust library's error names in its text (safetensors' ``I/O error: No space
    left on device (os error 28)``, tokenizers' likewise), else None."""
    codes = re.findall(r"\(os error (\d+)\)", str(err))
    return int(codes[-1]) if codes else None
