"""The one image decoder: bytes or a file → a uint8 ``[H, W, C]`` tensor, optionally resized.

Every source decodes through here, so a corrupt image means the same everywhere: an
``UnreadableImage`` that the source counts as a skipped sample (``unreadable_image``). Resizing
is bilinear (PIL) everywhere; sizes are ``(height, width)`` as in the tensors, or an int for a
square. ``encode_image`` is the inverse, for writing shards.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from cliplab.errors import CliplabWarning, DataError, warn
from cliplab.models.preprocess import (PreprocessConfig, convert_image, enlarged_span,
                                       keep_ratio_size)

# What an image is, by suffix: files in folders and the image part of a shard sample (the first
# of these a sample holds), so whatever a folder reader takes a curated shard keeps readable.
IMAGE_EXTS = ("jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "dib", "gif", "tif", "tiff",
              "ppm", "pgm", "pbm", "pnm", "jp2", "j2k", "avif")
# the PIL formats of IMAGE_EXTS: the only decoders cliplab lets a file reach, whatever its
# name (PIL would hand an EPS named .jpg to Ghostscript, and has decoders that fail unchecked)
# (AVIF only where this Pillow has its plugin, from 11.2: naming a format PIL lacks is a KeyError
# for every file the others refuse, not "cannot identify image")
Image.init()
READ_FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF", "PPM",
                                 "JPEG2000", "AVIF") if f in Image.OPEN)
ENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG"}
_BILINEAR = Image.Resampling.BILINEAR
_RESAMPLE = {"bilinear": _BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# the model whose input `decode_image` shrinks images to, within `decoding_for`
_MODEL_INPUT: ContextVar[PreprocessConfig | None] = ContextVar("model_input", default=None)
# within `deferred_decoding`: each deferred image, by its sample's key
_DEFERRED: ContextVar[dict[str, "DeferredImage"] | None] = ContextVar("deferred", default=None)
# within `noting_squares`: the side of each set of mixed sizes `stack_images` made squares of
_SQUARED: ContextVar[list[int] | None] = ContextVar("squared", default=None)
# what a deferred image holds until it is decoded
PLACEHOLDER = torch.zeros((1, 1, 3), dtype=torch.uint8)


class UnreadableImage(DataError):
    """Bytes or a file that PIL cannot decode; sources skip the sample and count it."""


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.array(image, dtype=np.uint8)
    return torch.from_numpy(array[..., None] if array.ndim == 2 else array)


def resized_to(image: Image.Image, size: int | Sequence[int]) -> Image.Image:
    """``image`` resized as `decode_image`'s ``size`` resizes it (bilinear, both sides)."""
    return _resized(image, _hw(size))


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    height, width = size
    return image if image.size == (width, height) else image.resize((width, height), _BILINEAR)


_WARNED_LARGE: set[str] = set()  # the images `open_image` warned of as over PIL's limit


class LargeImageWarning(Image.DecompressionBombWarning, CliplabWarning):
    """An image over PIL's decompression-bomb limit, decoded still, named (PIL's own warning,
    which the CLI hides, names no file); ignoring PIL's category, or cliplab's, ignores it."""


def hide_pils_unnamed_size_warning() -> None:
    """Ignore PIL's own warning of an image over its pixel limit (it names no file) where
    `LargeImageWarning` says it by name: in cliplab's command lines and worker processes."""
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit",
                            category=Image.DecompressionBombWarning)


