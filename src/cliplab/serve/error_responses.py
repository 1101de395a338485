"""How `cliplab serve` answers what goes wrong: every error is JSON ``{"error": "..."}``, one
line, with a 4xx code saying what to send instead (a 503 when busy, a 500 for a bug)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cliplab.config import value_error_words
from cliplab.errors import CliplabError
from cliplab.serve.middleware import HARDENING

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def add_error_handlers(app: FastAPI) -> None:
    """HTTP errors, invalid requests (415 for a body that is not a form where one goes, 422
    otherwise), cliplab's own errors (400) and anything unexpected (500), each as
    ``{"error": "..."}``."""

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException):
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code,
                            headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        wrong_type = not_a_form(request)
        if wrong_type:
            return JSONResponse({"error": wrong_type}, status_code=415)
        return JSONResponse({"error": validation_message(err)}, status_code=422)

    @app.exception_handler(CliplabError)
    async def cliplab_error(_: Request, err: CliplabError):
        return JSONResponse({"error": str(err)}, status_code=400)

    # a bug's response: JSON without the traceback (the server's log has it), and with the
    # hardening headers, which it would miss (Starlette answers it outside every middleware)
    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, err: Exception):
        return JSONResponse({"error": f"internal error ({type(err).__name__}); the server's log "
                             "says more"}, status_code=500,
                            headers={name.decode(): value.decode() for name, value in HARDENING})


def validation_message(err: RequestValidationError) -> str:
    """One line naming each invalid field and what is wrong with it, in the words of the
    CLI's config errors (``k is required``, ``k: expected a valid integer, ..., got 'abc'``)."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "body", "path"))
        msg = e.get("msg", "invalid")
        if e.get("type") == "missing":
            parts.append(f"{where} is required" if where else "a field is required")
            continue
        if "Expected UploadFile" in msg:  # a text field where a file goes: say what goes there
            msg = "upload an image file (multipart/form-data)"
        elif "type" in e and isinstance(e.get("input"), (str, int, float, type(None))):
            msg = value_error_words(e)  # the configs' words for one condition
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def not_a_form(request: Request) -> str | None:
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
