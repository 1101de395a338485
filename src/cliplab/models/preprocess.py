"""Image preprocessing on whole batches of tensors: no torchvision, no per-image Python loop.

Inputs are uint8 images ``[B, H, W, C]`` (C = 1 or 3) or PIL images; outputs are normalised
float pixel values ``[B, 3, S, S]`` ready for any HF vision tower.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from cliplab.errors import InputError, ModelError, kind_of

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class AugmentConfig:
    """Random train-time augmentation: scale/translate/rotate jitter and horizontal flips."""

    scale: tuple[float, float] = (0.85, 1.1)
    translate: float = 0.1  # fraction of the image size
    rotate_deg: float = 10.0
    hflip: bool = True


@dataclass
class PreprocessConfig:
    """How a model wants its pixels: output size, normalisation, and train augmentation.

    ``resize_mode``: ``shortest`` (shorter side to ``image_size``, centre crop), ``squash``
    (both sides to ``image_size``) or ``longest`` (longer side to ``image_size``, padded with
    black), as OpenCLIP names them; ``interpolation``: ``bilinear`` or ``bicubic``."""

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    resize_mode: str = "shortest"
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "cliplab.json") -> "PreprocessConfig":
        """The config a ``to_dict`` record describes (``source``: the file it came from, named
        in the one-line `ModelError` a bad key or value gives)."""
        if not isinstance(d, dict):
            raise ModelError(f"{source}: 'preprocess' must be a JSON object, not "
                             f"{type(d).__name__}")
        d = {**_PREPROCESS_DEFAULTS, **d}
        for key in ("image_size", "mean", "std"):
            if key not in d:
                raise ModelError(f"{source}: preprocess.{key} is missing")
        for key, (valid, want) in _PREPROCESS_CHECKS.items():
            _check(valid(d[key]), source, f"preprocess.{key}", d[key], want)
        augment = d["augment"] if d.get("augment") is not None else {}
        _check(isinstance(augment, dict) and augment.keys() <= _AUGMENT_CHECKS.keys(), source,
               "preprocess.augment", augment, f"an object with keys {sorted(_AUGMENT_CHECKS)}")
        for key, value in augment.items():
            valid, want = _AUGMENT_CHECKS[key]
            _check(valid(value), source, f"preprocess.augment.{key}", value, want)
        aug = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in augment.items()})
        return cls(image_size=d["image_size"], mean=tuple(float(v) for v in d["mean"]),
                   std=tuple(float(v) for v in d["std"]), augment=aug,
                   resize_mode=d["resize_mode"], interpolation=d["interpolation"])


def is_finite_number(value) -> bool:
    """A finite int or float (not a bool: JSON's true is no number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def are_finite_numbers(value, n: int, positive: bool = False) -> bool:
    """A list or tuple of ``n`` finite numbers (each > 0 if ``positive``)."""
    return isinstance(value, (list, tuple)) and len(value) == n \
        and all(is_finite_number(v) and (v > 0 or not positive) for v in value)


def _check(ok: bool, source: str, key: str, value, want: str) -> None:
    if not ok:
        raise ModelError(f"{source}: {key} must be {want}, not {value!r}; correct it there")


RESIZE_MODES = ("shortest", "squash", "longest")
MAX_ENLARGED_ASPECT = 16  # longer side over shorter kept of an image enlarged (`enlarged_span`)
INTERPOLATIONS = ("bilinear", "bicubic")
# 2: PIL's geometry (long side truncated, antialiased, bicubic in two clamped passes);
# 3: an image over 16:1 that is enlarged keeps its central 16:1 part (`enlarged_span`);
# caches of image features should key on it: bump it whenever resizing changes pixels
RESIZE_VERSION = 3
# folders saved before these fields existed
_PREPROCESS_DEFAULTS = {"resize_mode": "shortest", "interpolation": "bilinear"}
_PREPROCESS_CHECKS = {
    "image_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                   "a positive whole number"),
    "mean": (lambda v: are_finite_numbers(v, 3), "3 numbers (R, G, B)"),
    "std": (lambda v: are_finite_numbers(v, 3, positive=True), "3 positive numbers (R, G, B)"),
    "resize_mode": (lambda v: v in RESIZE_MODES, " or ".join(map(repr, RESIZE_MODES))),
    "interpolation": (lambda v: v in INTERPOLATIONS, " or ".join(map(repr, INTERPOLATIONS))),
}
_AUGMENT_CHECKS = {
    "scale": (lambda v: are_finite_numbers(v, 2, positive=True) and v[0] <= v[1],
              "[low, high] with 0 < low <= high"),
    "translate": (lambda v: is_finite_number(v) and v >= 0, "a number >= 0"),
    "rotate_deg": (lambda v: is_finite_number(v) and v >= 0, "a number >= 0"),
    "hflip": (lambda v: isinstance(v, bool), "true or false"),
}


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
EXIF_ORIENTATION = 0x0112  # the TIFF/EXIF tag; 1 is upright, 2..8 a flip and/or turn


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (a phone photo taken sideways is stored
    sideways with a tag), as viewers and transformers' ``load_image`` show it; unchanged when
    untagged or when the tag cannot be read (orientation is metadata, not a reason to lose the
    image)."""
    try:
        if image.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
            return ImageOps.exif_transpose(image)
    except Exception:  # a corrupt EXIF block: PIL raises many types
        pass
    return image


def convert_image(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """``image`` upright (`upright`) in ``mode`` (``RGB`` or ``L``): 16-bit greyscale (PNG,
    TIFF) scaled to 8 bits, which PIL's own ``convert`` clips (a dark-to-light gradient came out
    nearly all white)."""
    image = upright(image)
    if image.mode in HIGH_DEPTH_MODES:
        array = np.asarray(image)  # uint16 or int32 (mode I): 2 or 4 bytes a pixel, not 8
        if image.mode != "I" or array.max() > 255:  # mode I holding 8-bit values stays as is
            array = array >> 8
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")
    return image.convert(mode)


CHANNELS = (1, 3, 4)  # the last axis of an [H, W, C] image: grey, RGB, RGBA


def as_image_batch(images):
    """``images`` as a batch, nothing copied: one PIL image is a list of one; one image as an
    array or tensor (``[H, W]``, or ``[H, W, C]`` with C 1, 3 or 4) a batch of one (a 3-D
    array with another last axis is a batch of greyscale images ``[B, H, W]``)."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (torch.Tensor, np.ndarray)) and (
            images.ndim == 2 or images.ndim == 3 and images.shape[-1] in CHANNELS):
        return images[None]
    return images


