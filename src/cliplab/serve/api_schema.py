"""What `cliplab serve`'s API answers, as the models its OpenAPI schema is made from: each route's
JSON body, the one error body (``{"error": "..."}``) with the statuses a route can answer, and
the API key as a security scheme when one is set. A client generated from ``/openapi.json``
reads the responses the server really sends."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from cliplab.serve.api_key import GUARDED


class ErrorBody(BaseModel):
    """Every error's body."""

    error: str = Field(description="one line saying what is wrong and what to send instead")


class SearchResult(BaseModel):
    """One indexed image in a page of results."""

    id: int = Field(description="the image's id in the index")
    score: float = Field(description="cosine similarity to the query, 6 decimals")
    caption: str = Field(description="its caption (empty if it has none)")
    key: str = Field(description="where it was indexed from: SOURCE|KEY")
    meta: dict[str, Any] = Field(description="what was recorded beside it (shard key, labels, ...)")
    image: str = Field(description="URL of the original image")
    thumbnail: str = Field(description="URL of its thumbnail")


class Page(BaseModel):
    """A page of results, from rank ``offset``."""

    k: int = Field(description="results asked for")
    offset: int = Field(description="results skipped")
    total: int = Field(description="images in the index")
    results: list[SearchResult] = Field(description="best first; fewer than k past the end")


class QueryPage(Page):
    """A page of results for a text or an uploaded image."""

    query: str = Field(description="the text searched (stripped), or the upload's file name")


class SimilarPage(Page):
    """A page of results for an indexed image."""

    id: int = Field(description="the indexed image searched by")


class LabelProbability(BaseModel):
    """One label's zero-shot probability."""

    label: str
    probability: float = Field(description="6 decimals; an image's labels sum to 1")


class Classification(BaseModel):
    """The labels of one image, most probable first."""

    id: int | None = Field(description="the indexed image, or null for an upload")
    template: str
    labels: list[LabelProbability]


class LabelledImage(BaseModel):
    """The labels of one indexed image, most probable first."""

    id: int
    labels: list[LabelProbability]


class Classifications(BaseModel):
    """The labels of several indexed images, in the order asked (a repeated id once)."""

    template: str
    results: list[LabelledImage]


class Health(BaseModel):
    """The index, the model and the server's limits."""

    status: str = Field(description='"ok"')
    count: int = Field(description="images in the index")
    build: str | None = Field(description="the served index's build id: another after a "
                              "rebuild, kept by an --add (null: an index from before it was kept)")
    model: str
    fingerprint: str = Field(description="the image and text towers' fingerprint")
    backend: str = Field(description='"faiss" or "milvus"')
    index: dict[str, Any] | None = Field(description="the backend's index settings")
    max_k: int
    max_offset: int
    max_query_chars: int
    max_upload_bytes: int
    max_labels: int
    max_label_chars: int = Field(description="of a label, and of a template")
    next_refused: str | None = Field(
        None, description="null, or why the index folder's newer generation cannot be served "
        "by this server, which goes on serving the one before (restart it to serve the new one)")


ERROR_MEANINGS = {
    400: "an upload that is empty or cannot be decoded",
    404: "no such indexed image (or its file is gone)",
    408: "the request body did not arrive in time",
    413: "the body or the image's pixels over the limit",
    415: "not a form where one goes, or not an image",
    422: "a field missing or out of its bounds",
    503: "busy (retry after the Retry-After seconds), stopping, or the index's Milvus "
         "collection is gone or its folder rebuilt (until the server has switched to the new "
         "index)",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that can answer ``statuses``, each with `ErrorBody`."""
    return {status: {"model": ErrorBody, "description": ERROR_MEANINGS[status]}
            for status in statuses}


UPLOAD_ERRORS = (400, 408, 413, 415, 422, 503)  # a body read by `BodyLimit`, an image decoded
IMAGE_RESPONSE = {200: {"content": {"image/*": {"schema": {"type": "string",
                                                           "format": "binary"}}},
                        "description": "the image"}}


def document_api_key(app: FastAPI) -> None:
    """Name the ``X-API-Key`` header in ``app``'s schema as what every guarded route needs (a
    401 without it), so ``/docs`` can send it and a generated client asks for it; the check
    itself is `ApiKeyCheck`, which runs before a body is read."""

    make_schema = app.openapi  # FastAPI's own, which keeps what it made in app.openapi_schema

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = make_schema()
            schema.setdefault("components", {})["securitySchemes"] = {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
            for path, operations in schema.get("paths", {}).items():
                if not path.startswith(GUARDED):
                    continue
                for operation in operations.values():
                    operation["security"] = [{"ApiKey": []}]
                    operation["responses"]["401"] = {
                        "description": "no API key, or a wrong one",
                        "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