def open_image(source: bytes | bytearray | str | os.PathLike,
               name: str | None = None) -> Image.Image:
    """PIL's lazy ``Image.open`` of a file or encoded bytes, limited to `READ_FORMATS` (an
    ``UnidentifiedImageError`` for any other format); use it as a context manager. An image
    over PIL's pixel limit is warned of by ``name`` (default: the file's path)."""
    bytes_given = isinstance(source, (bytes, bytearray))
    im = Image.open(io.BytesIO(source) if bytes_given else source, formats=READ_FORMATS)
    limit, pixels = Image.MAX_IMAGE_PIXELS, im.width * im.height
    shown = name or ("image bytes" if bytes_given else os.fspath(source))
    # once per image: a set opened for its size, then decoded, is one image to the user
    if limit and pixels > limit and shown not in _WARNED_LARGE:  # PIL refuses twice the limit
        if name or not bytes_given:  # unnamed bytes: each may be another image
            _WARNED_LARGE.add(shown)
        warnings.warn(f"{shown}: {im.width}x{im.height} pixels ({pixels / 1e6:.0f} megapixels), "
                      f"over PIL's decompression-bomb limit ({limit / 1e6:.0f} megapixels): "
                      "decoded all the same (over twice the limit an image is skipped as "
                      "unreadable_image)", LargeImageWarning)
    return im


def decode_image(source: bytes | str | os.PathLike, size: int | Sequence[int] | None = None,
                 channels: int | None = 3, name: str | None = None) -> torch.Tensor:
    """``source`` (encoded bytes or a file path) as uint8 ``[H, W, C]``.

    ``channels``: 3 gives RGB, 1 grayscale, None keeps grayscale files (PIL modes L and 1) as
    one channel and makes everything else RGB. ``size`` (an int or ``(height, width)``)
    resizes bilinearly when the image differs. Raises ``UnreadableImage`` for anything PIL
    cannot decode (a missing file too). ``name``: what messages call encoded bytes (a shard
    sample's key).
    """
    where = name or ("image bytes" if isinstance(source, (bytes, bytearray)) else str(source))
    try:
        with open_image(source, name) as im:
            mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if im.mode in ("L", "1") else "RGB")
            image = convert_image(im, mode)
    except Exception as err:  # PIL raises many types for corrupt files (OSError, SyntaxError, …)
        raise UnreadableImage(f"{where}: cannot decode the image ({type(err).__name__})") from None
    if size:
        return _to_tensor(resized_to(image, size))
    model_input = _MODEL_INPUT.get()
    return _to_tensor(fit_to_model(image, model_input) if model_input else image)


@contextmanager
def decoding_for(model_input: PreprocessConfig | None) -> Iterator[None]:
    """Within it, `decode_image` (without a ``size``) makes each image larger than the model's
    input exactly what the model's preprocessing makes of it (`fit_to_model`), so a set held in
    memory costs the model's input per image rather than the file's (a 500x375 photo kept
    0.6 MB, its 224 px input 0.15 MB) while the model sees the same pixels. None: no change."""
    token = _MODEL_INPUT.set(model_input)
    try:
        yield
    finally:
        _MODEL_INPUT.reset(token)


class DeferredImage(NamedTuple):
    """An image listed and not decoded: ``decode()`` decodes it (within the model input current
    when it was listed, `decoding_for`), raising `UnreadableImage` as decoding it then would
    have; ``name`` is how its loader's skip report names it if it does not decode."""

    decode: Callable[[], torch.Tensor]
    name: str
    model_input: PreprocessConfig | None = None  # what it is decoded for (`decoding_for`)
    path: str | None = None  # its file, when it has one (a listing's identity: `os.stat`)


@contextmanager
def deferred_decoding() -> Iterator[dict[str, DeferredImage]]:
    """Within it, loaders that gather image files with `ImageStack.add_file` list them without
    decoding any: each such image is a 1x1 `PLACEHOLDER`, and the dict yielded maps its
    sample's key to its `DeferredImage`. So a few-shot draw decodes the images it draws, not
    the whole set (`cliplab.data.listed`)."""
    decoders: dict[str, DeferredImage] = {}
    token = _DEFERRED.set(decoders)
    try:
        yield decoders
    finally:
        _DEFERRED.reset(token)


@contextmanager
def noting_squares() -> Iterator[list[int]]:
    """Within it, `stack_images` appends to the list yielded the side of each set of mixed
    sizes it makes squares of (its median shorter side), so a caller can bring other images
    to the frame the set is held in (`centre_square` at that side)."""
    sides: list[int] = []
    token = _SQUARED.set(sides)
    try:
        yield sides
    finally:
        _SQUARED.reset(token)


