"""The HTTP API and page of `cliplab serve` (FastAPI): search by text and by image, zero-shot
labels, indexed images. Every error is JSON ``{"error": "..."}`` with a 4xx code; request bodies
are bounded; an API key, if set, guards every ``/api`` and ``/images`` route (as the
``X-API-Key`` header; ``?api_key=`` only in image URLs, which an ``<img>`` cannot send a header
with)."""

from __future__ import annotations

import hashlib
import mimetypes
import re
import secrets
import threading
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Form, Path as PathParam, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException

from cliplab.data.collection import read_range
from cliplab.data.sources import check_templates
from cliplab.errors import CliplabError, ConfigError
from cliplab.evaluate.zeroshot import zeroshot_classifier
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.embed import embed_images, embed_texts
from cliplab.serve.image_files import THUMBNAIL_SIZES, fail, read_upload, thumbnail
from cliplab.serve.index import SearchIndex
from cliplab.serve.middleware import AllowedHosts, BodyLimit, HardeningHeaders

MAX_K, MAX_OFFSET, MAX_QUERY_CHARS = 100, 10_000, 1000
MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger id is a 422, not a 500
MAX_LABELS, MAX_LABEL_CHARS = 100, 200
DEFAULT_MAX_UPLOAD = 10 << 20
DEFAULT_TEMPLATE = "a photo of a {}."


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "body", "path"))
        msg = e.get("msg", "invalid")
        if "Expected UploadFile" in msg:  # a text field where a file goes: say what goes there
            msg = "upload an image file (multipart/form-data)"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _not_a_form(request: Request) -> str | None:
    """What to say when a body that is not a form (JSON, a raw image, ...) reaches an endpoint
    that reads form fields (FastAPI reads none of it and reports each field missing); None for
    any other request."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not content_type or content_type in FORM_TYPES:
        return None
    dependant = getattr(request.scope.get("route"), "dependant", None)
    fields = [param.alias for param in getattr(dependant, "body_params", [])]
    if not fields:
        return None
    body = "a JSON body" if content_type == "application/json" or \
        content_type.endswith("+json") else f"a raw {content_type} body"
    how = "curl -F file=@IMAGE" if "file" in fields else "curl -F name=value"
    return (f"{request.url.path} takes multipart/form-data fields ({', '.join(fields)}), not "
            f"{body}; send them as form fields ({how})")


def _labels(fields: list[str]) -> list[str]:
    """The labels of the ``labels`` form fields: each field one or more, separated by commas
    or new lines; repeats dropped."""
    labels = [part.strip() for text in fields for line in text.splitlines()
              for part in line.split(",")]
    labels = list(dict.fromkeys(label for label in labels if label))
    if len(labels) < 2:
        fail(400, "labels: give at least two different labels, separated by commas or new "
                   "lines, or as repeated labels fields")
    if len(labels) > MAX_LABELS or any(len(label) > MAX_LABEL_CHARS for label in labels):
        fail(400, f"labels: at most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters")
    return labels


def _ids(fields: list[str]) -> list[int]:
    """The image ids of the ``ids`` form fields (each one or more, separated by commas), in
    order, repeats dropped; at most ``MAX_K``."""
    parts = [part.strip() for text in fields for part in text.split(",") if part.strip()]
    bad = next((part for part in parts
                if not re.fullmatch(r"[0-9]{1,19}", part) or int(part) > MAX_ID), None)
    if bad is not None:
        fail(422, f"ids: {bad[:40]!r} is not an image id (a whole number from 0)")
    ids = list(dict.fromkeys(int(part) for part in parts))
    if not ids or len(ids) > MAX_K:
        fail(422, f"ids: give 1 to {MAX_K} image ids, separated by commas")
    return ids


def ranked_labels(names: list[str], probs: torch.Tensor) -> list[dict]:
    """``[{label, probability}]`` of one image, most probable first."""
    order = torch.argsort(probs, descending=True).tolist()
    return [{"label": names[i], "probability": round(float(probs[i]), 6)} for i in order]


def _template(text: str) -> str:
    """The prompt template with exactly one ``{}`` (or ``{c}``) where the label goes, that formats
    with a label in it; a 400 otherwise."""
    try:
        template = check_templates([text], "template")[0]
        if "\0" not in template.format("\0"):  # "{{}}" is a literal "{}", no label
            raise ValueError(text)
    except (ConfigError, ValueError, IndexError, KeyError):
        fail(400, f"template {text!r}: give a prompt with exactly one {{}} where the label "
              f"goes (other braces doubled), e.g. {DEFAULT_TEMPLATE!r}")
    return template


def create_app(index: SearchIndex, model: DualEncoder, api_key: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               allowed_hosts: Iterable[str] | None = None) -> FastAPI:
    """The FastAPI app over an opened ``index`` and the ``model`` it was built with;
    ``allowed_hosts``: the names a request's Host may give (None: any)."""
    index.check_model(model)
    model.eval()
    lock = threading.Lock()  # one forward pass at a time: the CPU is the bottleneck anyway
    model_input = getattr(model, "preprocess_config", None)
    app = FastAPI(title="cliplab serve", version="1",
                  description="Search an indexed image collection by text or image and label "
                  "images zero-shot with the model the index was built with.")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException):
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        wrong_type = _not_a_form(request)
        if wrong_type:
            return JSONResponse({"error": wrong_type}, status_code=415)
        return JSONResponse({"error": _validation_message(err)}, status_code=422)

    @app.exception_handler(CliplabError)
    async def cliplab_error(_: Request, err: CliplabError):
        return JSONResponse({"error": str(err)}, status_code=400)

    def check_key(request: Request, in_url: bool) -> None:
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

    def authorised(request: Request) -> None:
        check_key(request, in_url=False)

    def authorised_image(request: Request) -> None:
        """An ``<img src>`` cannot send a header: image URLs may carry ``?api_key=``."""
        check_key(request, in_url=True)

    @lru_cache(maxsize=1024)
    def text_vector(text: str) -> np.ndarray:
        with lock:
            return embed_texts(model, [text])

    @lru_cache(maxsize=64)
    def label_head(names: tuple[str, ...], prompt: str) -> torch.Tensor:
        """The zero-shot head of ``names`` (the page labels every image shown with one set)."""
        with lock:
            return zeroshot_classifier(model, list(names), [prompt])

    def results(vector: np.ndarray, k: int, offset: int) -> list[dict]:
        scores, ids = index.search(vector.reshape(1, -1), k, offset)
        rows = index.items(ids[0])
        return [{"id": int(i), "score": round(float(s), 6), "caption": rows[int(i)]["caption"],
                 "key": rows[int(i)]["key"], "meta": rows[int(i)]["meta"],
                 "image": f"/images/{int(i)}", "thumbnail": f"/images/{int(i)}/thumbnail"}
                for s, i in zip(scores[0], ids[0]) if int(i) in rows]

    def indexed(item_id: int) -> dict:
        """The stored row of ``item_id``; a 404 if there is none."""
        row = index.items([item_id]).get(item_id)
        if row is None:
            fail(404, f"no indexed image with id {item_id}")
        return row

    def upload_vector(file: UploadFile) -> np.ndarray:
        """The embedding of an uploaded image: decoded before the model's lock is taken (a
        large upload must not hold up other requests' forward passes)."""
        image = read_upload(file.file.read(), "file", model_input)
        with lock:
            return embed_images(model, [image])

    def page(query: dict, found: list[dict], k: int, offset: int) -> dict:
        return {**query, "k": k, "offset": offset, "total": index.count, "results": found}

    guarded = [Depends(authorised)]
    k_query = Query(10, ge=1, le=MAX_K, description=f"results per page (1..{MAX_K})")
    offset_query = Query(0, ge=0, le=MAX_OFFSET, description="results to skip (paging)")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> HTMLResponse:
        return HTMLResponse(resources.files("cliplab.serve").joinpath("static/index.html")
                            .read_text(encoding="utf-8"))

    # HEAD too: uptime checks and load balancers often probe with it
    @app.get("/api/health", dependencies=guarded)
    @app.head("/api/health", dependencies=guarded, include_in_schema=False)
    def health() -> dict:
        """Index size, model and backend."""
        rec = index.record
        return {"status": "ok", "count": index.count, "model": rec["model"]["name"],
                "fingerprint": index.fingerprint, "backend": index.backend,
                "index": rec.get("faiss") or rec.get("milvus"), "max_k": MAX_K,
                "max_upload_bytes": max_upload_bytes, "max_query_chars": MAX_QUERY_CHARS}

    @app.get("/api/search", dependencies=guarded)
    def search_text(q: str = Query(..., max_length=MAX_QUERY_CHARS, description="the text to find"),
                    k: int = k_query, offset: int = offset_query) -> dict:
        """The ``k`` indexed images closest to the text ``q``, from rank ``offset``."""
        text = q.strip()
        if not text:
            fail(422, "q: empty query; type what to find, e.g. q=a red circle")
        return page({"query": text}, results(text_vector(text), k, offset), k, offset)

    async def one_file(request: Request) -> None:
        """A 422 for two files in one search (the last one was searched without a word); the
        form FastAPI parsed for the endpoint is read again from the request's cache."""
        if len((await request.form()).getlist("file")) > 1:
            fail(422, "file: give one image per search (the request holds several)")

    @app.post("/api/search/image", dependencies=[*guarded, Depends(one_file)])
    def search_image(file: UploadFile = File(..., description="an image file"),
                     k: int = k_query, offset: int = offset_query,
                     k_form: int | None = Form(None, alias="k", ge=1, le=MAX_K,
                                               description="or k as a form field"),
                     offset_form: int | None = Form(None, alias="offset", ge=0, le=MAX_OFFSET,
                                                    description="or offset as a form field"),
                     ) -> dict:
        """The ``k`` indexed images closest to an uploaded image; ``k`` and ``offset`` may be
        query parameters or form fields (a form field wins)."""
        k = k if k_form is None else k_form
        offset = offset if offset_form is None else offset_form
        vector = upload_vector(file)
        return page({"query": file.filename or "upload"}, results(vector[0], k, offset), k, offset)

    @app.get("/api/search/similar", dependencies=guarded)
    def search_similar(id: int = Query(..., ge=0, le=MAX_ID,  # noqa: A002
                                       description="an indexed image id"),
                       k: int = k_query, offset: int = offset_query) -> dict:
        """The ``k`` indexed images closest to the indexed image ``id`` (its stored embedding:
        nothing is decoded or uploaded), from rank ``offset``; the image itself ranks first (an
        exact copy indexed too ties with it; ties come in id order)."""
        indexed(id)
        return page({"id": id}, results(index.vector(id), k, offset), k, offset)

    @app.post("/api/classify", dependencies=guarded)
    def classify(labels: list[str] = Form(..., description="labels separated by commas or new "
                                          "lines (or one per repeated labels field)"),
                 id: int | None = Form(None, ge=0, le=MAX_ID,  # noqa: A002
                                       description="an indexed image id"),
                 file: UploadFile | None = File(None, description="or an uploaded image"),
                 template: str = Form(DEFAULT_TEMPLATE, max_length=MAX_LABEL_CHARS,
                                      description="prompt template; {} is the label")) -> dict:
        """Zero-shot probabilities of the labels for one image (an indexed id or an upload)."""
        names, prompt = _labels(labels), _template(template)
        if (id is None) == (file is None):
            fail(400, "give exactly one of id (an indexed image) or file (an upload)")
        if id is not None:
            indexed(id)
            vector = index.vector(id)[None]
        else:
            vector = upload_vector(file)
        head = label_head(tuple(names), prompt)
        probs = zero_shot_probabilities(model, torch.from_numpy(np.array(vector)), head)[0]
        return {"id": id, "template": template, "labels": ranked_labels(names, probs)}

    @app.post("/api/classify/ids", dependencies=guarded)
    def classify_ids(labels: list[str] = Form(..., description="labels separated by commas or "
                                              "new lines (or one per repeated labels field)"),
                     ids: list[str] = Form(..., description=f"up to {MAX_K} indexed image ids, "
                                           "separated by commas (or one per repeated ids field)"),
                     template: str = Form(DEFAULT_TEMPLATE, max_length=MAX_LABEL_CHARS,
                                          description="prompt template; {} is the label")
                     ) -> dict:
        """Zero-shot probabilities of the labels for several indexed images at once (the page
        labels every result it shows with one request)."""
        names, prompt, wanted = _labels(labels), _template(template), _ids(ids)
        found = index.items(wanted)
        missing = [i for i in wanted if i not in found]
        if missing:
            fail(404, f"no indexed image with id {', '.join(map(str, missing[:5]))}"
                  + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
        vectors = torch.from_numpy(np.stack([index.vector(i) for i in wanted]))
        probs = zero_shot_probabilities(model, vectors, label_head(tuple(names), prompt))
        return {"template": template, "results": [
            {"id": i, "labels": ranked_labels(names, row)} for i, row in zip(wanted, probs)]}

    def stored_image(item_id: int) -> Path | tuple[bytes, str]:
        """Where ``item_id``'s original image is: its file, or its bytes read from a shard
        with the name they had there; a 404 when it is gone."""
        source = index.image_source(indexed(item_id))
        if "file" in source:
            path = Path(source["file"])
            if not path.is_file():
                fail(404, f"the image file of id {item_id} is gone")
            return path
        try:
            data = read_range(source["tar"], int(source["offset"]), int(source["size"]))
        except OSError as err:
            fail(404, f"the image of id {item_id} cannot be read from its shard ({err})")
        return data, source.get("name", "")

    # HEAD too: a link checker or proxy asks whether an image is there without fetching it
    @app.get("/images/{id}", dependencies=[Depends(authorised_image)])
    @app.head("/images/{id}", dependencies=[Depends(authorised_image)], include_in_schema=False)
    def image(item_id: int = PathParam(..., le=MAX_ID, alias="id")) -> Response:
        """An indexed image, read from its original file (ids only; no path is ever taken)."""
        stored = stored_image(item_id)
        if isinstance(stored, Path):
            return FileResponse(stored, media_type=mimetypes.guess_type(stored.name)[0]
                                or "application/octet-stream")
        data, name = stored
        return Response(data, media_type=mimetypes.guess_type(name)[0]
                        or "application/octet-stream")

    @lru_cache(maxsize=2048)  # a few KB each: the page shows the same cards again when paging
    def small_image(item_id: int, size: int, version: tuple) -> tuple[bytes, str]:
        stored = stored_image(item_id)
        try:
            return thumbnail(stored if isinstance(stored, Path) else stored[0], size)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            fail(404, f"the image of id {item_id} no longer decodes")

    def version(item_id: int) -> tuple:
        """What changes when ``item_id``'s image does (a file replaced under the same name)."""
        source = index.image_source(indexed(item_id))
        path = Path(source.get("file") or source["tar"])
        try:
            stat = path.stat()
        except OSError:
            fail(404, f"the image file of id {item_id} is gone")
        return str(path), stat.st_mtime_ns, stat.st_size, source.get("offset")

    @app.get("/images/{id}/thumbnail", dependencies=[Depends(authorised_image)])
    @app.head("/images/{id}/thumbnail", dependencies=[Depends(authorised_image)],
              include_in_schema=False)
    def image_thumbnail(request: Request, item_id: int = PathParam(..., le=MAX_ID, alias="id"),
                        size: int = Query(256, ge=THUMBNAIL_SIZES[0], le=THUMBNAIL_SIZES[1],
                                          description="the longer side, in pixels")) -> Response:
        """An indexed image of at most ``size`` pixels a side, in a format every browser shows
        (`thumbnail`): what the page's cards show (a browser cannot show TIFF, and a 30 MB
        original for a 180 px card is waste). Its ETag changes with the image file, so a
        browser revalidates rather than decodes."""
        now = version(item_id)
        tag = f'"{hashlib.sha1(repr((now, size)).encode()).hexdigest()[:20]}"'
        cached = {"ETag": tag, "Cache-Control": "private, no-cache"}
        if none_match(request.headers.get("if-none-match"), tag):
            return Response(status_code=304, headers=cached)
        data, media_type = small_image(item_id, size, now)
        return Response(data, media_type=media_type, headers=cached)

    app.add_middleware(BodyLimit, limit=max_upload_bytes)
    if allowed_hosts is not None:
        app.add_middleware(AllowedHosts, hosts=allowed_hosts)
    app.add_middleware(HardeningHeaders)  # added last: outermost, so refusals carry it too
    return app


def none_match(header: str | None, tag: str) -> bool:
    """Whether an If-None-Match header names ``tag``: by weak comparison (RFC 9110: a proxy
    that compresses marks the tag weak, ``W/"…"``), in a list, or ``*``."""
    if not header:
        return False
    named = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in named or tag.removeprefix("W/") in named


@torch.no_grad()
def zero_shot_probabilities(model: DualEncoder, image_embeddings: torch.Tensor,
                            classifier: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` probabilities from unit embeddings and a zero-shot head: softmax of the scaled
    cosines (CLIP), independent sigmoids with the bias (SigLIP)."""
    # embeddings and head are on the CPU; the model's scale and bias may sit on a GPU
    logits = image_embeddings.float() @ classifier.float().t() * model.logit_scale.exp().item()
    if model.logit_bias is not None:
        return torch.sigmoid(logits + model.logit_bias.item())
    return torch.softmax(logits, dim=-1)
