"""The HTTP API and page of `cliplab serve` (FastAPI): search by text and by image, zero-shot
labels, indexed images. Every error is JSON ``{"error": "..."}`` (`add_error_handlers`); request
bodies are bounded; an API key, if set, guards every ``/api`` and ``/images`` route (as the
``X-API-Key`` header; ``?api_key=`` only in image URLs, which an ``<img>`` cannot send a header
with)."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from cliplab.models.dual_encoder import DualEncoder
from cliplab.serve.api_key import ApiKeyCheck
from cliplab.serve.api_schema import document_api_key
from cliplab.serve.error_responses import add_error_handlers
from cliplab.serve.index import SearchIndex
from cliplab.serve.index_generation import IndexGenerations
from cliplab.serve.middleware import AllowedHosts, BodyLimit, HardeningHeaders
from cliplab.serve.request_fields import DEFAULT_MAX_UPLOAD
from cliplab.serve.routes_classify import router as classify_routes
from cliplab.serve.routes_images import router as image_routes
from cliplab.serve.routes_search import router as search_routes
from cliplab.serve.search_service import SearchService


def home() -> HTMLResponse:
    """The search page."""
    return HTMLResponse(resources.files("cliplab.serve").joinpath("static/index.html")
                        .read_text(encoding="utf-8"))


def create_app(index: SearchIndex, model: DualEncoder, api_key: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               allowed_hosts: Iterable[str] | None = None) -> FastAPI:
    """The FastAPI app over an opened ``index`` and the ``model`` it was built with;
    ``allowed_hosts``: the names a request's Host may give (None: any)."""
    app = FastAPI(title="cliplab serve", version="1", redoc_url=None,
                  description="Search an indexed image collection by text or image and label "
                  "images zero-shot with the model the index was built with.")
    # the routes take these per request (`current_service`), holding none of them; the
    # index folder's next generation is switched to by itself (`IndexGenerations`)
    app.state.generations = IndexGenerations(SearchService(index, model))
    app.state.max_upload_bytes = max_upload_bytes
    add_error_handlers(app)
    # HEAD too: an uptime check probes the page
    app.add_api_route("/", home, methods=["GET", "HEAD"], response_class=HTMLResponse,
                      include_in_schema=False)
    for routes in (search_routes, classify_routes, image_routes):
        app.include_router(routes)
    # each added one wraps those before: a request meets them from the last added in
    app.add_middleware(BodyLimit, limit=max_upload_bytes)
    if api_key is not None:  # before the body is read
        app.add_middleware(ApiKeyCheck, api_key=api_key)
        document_api_key(app)
    if allowed_hosts is not None:
        app.add_middleware(AllowedHosts, hosts=allowed_hosts)
    app.add_middleware(HardeningHeaders)  # added last: outermost, so refusals carry it too
    return app