def _decode_for(model_input: PreprocessConfig | None, decode: Callable[[], torch.Tensor]
                ) -> torch.Tensor:
    with decoding_for(model_input):
        return decode()


def fit_to_model(image: Image.Image, model_input: PreprocessConfig,
                 enlarge: bool = False) -> Image.Image:
    """``image`` as ``model_input``'s resize makes it (``shortest``: the shorter side resized
    with its interpolation and the centre cropped, as `resize_center_crop` and transformers'
    processors do; ``squash``: both sides), when that shrinks it (with ``enlarge``, also when
    it enlarges it); an image the model would enlarge, or pad (``longest``), is returned as it
    is, to be resized with its batch (a very long one enlarged: its centre, `enlarged_span`,
    as the model's resize would cut it)."""
    side, mode = model_input.image_size, model_input.resize_mode
    width, height = image.size
    if mode == "shortest" and min(width, height) < side:  # to be enlarged: its centre only
        rows, cols = enlarged_span(height, width, side)
        if not rows == cols == slice(None):
            image = image.crop((cols.start or 0, rows.start or 0, cols.stop or width,
                                rows.stop or height))
            width, height = image.size
        if not enlarge:
            return image
    if mode not in ("shortest", "squash") or (min(width, height) < side and not enlarge) \
            or (width, height) == (side, side):
        return image
    resample = _RESAMPLE[model_input.interpolation]
    if mode == "squash":
        return image.resize((side, side), resample)
    new_h, new_w = keep_ratio_size(height, width, side, mode)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample)
    top, left = (new_h - side) // 2, (new_w - side) // 2  # as resize_center_crop rounds
    return image.crop((left, top, left + side, top + side))


def fits_each_image(model_input: PreprocessConfig | None) -> bool:
    """Whether `as_model_input` can make any image ``model_input``'s input alone: a model that
    resizes the shorter side or squashes (one that pads, ``longest``, is resized by batch)."""
    return model_input is not None and model_input.resize_mode in ("shortest", "squash")


