"""`cliplab serve`'s zero-shot routes: the probabilities of labels for one image (indexed or
uploaded) or for several indexed images at once. Each takes its app's `SearchService` per
request; an API key, if set, is checked before them (`ApiKeyCheck`)."""

from __future__ import annotations

import numpy as np
import torch
from fastapi import APIRouter, Depends, File, Form, UploadFile

from cliplab.serve.api_schema import UPLOAD_ERRORS, Classification, Classifications, errors
from cliplab.serve.image_files import fail
from cliplab.serve.request_fields import (DEFAULT_TEMPLATE, MAX_ID, MAX_K, MAX_LABEL_CHARS,
                                          parse_ids, parse_labels, parse_template)
from cliplab.serve.routes_search import one_file
from cliplab.serve.search_service import SERVICE, SearchService

LABELS_HELP = ("labels separated by commas or new lines; every labels field is split so, "
               "repeated fields add up, and a label in double quotes keeps its commas")
TEMPLATE_HELP = "prompt template; {} is the label"


def ranked_labels(names: list[str], probs: torch.Tensor) -> list[dict]:
    """``[{label, probability}]`` of one image, most probable first."""
    order = torch.argsort(probs, descending=True).tolist()
    return [{"label": names[i], "probability": round(float(probs[i]), 6)} for i in order]


router = APIRouter()


@router.post("/api/classify", dependencies=[Depends(one_file)], response_model=Classification,
             responses=errors(404, *UPLOAD_ERRORS))
def classify(labels: list[str] = Form(..., description=LABELS_HELP),
             id: int | None = Form(None, ge=0, le=MAX_ID,  # noqa: A002
                                   description="an indexed image id"),
             file: UploadFile | None = File(None, description="or an uploaded image"),
             template: str = Form(DEFAULT_TEMPLATE, max_length=MAX_LABEL_CHARS,
                                  description=TEMPLATE_HELP),
             service: SearchService = SERVICE) -> dict:
    """Zero-shot probabilities of the labels for one image (an indexed id or an upload)."""
    names, prompt = parse_labels(labels), parse_template(template)
    if (id is None) == (file is None):
        fail(422, "give exactly one of id (an indexed image) or file (an upload)")
    if id is not None:
        service.indexed(id)
        vector = service.index.vector(id)[None]
    else:
        vector = service.upload_vector(file)
    probs = service.probabilities(vector, names, prompt)[0]
    return {"id": id, "template": template, "labels": ranked_labels(names, probs)}


@router.post("/api/classify/ids", response_model=Classifications,
             responses=errors(404, 408, 413, 415, 422, 503))
def classify_ids(labels: list[str] = Form(..., description=LABELS_HELP),
                 ids: list[str] = Form(..., description=f"up to {MAX_K} indexed image ids, "
                                       "separated by commas (or one per repeated ids field)"),
                 template: str = Form(DEFAULT_TEMPLATE, max_length=MAX_LABEL_CHARS,
                                      description=TEMPLATE_HELP),
                 service: SearchService = SERVICE) -> dict:
    """Zero-shot probabilities of the labels for several indexed images at once (the page
    labels every result it shows with one request)."""
    index = service.index
    names, prompt, wanted = parse_labels(labels), parse_template(template), parse_ids(ids)
    found = index.items(wanted)
    missing = [i for i in wanted if i not in found]
    if missing:
        fail(404, f"no indexed image with id{'s' * (len(missing) > 1)} "
             f"{', '.join(map(str, missing[:5]))}"
             + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    probs = service.probabilities(np.stack([index.vector(i) for i in wanted]), names, prompt)
    return {"template": template, "results": [
        {"id": i, "labels": ranked_labels(names, row)} for i, row in zip(wanted, probs)]}