def checked_images(images, caller: str = ""):
    """``images`` as a batch (`as_image_batch`): an array, a tensor or a list of PIL images and
    arrays; anything else (a file path, a dataset) is one `InputError` saying what to pass."""
    images = as_image_batch(images)
    said = f"{caller}: " if caller else ""
    if not isinstance(images, (list, tuple, torch.Tensor, np.ndarray)):
        raise InputError(f"{said}expected images (PIL images or uint8 arrays), not "
                         f"{kind_of(images)}{_how_to_give(images)}")
    if isinstance(images, (list, tuple)):
        for i, image in enumerate(images):
            if not isinstance(image, (Image.Image, torch.Tensor, np.ndarray)):
                raise InputError(f"{said}images[{i}] is {kind_of(image)}, not a PIL image or a "
                                 f"uint8 array{_how_to_give(image)}")
    return images


def _how_to_give(value) -> str:
    if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        return " (open image files with PIL.Image.open)"
    return " (pass its .images)" if hasattr(value, "images") else ""


def to_uint8_batch(images) -> torch.Tensor:
    """Turn uint8 images — a tensor/array ``[B, H, W, C]`` or ``[B, H, W]``, one image
    (`as_image_batch`), a list of PIL images or arrays of one size — into a uint8 tensor
    ``[B, H, W, C]``. Floats and channels-first batches are an `InputError` saying how to
    convert them."""
    images = checked_images(images)
    if isinstance(images, (list, tuple)):
        arrays = [np.asarray(convert_image(im) if isinstance(im, Image.Image) else im)
                  for im in images]
        shapes = sorted({a.shape for a in arrays})
        if len(shapes) > 1:
            raise InputError(f"images of different sizes {shapes[:3]} do not make one batch; "
                             "cliplab.models.embed.embed_images resizes each first")
        images = np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        how = " (for floats in [0, 1]: (x * 255).round().to(torch.uint8))" \
            if images.is_floating_point() else ""
        raise InputError(f"expected uint8 images (0-255), got {images.dtype}{how}")
    if images.ndim == 3:
        images = images.unsqueeze(-1)
    if images.ndim != 4:
        raise InputError(f"expected images [B, H, W, C] (or one image [H, W, C]), got shape "
                         f"{tuple(images.shape)}")
    if images.shape[-1] not in CHANNELS:
        first = " (channels first: use x.permute(0, 2, 3, 1))" if images.shape[1] in CHANNELS \
            else ""
        raise InputError(f"expected images [B, H, W, C] with C 1, 3 or 4, got shape "
                         f"{tuple(images.shape)}{first}")
    return images


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, C]`` → float ``[B, C, H, W]`` in [0, 1] (grayscale stays one channel,
    an alpha channel is dropped)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return x[:, :3] if x.shape[1] == 4 else x


