"""`cliplab serve`'s search routes: health, search by text, by an uploaded image and by an
indexed image. Each takes its app's `SearchService` per request (`current_service`); an API
key, if set, is checked before them (`ApiKeyCheck`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile

from cliplab.serve.api_schema import UPLOAD_ERRORS, Health, QueryPage, SimilarPage, errors
from cliplab.serve.image_files import fail
from cliplab.serve.request_fields import (K_QUERY, MAX_ID, MAX_K, MAX_LABEL_CHARS, MAX_LABELS,
                                          MAX_OFFSET, MAX_QUERY_CHARS, OFFSET_QUERY)
from cliplab.serve.search_service import SERVICE, SearchService


router = APIRouter()


# HEAD too: uptime checks and load balancers often probe with it (registered after GET, so a
# 405's Allow names GET: Starlette takes it from the first route of the path)
@router.head("/api/health", include_in_schema=False)
@router.get("/api/health", response_model=Health, responses=errors(503))
def health(request: Request, service: SearchService = SERVICE) -> dict:
    """Index size and build id (the generation served), model and backend; a 503 when the
    index cannot search (a load balancer takes the server out)."""
    index = service.index
    problem = index.backend_problem()
    if problem:
        fail(503, service.cannot_search(problem))
    rec = index.record
    return {"status": "ok", "count": index.count, "build": rec.get("build"),
            "model": rec["model"]["name"],
            "fingerprint": index.fingerprint, "backend": index.backend,
            "index": rec.get("faiss") or rec.get("milvus"), "max_k": MAX_K,
            "max_offset": MAX_OFFSET, "max_query_chars": MAX_QUERY_CHARS,
            "max_upload_bytes": request.app.state.max_upload_bytes,
            "max_labels": MAX_LABELS, "max_label_chars": MAX_LABEL_CHARS,
            "next_refused": service.next_refused}


@router.get("/api/search", response_model=QueryPage, responses=errors(422, 503))
def search_text(q: str = Query(..., max_length=MAX_QUERY_CHARS,
                               description="the text to find (not blank)"),
                k: int = K_QUERY, offset: int = OFFSET_QUERY,
                service: SearchService = SERVICE) -> dict:
    """The ``k`` indexed images closest to the text ``q``, from rank ``offset``."""
    text = q.strip()
    if not text:
        fail(422, "q: empty query; type what to find, e.g. q=a red circle")
    return service.page({"query": text}, service.text_vector(text), k, offset)


async def one_file(request: Request) -> None:
    """A 422 for two files in one request (the last one was used without a word); the form
    FastAPI parsed for the endpoint is read again from the request's cache."""
    if len((await request.form()).getlist("file")) > 1:
        fail(422, "file: give one image per request (the request holds several)")


@router.post("/api/search/image", dependencies=[Depends(one_file)], response_model=QueryPage,
             responses=errors(*UPLOAD_ERRORS))
def search_image(file: UploadFile = File(..., description="an image file"),
                 k: int = K_QUERY, offset: int = OFFSET_QUERY,
                 k_form: int | None = Form(None, alias="k", ge=1, le=MAX_K,
                                           description="or k as a form field"),
                 offset_form: int | None = Form(None, alias="offset", ge=0, le=MAX_OFFSET,
                                                description="or offset as a form field"),
                 service: SearchService = SERVICE) -> dict:
    """The ``k`` indexed images closest to an uploaded image; ``k`` and ``offset`` may be
    query parameters or form fields (a form field wins)."""
    k = k if k_form is None else k_form
    offset = offset if offset_form is None else offset_form
    vector = service.upload_vector(file)
    return service.page({"query": file.filename or "upload"}, vector[0], k, offset)


@router.get("/api/search/similar", response_model=SimilarPage,
            responses=errors(404, 422, 503))
def search_similar(id: int = Query(..., ge=0, le=MAX_ID,  # noqa: A002
                                   description="an indexed image id"),
                   k: int = K_QUERY, offset: int = OFFSET_QUERY,
                   service: SearchService = SERVICE) -> dict:
    """The ``k`` indexed images closest to the indexed image ``id`` (its stored embedding:
    nothing is decoded or uploaded), from rank ``offset``; the image itself ranks first (an
    exact copy indexed too ties with it; ties come in id order)."""
    service.indexed(id)
    return service.page({"id": id}, service.index.vector(id), k, offset)
