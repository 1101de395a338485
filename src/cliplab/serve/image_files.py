"""Images through the server: uploads decoded (bounded in pixels, and in how many decode at
once) and fitted to the model's input, and small JPEG thumbnails of indexed images for the
page's cards."""

from __future__ import annotations

import io
import re
import threading
import warnings
from pathlib import Path

from PIL import Image
from starlette.exceptions import HTTPException

from cliplab.data.images import fit_to_model
from cliplab.models.preprocess import PreprocessConfig, convert_image

MAX_IMAGE_PIXELS = 50_000_000
# a 50-megapixel PNG of a few KB decodes to ~150 MB (RGB) and takes a second of CPU: more than
# two at once only queue for the two cores and the model anyway, and each held more memory
DECODES_AT_ONCE = 2
THUMBNAIL_SIZES = (64, 512)  # the smallest and largest side a thumbnail may be asked at
THUMBNAIL_QUALITY = 85

_decoding = threading.BoundedSemaphore(DECODES_AT_ONCE)


def fail(status: int, message: str):
    raise HTTPException(status_code=status, detail=message)


def read_upload(data: bytes, what: str = "file",
                model_input: PreprocessConfig | None = None) -> Image.Image:
    """An uploaded image upright in RGB, shrunk to what ``model_input``'s preprocessing makes of
    it (`fit_to_model`: the model sees the same pixels, the request holds its input rather than
    the file's); a JSON 4xx naming ``what`` for an empty, over-large or unreadable upload.
    At most `DECODES_AT_ONCE` uploads decode at a time."""
    if not data:
        fail(400, f"{what} is empty; upload an image (PNG, JPEG, WebP, ...)")
    with _decoding:
        image = _decode(data, what)
        return fit_to_model(image, model_input) if model_input is not None else image


def _decode(data: bytes, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():  # sizes are checked here, not by PIL's bomb guard
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    fail(413, f"{what} has {im.width}x{im.height} pixels, over {MAX_IMAGE_PIXELS}")
                return convert_image(im)
    except Image.DecompressionBombError as err:  # PIL's own limit, met before the size is known
        counted = re.search(r"\((\d+) pixels\)", str(err))  # "Image size (N pixels) exceeds"
        fail(413, f"{what} has {counted.group(1) + ' ' if counted else 'too many '}pixels, "
             f"over {MAX_IMAGE_PIXELS}")
    except (OSError, ValueError, SyntaxError, EOFError):
        fail(415, f"{what} is not an image PIL can read (PNG, JPEG, WebP, GIF, BMP, TIFF)")


def thumbnail_jpeg(source: bytes | Path, size: int) -> bytes:
    """``source`` (an image file or its bytes) as a JPEG at most ``size`` pixels on its longer
    side, upright and in RGB: any format PIL reads (TIFF, 16-bit PNG, CMYK, ...) becomes one a
    browser shows. JPEGs decode at a reduced scale (PIL's draft), so a camera photo costs a
    fraction of its full decode. Raises ``OSError``/``ValueError`` for an unreadable file."""
    with _decoding, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # an indexed image
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.draft(None, (size, size))  # JPEG only: decode at the smallest scale >= size
            image = convert_image(im)  # upright, 16-bit scaled (PIL cannot shrink 16-bit)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()
