"""Reading OpenCLIP checkpoints: where the weights and the model config are, and their tensors.

OpenCLIP writes three shapes of checkpoint:

- a training checkpoint ``epoch_N.pt`` (``{"epoch", "name", "state_dict", "optimizer"}``; under
  DDP every key starts with ``module.``), beside which the user gives the model config JSON;
- a bare state dict (``.pt``/``.bin``/``.safetensors``) as ``open_clip.create_model(...,
  pretrained=FILE)`` reads it;
- a Hub folder: ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) +
  ``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``); timm's Hub repos add a
  ``config.json`` of their own (no dual-encoder ``model_type``), which does not make them HF
  model folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cliplab.errors import ModelError, UnknownModelError
from cliplab.models.loading import MODEL_CLASSES

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class OpenClipCheckpoint:
    """An OpenCLIP checkpoint read into memory: its weights, model config and preprocessing."""

    weights_file: Path
    config_file: Path
    state_dict: dict[str, torch.Tensor]
    model_cfg: dict
    preprocess_cfg: dict = field(default_factory=dict)


def find_openclip_files(path: str | Path, config: str | Path | None = None) -> tuple[Path, Path]:
    """``(weights_file, config_file)`` of a Hub-style folder or of a weights file (whose config
    is ``config``, or an ``open_clip_config.json`` / single ``*.json`` beside it)."""
    given, path = str(path), Path(path)
    if path.is_dir():
        weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise ModelError(f"{path}: no OpenCLIP weights ({' or '.join(WEIGHT_FILES)})")
        if config:
            cfg = Path(config)
        elif (path / CONFIG_FILE).is_file():
            cfg = path / CONFIG_FILE
        else:
            raise ModelError(f"{path}: no {CONFIG_FILE}; give the model config with --config")
    elif not path.is_file():
        raise UnknownModelError(f"{path}: no such OpenCLIP checkpoint file or folder",
                                given)
    elif config:
        weights, cfg = path, Path(config)
    else:
        beside = [p for p in sorted(path.parent.glob("*.json")) if _looks_like_config(p)]
        named = path.parent / CONFIG_FILE
        if named.is_file():
            cfg = named
        elif len(beside) == 1:
            cfg = beside[0]
        else:
            raise ModelError(f"{path}: give the OpenCLIP model config JSON (e.g. ViT-B-32.json) "
                             "with --config; none or several *.json files lie beside it")
        weights = path
    if not cfg.is_file():
        raise ModelError(f"{cfg}: no such OpenCLIP model config file")
    return weights, cfg


def _looks_like_config(file: Path) -> bool:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and ("model_cfg" in data or "vision_cfg" in data)


def read_openclip_config(file: Path) -> tuple[dict, dict]:
    """``(model_cfg, preprocess_cfg)`` from a model config JSON or an ``open_clip_config.json``."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{file}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file}: an OpenCLIP config must be a JSON object")
    model_cfg = data["model_cfg"] if "model_cfg" in data else data
    pre = data.get("preprocess_cfg") or {}
    if not isinstance(model_cfg, dict):
        raise ModelError(f"{file}: model_cfg must be a JSON object, not {model_cfg!r}")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise ModelError(f"{file}: OpenCLIP model config has no {key!r}")
    for key, value in (("vision_cfg", model_cfg["vision_cfg"]),
                       ("text_cfg", model_cfg["text_cfg"]), ("preprocess_cfg", pre),
                       ("model_cfg.preprocess_cfg", model_cfg.get("preprocess_cfg") or {})):
        if not isinstance(value, dict):
            raise ModelError(f"{file}: {key} must be a JSON object, not {value!r}")
    return model_cfg, pre


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, ``state_dict`` unwrapped and DDP's ``module.`` removed.

    Torch files are read with ``weights_only=True``: nothing in them is unpickled as code."""
    file = Path(file)
    if file.suffix not in WEIGHT_SUFFIXES:
        raise ModelError(f"{file}: not an OpenCLIP weights file ({', '.join(WEIGHT_SUFFIXES)})")
    if file.suffix != ".safetensors" and not _is_torch_file(file):
        raise ModelError(f"{file}: not a PyTorch checkpoint (torch.save writes a zip archive or "
                         "a pickle; this file is neither); give an OpenCLIP .pt/.bin state dict "
                         "or a .safetensors file")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            data = load_file(str(file))
        else:
            data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, zip and unpickling errors have no common base
        if "Weights only load failed" in str(err):
            raise ModelError(f"{file}: the checkpoint holds Python objects besides tensors, and "
                             "cliplab reads checkpoints weights-only (it never runs pickled "
                             "code); save the state dict alone, or as .safetensors") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelError(f"{file}: cannot read the checkpoint ({type(err).__name__}"
                         f"{': ' + first if first else ''}); is it a PyTorch or safetensors "
                         "file?") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise ModelError(f"{file}: not a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


def _is_torch_file(file: Path) -> bool:
    """Whether ``file`` starts as ``torch.save`` output does: a zip archive (since PyTorch 1.6)
    or a pickle (the legacy format). Without this check a file of anything else reaches
    ``torch.load``'s weights-only unpickler, whose error reads as if the file held objects."""
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise ModelError(f"{file}: cannot be read ({err.strerror})") from None
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def read_openclip(path: str | Path, config: str | Path | None = None) -> OpenClipCheckpoint:
    """Read an OpenCLIP checkpoint (file or Hub folder) and its config."""
    weights, cfg = find_openclip_files(path, config)
    model_cfg, pre = read_openclip_config(cfg)
    return OpenClipCheckpoint(weights, cfg, read_state_dict(weights), model_cfg, pre)


def is_hf_model_folder(folder: Path) -> bool:
    """Whether ``folder``'s ``config.json`` is that of a dual encoder transformers loads (its
    ``model_type`` one of cliplab's; timm's config.json has none)."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("model_type") in MODEL_CLASSES


def is_openclip_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` looks like an OpenCLIP checkpoint cliplab can import (a folder with
    ``open_clip_config.json`` and weights, or a weights file with a config JSON beside it);
    HF model folders (a ``config.json`` of a dual encoder) are not, even with OpenCLIP files
    beside it."""
    path = Path(path)
    if path.is_dir():
        return (path / CONFIG_FILE).is_file() and not is_hf_model_folder(path) \
            and any((path / n).is_file() for n in WEIGHT_FILES)
    if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
        try:
            find_openclip_files(path)
        except ModelError:
            return False
        return True
    return False
