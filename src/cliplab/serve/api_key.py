"""The API key of `cliplab serve`: when set, it guards every ``/api`` and ``/images`` route, as
the ``X-API-Key`` header (``?api_key=`` only in image URLs, which an ``<img>`` cannot send a
header with); compared in constant time, and checked before a request's body is read (a client
without the key cannot make the server buffer uploads)."""

from __future__ import annotations

import secrets

from starlette.datastructures import Headers, QueryParams

from cliplab.serve.middleware import refuse, route_path, under

GUARDED, KEY_IN_URL = ("/api", "/images"), ("/images",)


def key_problem(api_key: str, headers: Headers, query: QueryParams, in_url: bool) -> str | None:
    """What is wrong with the key a request gives (None if it gives ``api_key``)."""
    given = headers.get("x-api-key") or ""
    if not given and in_url:
        given = query.get("api_key") or ""
    if secrets.compare_digest(given.encode(), api_key.encode()):
        return None
    if not in_url and "api_key" in query:
        return ("missing API key: ?api_key= works in image URLs only; send the key as the "
                "X-API-Key header")
    return "missing or wrong API key: send it as the X-API-Key header (or ?api_key= in image URLs)"


class ApiKeyCheck:
    """ASGI middleware: a JSON 401 for a request to a guarded route without ``api_key``."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        if under(path, GUARDED):
            problem = key_problem(self.api_key, Headers(scope=scope),
                                  QueryParams(scope.get("query_string", b"")),
                                  in_url=under(path, KEY_IN_URL))
            if problem:  # RFC 9110: a 401 names its scheme (as FastAPI's APIKeyHeader does)
                return await refuse(send, 401, problem, {"WWW-Authenticate": "APIKey"})
        return await self.app(scope, receive, send)
