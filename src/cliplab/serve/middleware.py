"""ASGI middleware of `cliplab serve`: bounded request bodies, browser hardening headers, and
the Host check that keeps a server on loopback out of reach of DNS rebinding. Refusals are
JSON ``{"error": ...}`` like every error of the API (Starlette's own host check answers in
plain text)."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

import anyio
from fastapi.responses import JSONResponse

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
BODIES_AT_ONCE = 8  # request bodies of the largest size held at once, before a 503
BODY_TIMEOUT_S = 120.0  # a 10 MB upload over a 1 Mbit/s link takes 80 s
RETRY_AFTER_S = 2
BODY_METHODS = ("POST", "PUT", "PATCH")
# every response: no MIME sniffing (an image served as what it is), no framing (clickjacking)
HARDENING = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
             (b"referrer-policy", b"no-referrer"))
# the search page only: its own script and styles (inline), images from itself and blob:
# previews; /docs (Swagger UI from a CDN) keeps working without it
PAGE_POLICY = (b"content-security-policy",
               b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
               b"'unsafe-inline'; img-src 'self' blob: data:; frame-ancestors 'none'; "
               b"base-uri 'none'; form-action 'self'")


def route_path(scope) -> str:
    """The path routing sees: ``root_path`` taken off where a ``/`` follows it, as Starlette's
    router does (a guard that strips it otherwise checks another path than is served)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root):] if path[len(root)] == "/" else path


def under(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``path`` is one of ``prefixes`` or lies below one."""
    return any(path == prefix or path.startswith(prefix + "/") for prefix in prefixes)


async def refuse(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer with a JSON error before the app sees the request."""
    await JSONResponse({"error": message}, status_code=status, headers=headers)(
        {"type": "http"}, None, send)


class BodyLimit:
    """The body of a request that sends one to the API (``POST``/``PUT``/``PATCH`` under
    ``/api``, after the key check; nothing else reads a body, so none is read there) is read in
    full before the app sees it, so a chunked upload cannot slip past: over ``limit`` bytes it
    gets a JSON 413. The bytes held at once are bounded too: a chunk that takes them past
    ``bodies_at_once`` x ``limit`` gets its request a 503 (forty stalled uploads held 320 MB),
    and a body not received within ``timeout_s`` a 408."""

    def __init__(self, app, limit: int, bodies_at_once: int = BODIES_AT_ONCE,
                 timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s
        self.budget, self.held = bodies_at_once * limit, 0  # one event loop: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS or \
                not under(route_path(scope), ("/api",)):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        body, size = [], 0
        try:
            with anyio.move_on_after(self.timeout_s) as waited:
                more = True
                while more:
                    try:
                        message = await receive()
                    except anyio.get_cancelled_exc_class():
                        if waited.cancel_called:  # the body's deadline: the 408 below
                            raise
                        # the server is stopping and cut this upload short: say so in JSON
                        # rather than let uvicorn answer a plain-text 500 and log the cut as
                        # an exception in the app; the task then ends, as its canceller wants
                        return await refuse(send, 503, "the server stopped before this upload "
                                            "arrived; send it again once the server is back",
                                            {"Connection": "close"})
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    self.held += len(chunk)
                    if size > self.limit:
                        return await self._too_large(send)
                    if self.held > self.budget:
                        return await refuse(send, 503, "the server is busy receiving other "
                                            "uploads; retry in a moment",
                                            {"Retry-After": str(RETRY_AFTER_S)})
                    body.append(chunk)
                    more = message.get("more_body", False)
            if waited.cancelled_caught:
                return await refuse(send, 408, f"the request body did not arrive within "
                                    f"{self.timeout_s:g} s")
            data, sent = b"".join(body), False

            async def replay():
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}

            return await self.app(scope, replay, send)
        finally:
            self.held -= size

    async def _too_large(self, send):
        limit = f"{round(self.limit / (1 << 20), 3):g}"
        await refuse(send, 413, f"request body over the {limit} MB limit of this server; "
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
        try:  # lower-cased, without port and brackets; a Host has no user part to skip
            name = None if "@" in given else urlsplit(f"//{given}").hostname
        except ValueError:  # a malformed IPv6 literal
            name = None
        if name not in self.hosts:
            shown = ", ".join(sorted(self.hosts))
            return await refuse(send, 400, f"Host {given[:100]!r} is not a name of this server "
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
