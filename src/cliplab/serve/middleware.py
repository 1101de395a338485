"""ASGI middleware of `cliplab serve`: bounded request bodies, browser hardening headers, and
the Host check that keeps a server on loopback out of reach of DNS rebinding. Refusals are
JSON ``{"error": ...}`` like every error of the API (Starlette's own host check answers in
plain text)."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# every response: no MIME sniffing (an image served as what it is), no framing (clickjacking)
HARDENING = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
             (b"referrer-policy", b"no-referrer"))
# the search page only: its own script and styles (inline), images from itself and blob:
# previews; /docs (Swagger UI from a CDN) keeps working without it
PAGE_POLICY = (b"content-security-policy",
               b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
               b"'unsafe-inline'; img-src 'self' blob: data:; frame-ancestors 'none'; "
               b"base-uri 'none'; form-action 'self'")


async def _refuse(send, status: int, message: str) -> None:
    await JSONResponse({"error": message}, status_code=status)({"type": "http"}, None, send)


class BodyLimit:
    """A request body over ``limit`` bytes gets a JSON 413 before the app sees it (the body is
    read in full first, so a chunked upload cannot slip past)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._too_large(send)
            body.append(chunk)
            more = message.get("more_body", False)
        data, sent = b"".join(body), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}

        return await self.app(scope, replay, send)

    async def _too_large(self, send):
        limit = f"{round(self.limit / (1 << 20), 3):g}"
        await _refuse(send, 413, f"request body over the {limit} MB limit of this server; "
                      "upload a smaller image")


class AllowedHosts:
    """Requests whose ``Host`` header names none of ``hosts`` (any port) get a JSON 400. On
    loopback this is what stops DNS rebinding: a page of another site whose name was made to
    resolve to 127.0.0.1 sends its own name as the Host, so it cannot read the API."""

    def __init__(self, app, hosts: Iterable[str]):
        self.app, self.hosts = app, {host.lower().strip("[]") for host in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        try:
            name = urlsplit(f"//{given}").hostname  # lower-cased, without port and brackets
        except ValueError:  # a malformed IPv6 literal
            name = None
        if name not in self.hosts:
            shown = ", ".join(sorted(self.hosts))
            return await _refuse(send, 400, f"Host {given[:100]!r} is not a name of this server "
                                 f"({shown}); to reach it by that name (through a reverse "
                                 "proxy), serve with --allow-host NAME")
        return await self.app(scope, receive, send)


class HardeningHeaders:
    """`HARDENING` on every response and `PAGE_POLICY` on the page (path ``/``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = [*HARDENING, *([PAGE_POLICY] if scope.get("path") == "/" else [])]

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            return await send(message)

        return await self.app(scope, receive, with_headers)
