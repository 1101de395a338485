"""Hand-written WebDataset tar files for tests: exact samples, including broken ones."""

import io
import tarfile

import numpy as np
from PIL import Image


def png_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8 [H, W, C]) encoded as PNG."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, samples) -> None:
    """A tar of ``[(key, {ext: bytes})]``: one member ``key.ext`` per part, in order."""
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
