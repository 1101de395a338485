"""`cliplab serve`'s image routes: an indexed image as stored, and its thumbnail (revalidated
by an ETag that changes with the file). Ids only: no path is ever taken from a request. Each
takes its app's `SearchService` per request; an API key, if set, is checked before them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, Response

from cliplab.serve.api_schema import IMAGE_RESPONSE, errors
from cliplab.serve.image_files import THUMBNAIL_SIZES, fail, sniffed_type
from cliplab.serve.request_fields import MAX_ID
from cliplab.serve.search_service import SERVICE, SearchService


router = APIRouter()


ID_PATH = PathParam(..., ge=0, le=MAX_ID, alias="id", description="an indexed image id")
NOT_FOUND = errors(404, 422)


# HEAD too: a link checker or proxy asks whether an image is there without fetching it
# (registered after GET, so a 405's Allow names GET: Starlette takes it from the path's first)
@router.head("/images/{id}", include_in_schema=False)
@router.get("/images/{id}", response_class=Response, responses={**IMAGE_RESPONSE, **NOT_FOUND})
def image(request: Request, item_id: int = ID_PATH,
          service: SearchService = SERVICE) -> Response:
    """An indexed image, read from its original file (ids only; no path is ever taken), as
    the image type its content is: a file that no longer holds an image (replaced, or a
    link pointed at a file of another kind) is a 404, not sent. Revalidated as a thumbnail
    is (`version_tag`), whether the image is a file or a shard's member."""
    tag = version_tag(service.image_version(item_id))
    cached = {"ETag": tag, "Cache-Control": "private, no-cache"}
    if none_match(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=cached)
    stored = service.stored_image(item_id)
    media_type = sniffed_type(stored if isinstance(stored, Path) else stored[0])
    if media_type is None:
        fail(404, f"the file of id {item_id} no longer holds an image")
    if isinstance(stored, Path):
        return FileResponse(stored, media_type=media_type, headers=cached)
    return Response(stored[0], media_type=media_type, headers=cached)


@router.head("/images/{id}/thumbnail", include_in_schema=False)
@router.get("/images/{id}/thumbnail", response_class=Response,
            responses={**IMAGE_RESPONSE, **errors(404, 422, 503)})
def image_thumbnail(request: Request, item_id: int = ID_PATH,
                    size: int = Query(256, ge=THUMBNAIL_SIZES[0], le=THUMBNAIL_SIZES[1],
                                      description="the longer side, in pixels"),
                    service: SearchService = SERVICE) -> Response:
    """An indexed image of at most ``size`` pixels a side, in a format every browser shows
    (`thumbnail`): what the page's cards show (a browser cannot show TIFF, and a 30 MB
    original for a 180 px card is waste). Its ETag changes with the image file, so a
    browser revalidates rather than decodes."""
    now = service.image_version(item_id)
    tag = version_tag(now, size)
    cached = {"ETag": tag, "Cache-Control": "private, no-cache"}
    if none_match(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=cached)
    data, media_type = service.small_image(item_id, size, now)
    return Response(data, media_type=media_type, headers=cached)


def version_tag(*version) -> str:
    """An ETag of what ``version`` names (`SearchService.image_version`, with a size)."""
    return f'"{hashlib.sha1(repr(version).encode()).hexdigest()[:20]}"'


def none_match(header: str | None, tag: str) -> bool:
    """Whether an If-None-Match header names ``tag``: by weak comparison (RFC 9110: a proxy
    that compresses marks the tag weak, ``W/"…"``), in a list, or ``*``."""
    if not header:
        return False
    named = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in named or tag.removeprefix("W/") in named
