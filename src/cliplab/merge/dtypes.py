"""The dtype a merged folder is saved in: the inputs' stored floating dtype when they all share
one (merging itself computes in float32), float32 when they differ."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from cliplab.errors import ModelError, first_line
from cliplab.models.loading import weights_file

# safetensors' dtype codes of floating tensors, as torch names them
SAFETENSORS_FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
# what a folder mixing floating dtypes (e.g. float16 weights, float32 norms) is recorded as
MIXED = "mixed"


def _safetensors_floats(file: Path) -> set[str]:
    """The floating dtypes ``file`` (a safetensors file) stores, read from its header only."""
    with safe_open(str(file), "pt") as f:
        codes = {f.get_slice(key).get_dtype() for key in f.keys()}
    return {SAFETENSORS_FLOATS[c] for c in codes if c in SAFETENSORS_FLOATS}


def _pickle_floats(file: Path) -> set[str]:
    """The floating dtypes ``file`` (a torch ``.bin``) stores (memory-mapped, not read)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        state = torch.load(file, map_location="cpu", weights_only=True)
    return {str(t.dtype).removeprefix("torch.") for t in state.values()
            if isinstance(t, torch.Tensor) and t.is_floating_point()}


def _shards(file: Path) -> list[Path]:
    """The weight files ``file`` stands for (an ``*.index.json`` names its shards)."""
    if not file.name.endswith(".index.json"):
        return [file]
    weight_map = json.loads(file.read_text(encoding="utf-8")).get("weight_map", {})
    return [file.parent / name for name in sorted(set(weight_map.values()))]


def stored_dtype(folder: str | Path) -> str:
    """The floating dtype a model folder's weights are stored in (``float16``, ``bfloat16``,
    ``float32``…), or ``mixed`` when they hold more than one."""
    file = weights_file(Path(folder))
    found: set[str] = set()
    try:
        for shard in _shards(file):
            found |= (_safetensors_floats(shard) if shard.suffix == ".safetensors"
                      else _pickle_floats(shard))
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"{file}: cannot be read ({first_line(err)})") from None
    return found.pop() if len(found) == 1 else MIXED


def merged_dtype(dtypes: Sequence[str]) -> torch.dtype:
    """The dtype to save a merge of inputs stored in ``dtypes`` in: their one floating dtype
    when they share it, float32 otherwise (mixed or differing inputs)."""
    if len(set(dtypes)) == 1 and dtypes[0] != MIXED:
        return getattr(torch, dtypes[0])
    return torch.float32


def dtype_record(names: Sequence[str], dtypes: Sequence[str]) -> dict:
    """What ``merge.json`` says about dtypes: the saved one, each input's and why."""
    saved = str(merged_dtype(dtypes)).removeprefix("torch.")
    why = ("the inputs' common dtype" if len(set(dtypes)) == 1 and dtypes[0] != MIXED
           else "the inputs' dtypes differ, so float32 (what the merge computes in)")
    return {"dtype": saved, "dtype_reason": why, "input_dtypes": dict(zip(names, dtypes))}


def set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """Make every ``dtype`` / ``torch_dtype`` field of a saved ``config.json`` (sub-configs'
    too) name ``dtype``, the dtype its weights were saved in."""
    name = str(dtype).removeprefix("torch.")

    def fix(d: dict) -> dict:
        return {k: (name if k in ("dtype", "torch_dtype") else
                    fix(v) if isinstance(v, dict) else v) for k, v in d.items()}
    config = fix(json.loads(config_file.read_text(encoding="utf-8")))
    config.setdefault("dtype", name)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