def as_rgb(x: torch.Tensor) -> torch.Tensor:
    """Float ``[B, 1 or 3, H, W]`` → ``[B, 3, H, W]``: grayscale repeated (a view)."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def to_float_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, C]`` → float ``[B, 3, H, W]`` in [0, 1]; grayscale is repeated to RGB."""
    return as_rgb(to_float(images))


def resize_center_crop(x: torch.Tensor, size: int, mode: str = "shortest",
                       interpolation: str = "bilinear") -> torch.Tensor:
    """A ``size`` square: the shorter side resized to ``size`` and the centre cropped
    (``mode="shortest"``); or both sides resized (``"squash"``); or the longer side resized and
    the rest padded with zeros (``"longest"``). Resized as PIL resizes (`resize_like_pil`), so
    as OpenCLIP's and transformers' processors do."""
    if mode not in RESIZE_MODES or interpolation not in INTERPOLATIONS:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES} and interpolation one of "
                         f"{INTERPOLATIONS}, not {mode!r} / {interpolation!r}")
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if mode == "shortest":
        rows, cols = enlarged_span(h, w, size)
        x = x[..., rows, cols]
        h, w = x.shape[-2:]
    nh, nw = (size, size) if mode == "squash" else keep_ratio_size(h, w, size, mode)
    x = resize_like_pil(x, (nh, nw), interpolation)
    if mode == "longest":
        top, left = (size - nh) // 2, (size - nw) // 2
        return F.pad(x, (left, size - nw - left, top, size - nh - top))
    top, left = (nh - size) // 2, (nw - size) // 2  # transformers' centre crop rounds down
    return x[..., top:top + size, left:left + size]


