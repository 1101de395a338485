"""The pretrained origin of an adapted model: ``cliplab.json`` → ``"base": {path, fingerprint}``.

Adapted models and adapters record which weights they started from, so WiSE-FT, adapter
loading and merging can check that two checkpoints share an origin instead of silently mixing
unrelated weights. The record and its fingerprint are `cliplab.merge.origin`'s, so a model
fine-tuned here merges with `cliplab merge --base` without a mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

from cliplab.errors import ModelError
from cliplab.merge.origin import read_origin, weights_fingerprint
from cliplab.models.dual_encoder import CLIPLAB_FILE, DualEncoder


def model_fingerprint(model: DualEncoder) -> str:
    """`weights_fingerprint` of the model's weights: equal iff the same weights."""
    return weights_fingerprint(model.model.state_dict())


def record_base(folder: str | Path, base_path: str, fingerprint: str, **extra) -> None:
    """Add ``"base": {"path", "fingerprint"}`` (and ``extra`` keys) to the folder's cliplab.json."""
    file = Path(folder) / CLIPLAB_FILE
    meta = json.loads(file.read_text()) if file.is_file() else {}
    meta["base"] = {"path": str(base_path), "fingerprint": fingerprint}
    meta.update(extra)
    file.write_text(json.dumps(meta, indent=2))


def read_base(folder: str | Path) -> dict:
    """The ``base`` record of an adapted model or adapter folder."""
    base = read_origin(folder)
    if base is None:
        raise ModelError(f"{folder} records no pretrained origin (no 'base' in {CLIPLAB_FILE}); "
                         "it was not written by `cliplab adapt`")
    return base


def check_same_origin(folder: str | Path, base: DualEncoder, base_name: str) -> None:
    """Raise a clear error unless ``folder`` was adapted from exactly the weights of ``base``."""
    recorded = read_base(folder)
    found = model_fingerprint(base)
    if recorded["fingerprint"] != found:
        raise ModelError(f"{folder} was adapted from {recorded['path']} (fingerprint "
                         f"{recorded['fingerprint']}), but {base_name} has fingerprint {found}: "
                         "give the model it was trained from")