def as_model_input(image: torch.Tensor, model_input: PreprocessConfig) -> torch.Tensor:
    """A uint8 ``[H, W, C]`` image decoded within ``decoding_for(model_input)`` made that
    model's input as its preprocessing makes it of the file alone (`fit_to_model`, enlarging
    too), for a model that `fits_each_image`; one of the input's size is taken as it is."""
    side = model_input.image_size  # a file larger than the input was fitted when decoded
    if tuple(image.shape[:2]) == (side, side):
        return image
    return _to_tensor(fit_to_model(to_pil(image), model_input, enlarge=True))


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
    warning that says so. Within `decoding_for` a model that resizes the shorter side or
    squashes, each becomes that model's input as its preprocessing makes it of the file alone
    (no median, no warning: what the model would see of each)."""
    sizes = {tuple(im.shape[:2]) for im in images}
    model_input = _MODEL_INPUT.get()
    if len(sizes) > 1 and fits_each_image(model_input):
        images = [as_model_input(im, model_input) for im in images]
    elif len(sizes) > 1:
        side = int(np.median([min(im.shape[:2]) for im in images]))
        shown = ", ".join(f"{w}x{h}" for h, w in sorted(sizes)[:3])
        warn(f"{where}: {len(images)} images of {len(sizes)} sizes ({shown}"
             f"{', ...' if len(sizes) > 3 else ''}) are made {side}x{side} squares "
             f"(shorter side resized to {side} px, centre crop); give image_size: N "
             "to resize each to N x N instead", stacklevel=2)
        images = [centre_square(im, side) for im in images]
        noted = _SQUARED.get()
        if noted is not None:
            noted.append(side)
    if len({im.shape[-1] for im in images}) > 1:
        images = [im.expand(-1, -1, 3) if im.shape[-1] == 1 else im for im in images]
    return torch.stack(list(images))


class ImageStack:
    """Decoded images gathered straight into one ``[N, H, W, C]`` tensor allocated for
    ``capacity`` images (the files listed) while they share a shape, so a set is held once in
    memory (a list of images and its `torch.stack` held it twice); more images than
    ``capacity`` (a count not known up front) go to further blocks, joined at the end one
    block at a time, each freed once copied; an image of another shape turns it into a list
    that `stack_images` squares at the end."""

    def __init__(self, capacity: int):
        self.capacity = max(int(capacity), 1)
        self.buffer: torch.Tensor | None = None  # the block being filled
        self.count = 0  # images in ``buffer``
        self.blocks: list[torch.Tensor] = []  # the blocks filled before it
        self.images: list[torch.Tensor] | None = None  # once shapes differ

    def __len__(self) -> int:
        if self.images is not None:
            return len(self.images)
        return self.count + sum(len(block) for block in self.blocks)

    def append(self, image: torch.Tensor) -> None:
        """Add one uint8 ``[H, W, C]`` image."""
        if self.images is None and self.buffer is None:
            self.buffer = torch.empty((self.capacity, *image.shape), dtype=image.dtype)
        if self.images is None and image.shape != self.buffer.shape[1:]:
            self.images = [im for block in (*self.blocks, self.buffer[:self.count])
                           for im in block]
            self.buffer, self.blocks = None, []
        if self.images is not None:
            self.images.append(image)
            return
        if self.count == len(self.buffer):  # full: another block, of a quarter of those held
            size = max(1024, len(self) // 4)
            self.blocks.append(self.buffer)
            self.buffer, self.count = torch.empty((size, *image.shape), dtype=image.dtype), 0
        self.buffer[self.count] = image
        self.count += 1

    def add_file(self, key: str, decode: Callable[[], torch.Tensor], name: str | None = None,
                 path: str | os.PathLike | None = None) -> None:
        """Add the image ``decode()`` gives (raising `UnreadableImage` as it does), or, within
        `deferred_decoding`, a placeholder, its ``decode`` kept under the sample's ``key``
        (``name``: how the loader's skip report names the file, if not by ``key``; ``path``:
        the file it decodes)."""
        deferred = _DEFERRED.get()
        if deferred is None:
            self.append(decode())
            return
        model_input = _MODEL_INPUT.get()
        decode = functools.partial(_decode_for, model_input, decode)
        deferred[key] = DeferredImage(decode, key if name is None else name, model_input,
                                      None if path is None else os.fspath(path))
        self.append(PLACEHOLDER)

    def stacked(self, where: str = "images") -> torch.Tensor:
        """The images as one tensor (`stack_images` when their shapes differ; ``where`` names
        them in its warning)."""
        if self.images is not None:
            return stack_images(self.images, where)
        if self.buffer is None:
            raise ValueError(f"{where}: no image to stack")
        if self.blocks:
            self._join()
        # what skipped files left unused is given back, by a copy only when it is much
        room = len(self.buffer)
        return self.buffer if self.count == room else (
            self.buffer[:self.count] if self.count * 10 >= room * 9
            else self.buffer[:self.count].clone())

    def _join(self) -> None:
        """The blocks made one tensor, each block freed once copied: the set is held about
        once (plus a block) while they are joined, not twice (as `torch.cat` would hold it)."""
        blocks = [*self.blocks, self.buffer[:self.count]]
        self.blocks, self.buffer = [], None
        whole = torch.empty((sum(len(b) for b in blocks), *blocks[0].shape[1:]),
                            dtype=blocks[0].dtype)
        start = 0
        while blocks:
            block = blocks.pop(0)
            whole[start:start + len(block)] = block
            start += len(block)
            del block
        self.buffer, self.count = whole, start


def centre_square(image: torch.Tensor, side: int) -> torch.Tensor:
    """A uint8 ``[H, W, C]`` image with its shorter side resized (bilinear) to ``side`` and
    its centre ``side x side`` cut out (CLIP's eval resize, at ``side``)."""
    rows, cols = enlarged_span(*image.shape[:2], side)
    image = image[rows, cols]
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