def enlarged_span(h: int, w: int, side: int) -> tuple[slice, slice]:
    """The rows and columns of an ``h`` x ``w`` image to keep before its shorter side is
    enlarged to ``side`` and its centre cropped: the central part at most
    `MAX_ENLARGED_ASPECT` times longer than wide (a 1 KB strip of 1,000,000 x 1 pixels was
    enlarged whole, to 16 million pixels a row, for the ``side`` x ``side`` centre kept; the
    crop moves that centre by under a pixel). All of any other image."""
    short, long = min(h, w), max(h, w)
    span = short * MAX_ENLARGED_ASPECT
    if short >= side or long <= span:
        return slice(None), slice(None)
    span += (long - span) % 2  # cut alike from both ends: an input pixel is many output ones
    cut = slice((long - span) // 2, (long - span) // 2 + span)
    return (cut, slice(None)) if h > w else (slice(None), cut)


def keep_ratio_size(h: int, w: int, size: int, mode: str) -> tuple[int, int]:
    """The resized ``(height, width)`` of an ``h`` x ``w`` image keeping its aspect ratio:
    shorter side ``size`` and the longer truncated (``"shortest"``: torchvision's
    ``Resize(size)``, which OpenCLIP uses, and transformers' ``shortest_edge``), or longer side
    ``size`` and the shorter rounded (``"longest"``: OpenCLIP's ``ResizeKeepRatio``)."""
    if mode == "shortest":
        return (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    scale = size / max(h, w)
    return min(size, round(h * scale)), min(size, round(w * scale))


def resize_like_pil(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Float images ``[B, C, H, W]`` resized to ``size`` as PIL's ``Image.resize`` does (within
    ~1/255, PIL's rounding to uint8): antialiased along each axis that shrinks; bicubic (PIL's
    a = -0.5 kernel) on the CPU by PIL itself (its two passes are rounded to uint8 between, in an
    order of its own choosing: up to 29/255 apart on a tall page of thin lines), elsewhere one
    axis at a time, width first unless the height shrinks while the width grows."""
    if interpolation == "bilinear":  # never overshoots: one separable call is PIL's two passes
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if x.device.type == "cpu" and x.shape[1] in (1, 3):
        return _pil_bicubic(x, size)
    h, w = x.shape[-2:]
    height_first = size[0] < h and size[1] > w
    # PIL clips each pass's overshoot to uint8 range; torch's antialias kernel is PIL's
    for step in ([(size[0], w), size] if height_first else [(h, size[1]), size]):
        if tuple(x.shape[-2:]) != tuple(step):
            x = F.interpolate(x, size=step, mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0, 1)
    return x


def _pil_bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`resize_like_pil`'s bicubic by PIL, image by image (the floats rounded to uint8 levels,
    which images made by `to_float` are)."""
    levels = x.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.empty((len(levels), size[0], size[1], levels.shape[-1]), dtype=np.uint8)
    for i, image in enumerate(levels):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        resized = np.asarray(pil.resize((size[1], size[0]), Image.Resampling.BICUBIC))
        out[i] = resized.reshape(out.shape[1:])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.dtype).div_(255.0)


def random_affine(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None,
                  fill: torch.Tensor | None = None) -> torch.Tensor:
    """Apply an independent random scale/translate/rotate/flip to each image of the batch.

    Done with one ``affine_grid`` + ``grid_sample`` call for the whole batch; pixels pulled from
    outside the image take ``fill`` (per channel, default 0).
    """
    b = x.shape[0]
    u = torch.rand(b, 5, generator=generator)
    lo, hi = cfg.scale
    scale = lo + (hi - lo) * u[:, 0]
    angle = (u[:, 1] * 2 - 1) * math.radians(cfg.rotate_deg)
    tx, ty = (u[:, 2] * 2 - 1) * 2 * cfg.translate, (u[:, 3] * 2 - 1) * 2 * cfg.translate
    flip = torch.where((u[:, 4] < 0.5) & cfg.hflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                         torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    if fill is None:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    fill = fill.view(1, -1, 1, 1).to(x)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + fill


class ImagePreprocessor:
    """Callable turning raw images into model pixel values, with optional train augmentation."""

    def __init__(self, config: PreprocessConfig):
        self.config = config

    def __call__(self, images, train: bool = False, generator: torch.Generator | None = None,
                 augment: AugmentConfig | None = None) -> torch.Tensor:
        """Pixel values; with ``train`` the random augmentation (``augment`` or the config's)."""
        # grayscale is resized and augmented as one channel and repeated to RGB last: the same
        # pixels for a third of the work
        x = to_float(to_uint8_batch(images))
        cfg = self.config
        x = resize_center_crop(x, cfg.image_size, cfg.resize_mode, cfg.interpolation)
        if train:
            # Fill with the border colour so augmented images keep their background.
            fill = x[:, :, 0, 0].median(dim=0).values
            x = random_affine(x, augment or self.config.augment, generator, fill=fill)
        x = as_rgb(x)
        # read from the config on every call, so an edited config takes effect
        mean = torch.tensor(self.config.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.config.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std
