"""`cliplab serve`'s image routes: an indexed image as stored, and its thumbnail (revalidated
by an ETag that changes with the file). Ids only: no path is ever taken from a request. Each
takes its app's `SearchService` per request; an API key, if set, is checked before them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, Response

from cliplab.serve.image_files import THUMBNAIL_SIZES, fail, sniffed_type
from cliplab.serve.request_fields import MAX_ID
from cliplab.serve.search_service import SERVICE, SearchService


router = APIRouter()


# HEAD too: a link checker or proxy asks whether an image is there without fetching it
@router.get("/images/{id}")
@router.head("/images/{id}", include_in_schema=False)
def image(item_id: int = PathParam(..., le=MAX_ID, alias="id"),
          service: SearchService = SERVICE) -> Response:
    """An indexed image, read from its original file (ids only; no path is ever taken), as
    the image type its content is: a file that no longer holds an image (replaced, or a
    link pointed at a file of another kind) is a 404, not sent."""
    stored = service.stored_image(item_id)
    media_type = sniffed_type(stored if isinstance(stored, Path) else stored[0])
    if media_type is None:
        fail(404, f"the file of id {item_id} no longer holds an image")
    if isinstance(stored, Path):
        return FileResponse(stored, media_type=media_type)
    return Response(stored[0], media_type=media_type)


@router.get("/images/{id}/thumbnail")
@router.head("/images/{id}/thumbnail", include_in_schema=False)
def image_thumbnail(request: Request, item_id: int = PathParam(..., le=MAX_ID, alias="id"),
                    size: int = Query(256, ge=THUMBNAIL_SIZES[0], le=THUMBNAIL_SIZES[1],
                                      description="the longer side, in pixels"),
                    service: SearchService = SERVICE) -> Response:
    """An indexed image of at most ``size`` pixels a side, in a format every browser shows
    (`thumbnail`): what the page's cards show (a browser cannot show TIFF, and a 30 MB
    original for a 180 px card is waste). Its ETag changes with the image file, so a
    browser revalidates rather than decodes."""
    now = service.image_version(item_id)
    tag = f'"{hashlib.sha1(repr((now, size)).encode()).hexdigest()[:20]}"'
    cached = {"ETag": tag, "Cache-Control": "private, no-cache"}
    if none_match(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=cached)
    data, media_type = service.small_image(item_id, size, now)
    return Response(data, media_type=media_type, headers=cached)


def none_match(header: str | None, tag: str) -> bool:
    """Whether an If-None-Match header names ``tag``: by weak comparison (RFC 9110: a proxy
    that compresses marks the tag weak, ``W/"…"``), in a list, or ``*``."""
    if not header:
        return False
    named = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in named or tag.removeprefix("W/") in named
