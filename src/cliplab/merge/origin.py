"""Pretrained origin of a model folder: a fingerprint of its weights, and the optional
``base`` record in ``cliplab.json`` that a fine-tune writes to say what it started from.

``cliplab.json`` of a model fine-tuned from ``P`` may hold::

    "base": {"path": "P as given", "fingerprint": "<weights_fingerprint of P>"}

The record is optional (HF folders and older cliplab models have none); when present, merging
checks it. Fine-tuning code calls `record_origin(model_dir, base_dir)` after saving.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from cliplab.errors import ModelError
from cliplab.models.dual_encoder import CLIPLAB_FILE, DualEncoder


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's dtype, shape and bytes, independent of tensor names and
    order (HF renames keys between its file layout and its modules; the weights are what
    identify a model)."""
    digests = []
    for tensor in state.values():
        t = tensor.detach().cpu().contiguous()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        digests.append(h.hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:32]


def folder_fingerprint(path: str | Path) -> str:
    """`weights_fingerprint` of the model saved in folder ``path``."""
    return weights_fingerprint(DualEncoder.load(path).model.state_dict())


def read_origin(path: str | Path) -> dict | None:
    """The ``base`` record of a model folder's ``cliplab.json``, or None when it has none."""
    file = Path(path) / CLIPLAB_FILE
    if not file.is_file():
        return None
    try:
        base = json.loads(file.read_text()).get("base")
    except json.JSONDecodeError as err:
        raise ModelError(f"{file}: invalid JSON ({err.msg} at line {err.lineno})") from None
    if base is None:
        return None
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise ModelError(f"{file}: 'base' must be {{path: ..., fingerprint: ...}}")
    return base


def record_origin(model_dir: str | Path, base_dir: str | Path | None = None,
                  fingerprint: str | None = None) -> dict:
    """Write ``base`` into ``model_dir/cliplab.json``: the model was fine-tuned from
    ``base_dir`` (its fingerprint computed here unless given). Returns the record."""
    if fingerprint is None:
        if base_dir is None:
            raise ValueError("record_origin needs base_dir or fingerprint")
        fingerprint = folder_fingerprint(base_dir)
    record = {"path": str(base_dir) if base_dir is not None else None,
              "fingerprint": fingerprint}
    file = Path(model_dir) / CLIPLAB_FILE
    if file.is_file():
        meta = json.loads(file.read_text())
    else:  # a plain HF folder: write the preprocessing cliplab reads alongside the record
        model = DualEncoder.load(model_dir)
        meta = {"preprocess": model.preprocess_config.to_dict(),
                "text_pooling": model.text_pooling, "context_length": model.context_length}
    meta["base"] = record
    file.write_text(json.dumps(meta, indent=2))
    return record
