"""The API key of `cliplab serve`: when set, it guards every ``/api`` and ``/images`` route, as
the ``X-API-Key`` header (``?api_key=`` only in image URLs, which an ``<img>`` cannot send a
header with); compared in constant time."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import Request

from cliplab.serve.image_files import fail


def key_checks(api_key: str | None) -> tuple[Callable[[Request], None],
                                             Callable[[Request], None]]:
    """The dependencies guarding the API routes (the header only) and the image routes (the
    header or ``?api_key=``); both let everything through when ``api_key`` is None."""

    def check(request: Request, in_url: bool) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        if not given and in_url:
            given = request.query_params.get("api_key") or ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            if not in_url and "api_key" in request.query_params:
                fail(401, "missing API key: ?api_key= works in image URLs only; send the key "
                      "as the X-API-Key header")
            fail(401, "missing or wrong API key: send it as the X-API-Key header "
                  "(or ?api_key= in image URLs)")

    def api_route(request: Request) -> None:
        check(request, in_url=False)

    def image_route(request: Request) -> None:
        """An ``<img src>`` cannot send a header: image URLs may carry ``?api_key=``."""
        check(request, in_url=True)

    return api_route, image_route
