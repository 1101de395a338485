"""A model folder's own files, in one place: ``cliplab.json``, the pretrained-origin record in
it, and the weight fingerprint that identifies a model.

A model folder is a plain HF folder (``config.json``, ``model.safetensors``, tokenizer files,
``preprocessor_config.json``) plus ``cliplab.json`` holding what HF has no field for (the
preprocessing, the text pooling, the context length) and, for a model fine-tuned, adapted or
merged from another, its origin::

    "base": {"path": "P as given", "fingerprint": "<weights_fingerprint of P>"}

The record is optional (HF folders and models trained from scratch have none); WiSE-FT,
adapter loading and merging check it when it is there. A checkpoint of a training run
(pretraining, continued pretraining, the quickstart) records the run instead, which holds its
config, start model and data::

    "trained_by": {"run": "/the/run/folder", "step": N}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from cliplab.errors import ModelError


class WrappedModel(Protocol):
    """What a fingerprint needs of a `DualEncoder` (named structurally: the wrapper's module
    imports this one)."""

    model: torch.nn.Module


CLIPLAB_FILE = "cliplab.json"
ORIGIN_KEY = "base"
TRAINED_BY_KEY = "trained_by"


# -- cliplab.json -------------------------------------------------------------------------------
def read_json(file: Path) -> Any:
    """A JSON file of a model folder; unreadable or invalid JSON is a one-line `ModelError`."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(f"{file}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{file}: cannot be read ({str(err).splitlines()[0]})") from None


def read_meta(folder: str | Path) -> dict:
    """The folder's ``cliplab.json`` as a dict ({} when it has none)."""
    file = Path(folder) / CLIPLAB_FILE
    if not file.is_file():
        return {}
    meta = read_json(file)
    if not isinstance(meta, dict):
        raise ModelError(f"{file}: must hold a JSON object, not {type(meta).__name__}")
    return meta


def write_meta(folder: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write ``meta`` as the folder's ``cliplab.json`` (replacing it)."""
    file = Path(folder) / CLIPLAB_FILE
    file.write_text(json.dumps(dict(meta), indent=2), encoding="utf-8")
    return file


def update_meta(folder: str | Path, **fields: Any) -> dict:
    """Set ``fields`` in the folder's ``cliplab.json`` (made if missing); returns the result."""
    meta = {**read_meta(folder), **fields}
    write_meta(folder, meta)
    return meta


# -- fingerprints -------------------------------------------------------------------------------
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


def model_fingerprint(model: WrappedModel) -> str:
    """`weights_fingerprint` of a loaded model's weights: equal iff the same weights. A model
    that holds no PyTorch module but fingerprints itself (an ONNX export, `OnnxEncoder`:
    its graphs and projections) gives its own."""
    own = getattr(model, "weights_fingerprint", None)
    if callable(own):
        return own()
    inner = getattr(model, "model", None)
    if inner is None:
        raise ModelError(f"{type(model).__name__} holds no weights cliplab can fingerprint "
                         "(give a model folder, preset, Hub id or ONNX export)")
    return weights_fingerprint(inner.state_dict())


def files_stamp(path: str | Path) -> str:
    """A cheap stamp of a model's files (a folder's every file, or one checkpoint file): their
    names, sizes, modification and change times and inodes, hashed. It changes when a file is
    rewritten, replaced (also by a copy that keeps the size and modification time), added or
    removed: what a resumed run checks its models by without loading them."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        stat = file.stat()
        name = file.relative_to(path) if path.is_dir() else file.name
        h.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0"
                 f"{stat.st_ino}\n".encode())
    return h.hexdigest()[:16]


# -- the pretrained-origin record ---------------------------------------------------------------
def write_origin(folder: str | Path, base_path: str | Path | None, fingerprint: str,
                 **extra: Any) -> dict:
    """Record in ``folder/cliplab.json`` that its weights started from ``base_path`` (whose
    `weights_fingerprint` is ``fingerprint``), with ``extra`` keys beside it. Returns the
    record. Works on any folder: a cliplab model, a plain HF folder or an adapter folder. A
    base that is a path is recorded absolute (so the record holds from any working folder); a
    preset or Hub id as given."""
    path = str(base_path) if base_path else None  # "" or None: no path known
    if path is not None and Path(path).expanduser().exists():
        path = str(Path(path).expanduser().resolve())
    record = {"path": path, "fingerprint": fingerprint}
    update_meta(folder, **{ORIGIN_KEY: record}, **extra)
    return record


def write_trained_by(folder: str | Path, run: str | Path, step: int) -> dict:
    """Record in ``folder/cliplab.json`` that its weights are step ``step`` of the training
    run folder ``run`` (recorded absolute); returns the record."""
    record = {"run": str(Path(run).expanduser().resolve()), "step": int(step)}
    update_meta(folder, **{TRAINED_BY_KEY: record})
    return record


def read_origin(folder: str | Path) -> dict | None:
    """The origin record ``{path, fingerprint}`` of a folder, or None when it has none."""
    base = read_meta(folder).get(ORIGIN_KEY)
    if base is None:
        return None
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise ModelError(f"{Path(folder) / CLIPLAB_FILE}: {ORIGIN_KEY!r} must be "
                         "{path: ..., fingerprint: ...}")
    return base


def require_origin(folder: str | Path) -> dict:
    """The origin record of an adapted, fine-tuned or merged folder; a clear error without."""
    base = read_origin(folder)
    if base is None:
        raise ModelError(f"{folder} records no pretrained origin (no {ORIGIN_KEY!r} in "
                         f"{CLIPLAB_FILE}); it was not written by `cliplab adapt` or "
                         "`cliplab merge`")
    return base


def check_same_origin(folder: str | Path, base: WrappedModel, base_name: str) -> None:
    """Raise a clear error unless ``folder`` was adapted from exactly the weights of ``base``."""
    recorded = require_origin(folder)
    found = model_fingerprint(base)
    if recorded["fingerprint"] != found:
        raise ModelError(f"{folder} was adapted from {recorded['path']} (fingerprint "
                         f"{recorded['fingerprint']}), but {base_name} has fingerprint {found}: "
                         "give the model it was trained from")
