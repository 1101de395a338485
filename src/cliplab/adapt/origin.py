"""The pretrained origin of an adapted model: ``cliplab.json`` → ``"base": {path, fingerprint}``.

Adapted models and adapters record which weights they started from, so WiSE-FT, adapter
loading and merging can check that two checkpoints share an origin instead of silently mixing
unrelated weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from cliplab.errors import ModelError
from cliplab.models.dual_encoder import CLIPLAB_FILE, DualEncoder


def model_fingerprint(model: DualEncoder) -> str:
    """Hash of every weight of the model (names, shapes, dtypes, bytes): equal iff same weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.model.state_dict().items()):
        h.update(name.encode())
        h.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def record_base(folder: str | Path, base_path: str, fingerprint: str, **extra) -> None:
    """Add ``"base": {"path", "fingerprint"}`` (and ``extra`` keys) to the folder's cliplab.json."""
    file = Path(folder) / CLIPLAB_FILE
    meta = json.loads(file.read_text()) if file.is_file() else {}
    meta["base"] = {"path": str(base_path), "fingerprint": fingerprint}
    meta.update(extra)
    file.write_text(json.dumps(meta, indent=2))


def read_base(folder: str | Path) -> dict:
    """The ``base`` record of an adapted model or adapter folder."""
    file = Path(folder) / CLIPLAB_FILE
    meta = json.loads(file.read_text()) if file.is_file() else {}
    if "base" not in meta:
        raise ModelError(f"{folder} records no pretrained origin (no 'base' in {CLIPLAB_FILE}); "
                         "it was not written by `cliplab adapt`")
    return meta["base"]


def check_same_origin(folder: str | Path, base: DualEncoder, base_name: str) -> None:
    """Raise a clear error unless ``folder`` was adapted from exactly the weights of ``base``."""
    recorded = read_base(folder)
    found = model_fingerprint(base)
    if recorded["fingerprint"] != found:
        raise ModelError(f"{folder} was adapted from {recorded['path']} (fingerprint "
                         f"{recorded['fingerprint']}), but {base_name} has fingerprint {found}: "
                         "give the model it was trained from")
