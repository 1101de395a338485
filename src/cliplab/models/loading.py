"""Reading a model folder's config, weights and tokenizer, with every way a folder can be
damaged (missing or truncated files, bad JSON, weights that do not fit the config) turned into
one `ModelError` line that names the file and what is wrong."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoTokenizer, CLIPModel, PretrainedConfig,
                          PreTrainedModel, SiglipModel, VisionTextDualEncoderModel)
from transformers.utils import logging as hf_logging

from cliplab.errors import ModelError, first_line, last_line
from cliplab.models.folder import read_json

MODEL_CLASSES = {
    "clip": CLIPModel,
    "siglip": SiglipModel,
    "vision-text-dual-encoder": VisionTextDualEncoderModel,
}
CONFIG_FILE = "config.json"
# in the order transformers prefers them
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# a folder holding one of these has a tokenizer (output_folder.TOKENIZER_FILES: all it may hold)
TOKENIZER_VOCABULARIES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model",
                          "tokenizer.model", "sentencepiece.bpe.model")
# buffers older checkpoints stored and current models compute instead
IGNORED_UNEXPECTED = ("position_ids",)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' per-load weight reports and shard bars hidden inside the block (cliplab
    checks and reports loads itself), its logging as the user had it after: a library does
    not change another's for the whole process (the CLI quiets it for its own)."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_config(path: Path) -> PretrainedConfig:
    """The folder's HF config, which must be one of the dual encoders cliplab handles."""
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise ModelError(f"{path} is not a model folder (no such folder); give a folder "
                         "written by `cliplab` or HF `save_pretrained`, or a preset name")
    if not file.is_file():
        raise ModelError(f"{path} is not a model folder (no {CONFIG_FILE}); give a folder "
                         "written by `cliplab` or HF `save_pretrained`, or a preset name")
    raw = read_json(file)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in MODEL_CLASSES:
        raise ModelError(f"{file}: model type {model_type!r} is not a dual encoder cliplab "
                         f"handles ({', '.join(sorted(MODEL_CLASSES))})")
    from huggingface_hub.errors import StrictDataclassError

    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(path)
    except StrictDataclassError as err:  # transformers' checks, e.g. width not a multiple of heads
        raise ModelError(f"{file}: not a valid {model_type} config ({last_line(err)})") \
            from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{file}: not a valid {model_type} config ({first_line(err)})") \
            from None


def weights_file(path: Path) -> Path:
    """The weights file transformers will read from the folder."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise ModelError(f"{path}: no weights ({' or '.join(WEIGHT_FILES[::2])})")


def load_weights(path: Path, config: PretrainedConfig) -> PreTrainedModel:
    """The HF model of ``config`` with the folder's weights, which must fit it exactly: no
    tensor of another shape, none missing, none left over. Always float32, whatever dtype the
    folder was saved in (transformers would keep a saved fp16/bf16): cliplab's ``precision``
    options choose the compute dtype by autocast. Without transformers' Hub kernels: on a GPU
    they are fetched from the Hub when the model first changes train/eval mode (offline: an
    error; online: code cliplab did not ask for)."""
    file = weights_file(path)
    model_cls = MODEL_CLASSES[config.model_type]
    try:
        with quiet_transformers():
            model, info = model_cls.from_pretrained(path, config=config,
                                                    output_loading_info=True,
                                                    ignore_mismatched_sizes=True,
                                                    dtype=torch.float32, use_kernels=False)
    except Exception as err:  # safetensors, torch and transformers each raise their own
        raise ModelError(f"{file}: cannot be read, truncated or not a weights file "
                         f"({first_line(err)})") from None
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    if mismatched:
        key, found, expected = mismatched[0]
        raise ModelError(f"{file}: weights do not fit {path / CONFIG_FILE}: {key} has shape "
                         f"{list(found)} in the file, {list(expected)} in the config"
                         + _more(mismatched))
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(f"{file}: weights do not fit {path / CONFIG_FILE}: {missing[0]} "
                         "is missing from the file" + _more(missing))
    unexpected = sorted(k for k in info.get("unexpected_keys") or []
                        if not k.endswith(IGNORED_UNEXPECTED))
    if unexpected:
        raise ModelError(f"{file}: weights do not fit {path / CONFIG_FILE}: the file has "
                         f"{unexpected[0]}, which the config has no place for" + _more(unexpected))
    return model


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer's vocabulary (`TOKENIZER_VOCABULARIES`)."""
    return any((folder / name).is_file() for name in TOKENIZER_VOCABULARIES)


def load_tokenizer(path: Path):
    """The folder's tokenizer (``tokenizer.json`` or a vocabulary file must be there:
    transformers would otherwise build an empty one without a word)."""
    if not has_tokenizer(path):
        raise ModelError(f"{path}: no tokenizer ({' or '.join(TOKENIZER_VOCABULARIES[:3])}); save "
                         "one there with tokenizer.save_pretrained(FOLDER)")
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
            # one that loads may still fail on first use (a tokenizer.json without its
            # tokenizer_config.json names no unknown token the vocabulary holds)
            tokenizer(["a photo"], truncation=True)
            return tokenizer
    except Exception as err:  # the tokenizers library raises plain Exceptions on bad files
        missing = "" if (path / "tokenizer_config.json").is_file() else \
            "; tokenizer_config.json is missing"
        raise ModelError(f"{path}: the tokenizer cannot be read ({first_line(err)}){missing}") \
            from None
