"""The HTTP API and page of `cliplab serve` (FastAPI): search by text and by image, zero-shot
labels, indexed images. Every error is JSON ``{"error": "..."}`` with a 4xx code; request bodies
are bounded; an API key, if set, guards every ``/api`` and ``/images`` route (as the
``X-API-Key`` header; ``?api_key=`` only in image URLs, which an ``<img>`` cannot send a header
with)."""

from __future__ import annotations

import io
import mimetypes
import re
import secrets
import threading
import warnings
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
from cliplab.models.preprocess import convert_image
from cliplab.serve.index import SearchIndex

MAX_K, MAX_OFFSET, MAX_QUERY_CHARS = 100, 10_000, 1000
MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger id is a 422, not a 500
MAX_LABELS, MAX_LABEL_CHARS = 100, 200
DEFAULT_MAX_UPLOAD = 10 << 20
MAX_IMAGE_PIXELS = 50_000_000
DEFAULT_TEMPLATE = "a photo of a {}."


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a JSON 413 before the app
    sees it (the body is read in full first, so a chunked upload cannot slip past)."""

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
        response = JSONResponse({"error": f"request body over the {limit} MB limit of this "
                                 "server; upload a smaller image"}, status_code=413)
        await response({"type": "http"}, None, send)


def _fail(status: int, message: str):
    raise HTTPException(status_code=status, detail=message)


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


def _read_image(data: bytes, what: str = "file") -> Image.Image:
    if not data:
        _fail(400, f"{what} is empty; upload an image (PNG, JPEG, WebP, ...)")
    try:
        with warnings.catch_warnings():  # sizes are checked here, not by PIL's bomb guard
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    _fail(413, f"{what} has {im.width}x{im.height} pixels, over {MAX_IMAGE_PIXELS}")
                return convert_image(im)
    except Image.DecompressionBombError as err:  # PIL's own limit, met before the size is known
        counted = re.search(r"\((\d+) pixels\)", str(err))  # "Image size (N pixels) exceeds"
        _fail(413, f"{what} has {counted.group(1) + ' ' if counted else 'too many '}pixels, "
              f"over {MAX_IMAGE_PIXELS}")
    except (OSError, ValueError, SyntaxError, EOFError):
        _fail(415, f"{what} is not an image PIL can read (PNG, JPEG, WebP, GIF, BMP, TIFF)")


def _labels(fields: list[str]) -> list[str]:
    """The labels of the ``labels`` form fields: each field one or more, separated by commas
    or new lines; repeats dropped."""
    labels = [part.strip() for text in fields for line in text.splitlines()
              for part in line.split(",")]
    labels = list(dict.fromkeys(label for label in labels if label))
    if len(labels) < 2:
        _fail(400, "labels: give at least two different labels, separated by commas or new "
                   "lines, or as repeated labels fields")
    if len(labels) > MAX_LABELS or any(len(label) > MAX_LABEL_CHARS for label in labels):
        _fail(400, f"labels: at most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters")
    return labels


def _ids(fields: list[str]) -> list[int]:
    """The image ids of the ``ids`` form fields (each one or more, separated by commas), in
    order, repeats dropped; at most ``MAX_K``."""
    parts = [part.strip() for text in fields for part in text.split(",") if part.strip()]
    bad = next((part for part in parts
                if not re.fullmatch(r"[0-9]{1,19}", part) or int(part) > MAX_ID), None)
    if bad is not None:
        _fail(422, f"ids: {bad[:40]!r} is not an image id (a whole number from 0)")
    ids = list(dict.fromkeys(int(part) for part in parts))
    if not ids or len(ids) > MAX_K:
        _fail(422, f"ids: give 1 to {MAX_K} image ids, separated by commas")
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
        _fail(400, f"template {text!r}: give a prompt with exactly one {{}} where the label "
              f"goes (other braces doubled), e.g. {DEFAULT_TEMPLATE!r}")
    return template


def create_app(index: SearchIndex, model: DualEncoder, api_key: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD) -> FastAPI:
    """The FastAPI app over an opened ``index`` and the ``model`` it was built with."""
    index.check_model(model)
    model.eval()
    lock = threading.Lock()  # one forward pass at a time: the CPU is the bottleneck anyway
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
                _fail(401, "missing API key: ?api_key= works in image URLs only; send the key "
                      "as the X-API-Key header")
            _fail(401, "missing or wrong API key: send it as the X-API-Key header "
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
                 "image": f"/images/{int(i)}"}
                for s, i in zip(scores[0], ids[0]) if int(i) in rows]

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
    @app.api_route("/api/health", methods=["GET", "HEAD"], dependencies=guarded)
    def health() -> dict:
        """Index size, model and backend."""
        rec = index.record
        return {"status": "ok", "count": index.count, "model": rec["model"]["name"],
                "fingerprint": index.fingerprint, "backend": index.backend,
                "index": rec.get("faiss") or rec.get("milvus"), "max_k": MAX_K,
                "max_upload_bytes": max_upload_bytes}

    @app.get("/api/search", dependencies=guarded)
    def search_text(q: str = Query(..., max_length=MAX_QUERY_CHARS, description="the text to find"),
                    k: int = k_query, offset: int = offset_query) -> dict:
        """The ``k`` indexed images closest to the text ``q``, from rank ``offset``."""
        text = q.strip()
        if not text:
            _fail(422, "q: empty query; type what to find, e.g. q=a red circle")
        return page({"query": text}, results(text_vector(text), k, offset), k, offset)

    @app.post("/api/search/image", dependencies=guarded)
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
        image = _read_image(file.file.read(), "file")
        with lock:
            vector = embed_images(model, [image])
        return page({"query": file.filename or "upload"}, results(vector[0], k, offset), k, offset)

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
            _fail(400, "give exactly one of id (an indexed image) or file (an upload)")
        if id is not None:
            if not index.items([id]):
                _fail(404, f"no indexed image with id {id}")
            vector = index.vector(id)[None]
        else:
            with lock:
                vector = embed_images(model, [_read_image(file.file.read(), "file")])
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
            _fail(404, f"no indexed image with id {', '.join(map(str, missing[:5]))}"
                  + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
        vectors = torch.from_numpy(np.stack([index.vector(i) for i in wanted]))
        probs = zero_shot_probabilities(model, vectors, label_head(tuple(names), prompt))
        return {"template": template, "results": [
            {"id": i, "labels": ranked_labels(names, row)} for i, row in zip(wanted, probs)]}

    @app.get("/images/{id}", dependencies=[Depends(authorised_image)])
    def image(item_id: int = PathParam(..., le=MAX_ID, alias="id")) -> Response:
        """An indexed image, read from its original file (ids only; no path is ever taken)."""
        row = index.items([item_id]).get(item_id)
        if row is None:
            _fail(404, f"no indexed image with id {item_id}")
        source = index.image_source(row)
        if "file" in source:
            path = Path(source["file"])
            if not path.is_file():
                _fail(404, f"the image file of id {item_id} is gone")
            return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0]
                                or "application/octet-stream")
        try:
            data = read_range(source["tar"], int(source["offset"]), int(source["size"]))
        except OSError as err:
            _fail(404, f"the image of id {item_id} cannot be read from its shard ({err})")
        return Response(data, media_type=mimetypes.guess_type(source.get("name", ""))[0]
                        or "application/octet-stream")

    app.add_middleware(BodyLimit, limit=max_upload_bytes)
    return app


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
