"""Images through the server: uploads decoded (bounded in pixels, and in how many decode at
once) and fitted to the model's input, and thumbnails of indexed images, in a format every
browser shows, for the page's cards."""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from PIL import Image
from starlette.exceptions import HTTPException

from cliplab.data.collection import skip_message
from cliplab.data.images import READ_FORMATS, fit_to_model, open_image
from cliplab.models.preprocess import HIGH_DEPTH_MODES, PreprocessConfig, convert_image, upright
from cliplab.serve.middleware import RETRY_AFTER_S

MAX_IMAGE_PIXELS = 50_000_000
# a 50-megapixel PNG of a few KB decodes to ~150 MB (RGB) and takes a second of CPU: more than
# two at once only queue for the two cores and the model anyway, and each held more memory
DECODES_AT_ONCE = 2
THUMBNAIL_SIZES = (64, 512)  # the smallest and largest side a thumbnail may be asked at
THUMBNAIL_QUALITY = 85
BROWSER_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif",
                   "WEBP": "image/webp"}  # PIL's format name: what every browser shows
GREY_MODES = ("1", "L", *HIGH_DEPTH_MODES)  # one channel: resized alike before or after RGB
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "I")  # what PIL's Image.reduce takes

# requests decoding or waiting to: each holds one of the server's worker threads (40), which
# searches need too; past this many, a 503 rather than a queue that starves them
DECODES_IN_LINE = 12

_decoding = threading.BoundedSemaphore(DECODES_AT_ONCE)
_in_line = 0
_line_lock = threading.Lock()


@contextmanager
def decode_slot() -> Iterator[None]:
    """One of `DECODES_AT_ONCE` slots to decode an image in, waited for; a 503 (with
    Retry-After) when `DECODES_IN_LINE` requests are decoding or waiting already."""
    global _in_line
    with _line_lock:
        if _in_line >= DECODES_IN_LINE:
            fail(503, "the server is busy decoding other images; retry in a moment",
                 headers={"Retry-After": str(RETRY_AFTER_S)})
        _in_line += 1
    try:
        with _decoding:
            yield
    finally:
        with _line_lock:
            _in_line -= 1


def release_large_images_at_once() -> None:
    """Make Pillow allocate image memory in 64 MB blocks (16 MB by default) unless
    ``PILLOW_BLOCK_SIZE`` says otherwise. glibc serves blocks over 32 MB by mmap and gives them
    back when freed; 16 MB blocks raise its mmap threshold and then stay in the heap of the
    thread that decoded them: 8 uploads of 49 megapixels left a server at 1.7 GB instead of
    0.6 GB. Process-wide: for a long-running server."""
    if "PILLOW_BLOCK_SIZE" not in os.environ and hasattr(Image.core, "set_block_size"):
        Image.core.set_block_size(64 << 20)


def fail(status: int, message: str, headers: dict[str, str] | None = None) -> NoReturn:
    raise HTTPException(status_code=status, detail=message, headers=headers)


def read_upload(data: bytes, what: str = "file",
                model_input: PreprocessConfig | None = None) -> Image.Image:
    """An uploaded image upright in RGB, shrunk to what ``model_input``'s preprocessing makes of
    it (`fit_to_model`: the model sees the same pixels, the request holds its input rather than
    the file's); a JSON 4xx naming ``what`` for an empty, over-large or unreadable upload.
    At most `DECODES_AT_ONCE` uploads decode at a time (`decode_slot`)."""
    if not data:
        fail(400, f"{what} is empty; upload an image (PNG, JPEG, WebP, ...)")
    with decode_slot():
        image = _decode(data, what)
        if model_input is not None:  # a grey image shrunk before it is tripled (same pixels)
            image = fit_to_model(image, model_input)
        return image.convert("RGB")


def _decode(data: bytes, what: str) -> Image.Image:
    """The upload upright, grey ones in mode L (a third of RGB's memory), others in RGB."""
    fmt = None  # known once PIL has identified the file
    try:
        with warnings.catch_warnings():  # sizes are checked here, not by PIL's bomb guard
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = open_image(data)  # bytes in memory: no file to close
            fmt = im.format
            if im.width * im.height > MAX_IMAGE_PIXELS:
                fail(413, f"{what} has {im.width}x{im.height} pixels, over {MAX_IMAGE_PIXELS}")
            mode = "L" if im.mode in GREY_MODES else "RGB"
            if im.mode == mode:  # convert() would copy it whole: 150 MB for 50 megapixels
                im.load()
                return upright(im)
            return convert_image(im, mode)
    except Image.DecompressionBombError as err:  # PIL's own limit, met before the size is known
        counted = re.search(r"\((\d+) pixels\)", str(err))  # "Image size (N pixels) exceeds"
        fail(413, f"{what} has {counted.group(1) + ' ' if counted else 'too many '}pixels, "
             f"over {MAX_IMAGE_PIXELS}")
    except HTTPException:
        raise
    except Exception as err:  # PIL's decoders raise many types on odd files: each is unreadable
        if fmt is not None:  # a format cliplab reads, damaged (cut short, say)
            fail(400, f"{what} is a {fmt} image that cannot be decoded ({skip_message(err)})")
        avif = ", AVIF" if "AVIF" in READ_FORMATS else ""  # Pillow 11.2 on
        fail(415, f"{what} is not an image in a format cliplab reads (PNG, JPEG, WebP, GIF, BMP, "
             f"TIFF, PPM, JPEG 2000{avif})")


def sniffed_type(source: bytes | Path) -> str | None:
    """The media type of the image ``source`` holds, from its content (its header, not its
    name); None when it is no image in `READ_FORMATS`: what an indexed path holds now may not
    be what was indexed (a file replaced, or a link pointed elsewhere)."""
    try:
        with open_image(source) as im:
            # a camera's multi-picture JPEG is a JPEG to a browser (which knows no image/mpo)
            return "image/jpeg" if im.format == "MPO" else \
                Image.MIME.get(im.format or "", "application/octet-stream")
    except Exception:  # PIL's identification raises many types on odd files
        return None


def thumbnail(source: bytes | Path, size: int) -> tuple[bytes, str]:
    """``source`` (an image file or its bytes) at most ``size`` pixels on its longer side, as
    ``(bytes, media type)``: an upright PNG/JPEG/GIF/WebP within the size as it is (a 28 px PNG
    stays lossless), anything else as a JPEG shrunk to it, upright and in RGB, so any format
    PIL reads (TIFF, 16-bit PNG, CMYK, ...) becomes one a browser shows. JPEGs decode at a
    reduced scale (PIL's draft), so a camera photo costs a fraction of its full decode. Raises
    what PIL raises for an unreadable file (``OSError`` for a format outside `READ_FORMATS`)."""
    with decode_slot(), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # an indexed image
        with open_image(source) as im:
            shown_as_is = BROWSER_FORMATS.get(im.format or "")
            if shown_as_is and max(im.size) <= size and im.mode in ("RGB", "RGBA", "L", "P") \
                    and upright(im) is im:  # the file read whole only when sent whole
                return (source if isinstance(source, bytes) else Path(source).read_bytes(),
                        shown_as_is)
            im.draft(None, (size, size))  # JPEG only: decode at the smallest scale >= size
            factor = max(im.size) // (2 * size)
            # PIL's thumbnail shrinks by whole factors first as well: done before converting,
            # a large TIFF or PNG costs its decode, not full-size copies of it
            small = im.reduce(factor) if factor >= 2 and im.mode in REDUCIBLE_MODES else im
            image = convert_image(small)  # upright, 16-bit scaled (PIL cannot shrink 16-bit)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue(), "image/jpeg"
