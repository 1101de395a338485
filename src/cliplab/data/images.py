"""The one image decoder: bytes or a file → a uint8 ``[H, W, C]`` tensor, optionally resized.

Every source decodes through here, so a corrupt image means the same everywhere: an
``UnreadableImage`` that the source counts as a skipped sample (``unreadable_image``). Resizing
is bilinear (PIL) everywhere; sizes are ``(height, width)`` as in the tensors, or an int for a
square. ``encode_image`` is the inverse, for writing shards.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from cliplab.errors import DataError
from cliplab.models.preprocess import convert_image

# What an image is, by suffix: files in folders and the image part of a shard sample (the first
# of these a sample holds), so whatever a folder reader takes a curated shard keeps readable.
IMAGE_EXTS = ("jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "dib", "gif", "tif", "tiff",
              "ppm", "pgm", "pbm", "pnm", "jp2", "j2k", "avif")
ENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG"}
_BILINEAR = Image.Resampling.BILINEAR


class UnreadableImage(DataError):
    """Bytes or a file that PIL cannot decode; sources skip the sample and count it."""


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.array(image, dtype=np.uint8)
    return torch.from_numpy(array[..., None] if array.ndim == 2 else array)


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    height, width = size
    return image if image.size == (width, height) else image.resize((width, height), _BILINEAR)


def decode_image(source: bytes | str | os.PathLike, size: int | Sequence[int] | None = None,
                 channels: int | None = 3) -> torch.Tensor:
    """``source`` (encoded bytes or a file path) as uint8 ``[H, W, C]``.

    ``channels``: 3 gives RGB, 1 grayscale, None keeps grayscale files (PIL modes L and 1) as
    one channel and makes everything else RGB. ``size`` (an int or ``(height, width)``)
    resizes bilinearly when the image differs. Raises ``UnreadableImage`` for anything PIL
    cannot decode (a missing file too).
    """
    where = "image bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
            mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if im.mode in ("L", "1") else "RGB")
            image = convert_image(im, mode)
    except Exception as err:  # PIL raises many types for corrupt files (OSError, SyntaxError, …)
        raise UnreadableImage(f"{where}: cannot decode the image ({type(err).__name__})") from None
    return _to_tensor(_resized(image, _hw(size)) if size else image)


def to_pil(image: torch.Tensor | np.ndarray) -> Image.Image:
    """A uint8 ``[H, W, C]`` image (C = 1 or 3) as a PIL image (mode L or RGB)."""
    array = np.ascontiguousarray(image.numpy() if isinstance(image, torch.Tensor) else image)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def resize_image(image: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """A uint8 ``[H, W, C]`` image resized bilinearly to ``size`` (unchanged if already so)."""
    height, width = _hw(size)
    if tuple(image.shape[:2]) == (height, width):
        return image
    return _to_tensor(_resized(to_pil(image), (height, width)))


def stack_images(images: Sequence[torch.Tensor], where: str = "images") -> torch.Tensor:
    """``[N, H, W, C]`` of uint8 images; if some are grayscale and some colour, all become
    colour. Images of different sizes become squares the CLIP way, whatever their order: the
    shorter side resized (bilinear) to the median shorter side, then centre-cropped, so a
    model that resizes the shorter side and centre-crops (CLIP's and OpenCLIP's
    preprocessing) sees what it sees of each image alone (squashing each to one size, as
    before, distorted every image whose aspect differed); ``where`` names them in the
    warning that says so."""
    sizes = {tuple(im.shape[:2]) for im in images}
    if len(sizes) > 1:
        side = int(np.median([min(im.shape[:2]) for im in images]))
        shown = ", ".join(f"{w}x{h}" for h, w in sorted(sizes)[:3])
        warnings.warn(f"{where}: {len(images)} images of {len(sizes)} sizes ({shown}"
                      f"{', ...' if len(sizes) > 3 else ''}) are made {side}x{side} squares "
                      f"(shorter side resized to {side} px, centre crop); give image_size: N "
                      "to resize each to N x N instead", stacklevel=2)
        images = [centre_square(im, side) for im in images]
    if len({im.shape[-1] for im in images}) > 1:
        images = [im.expand(-1, -1, 3) if im.shape[-1] == 1 else im for im in images]
    return torch.stack(list(images))


def centre_square(image: torch.Tensor, side: int) -> torch.Tensor:
    """A uint8 ``[H, W, C]`` image with its shorter side resized (bilinear) to ``side`` and
    its centre ``side x side`` cut out (CLIP's eval resize, at ``side``)."""
    height, width = image.shape[:2]
    scale = side / min(height, width)
    h, w = max(side, round(height * scale)), max(side, round(width * scale))
    resized = resize_image(image, (h, w))
    top, left = (h - side) // 2, (w - side) // 2
    return resized[top:top + side, left:left + side].contiguous()


def encode_image(image: torch.Tensor, fmt: str = "jpg", quality: int = 95) -> bytes:
    """A uint8 ``[H, W, C]`` image (C = 1 or 3) as JPEG or PNG bytes (PNG is lossless)."""
    buf = io.BytesIO()
    options = {"quality": quality} if fmt == "jpg" else {}
    to_pil(image).save(buf, format=ENCODE_FORMATS[fmt], **options)
    return buf.getvalue()
