"""Reading the model folders a merge combines, checking they can be combined, and writing
the merged folder."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cliplab.config import changed_key_paths
from cliplab.errors import ModelError, UnknownModelError
from cliplab.merge.dtypes import set_config_dtype, stored_dtype
from cliplab.merge.state import check_same_keys, non_finite
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.folder import (CLIPLAB_FILE, read_meta, read_origin, weights_fingerprint,
                                  write_origin)
from cliplab.models.hf_files import COMBINED_PROCESSOR_FILE, PROCESSOR_FILE
from cliplab.models.loading import TOKENIZER_VOCABULARIES
from cliplab.models.presets import PRESETS
from cliplab.models.resolve import is_hub_id, resolve_model_path
from cliplab.output_folder import built_beside, write_json
from cliplab.provenance import stamp
from cliplab.runs import CHECKPOINTS

# config.json fields that say nothing about the architecture (tensor dtypes are checked per
# tensor; a saved dtype field changes when a model is loaded and saved again)
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "dtype",
                        "torch_dtype", "architectures"}
# the preprocessing fields that decide how a model reads an image (augment is training-only)
READ_PREPROCESS_KEYS = ("image_size", "mean", "std", "resize_mode", "interpolation")
# tokenizer.json's run-time settings, not how it maps texts to ids (where it truncates is
# context_length, compared on its own)
TOKENIZER_SETTINGS = ("truncation", "padding")
# the files a tokenizer without a tokenizers backend (e.g. sentencepiece) reads its vocabulary from
TOKENIZER_FILES = (*TOKENIZER_VOCABULARIES, "merges.txt")
# a field as it is used (the value cliplab resolves on loading) and the file it comes from
Reading = dict[str, tuple[object, Path]]


@dataclass
class Ingredient:
    """One model folder: its weights (as the loaded HF model names them), its config and
    cliplab metadata, its weight fingerprint and its recorded pretrained origin (if any)."""

    path: Path
    state: dict[str, torch.Tensor]
    config: dict
    meta: dict
    fingerprint: str
    origin: dict | None
    reading: Reading
    dtype: str  # the floating dtype its weights are stored in (`stored_dtype`)

    @property
    def name(self) -> str:
        return str(self.path)


def ingredient_folder(name: str, option: str) -> Path:
    """The model folder a merge input names, as the resolver finds it for every command (a
    model, checkpoint or run folder, or a Hub id in the local cache); presets, built in
    memory, have none. ``option`` (``--models``, ``--base``) names the input in errors."""
    if name in PRESETS:
        raise ModelError(f"merge needs model folders; {name} ({option}) is a preset: save it "
                         "to a folder first")
    if not Path(name).expanduser().exists() and not is_hub_id(name):
        raise UnknownModelError(f"{name} does not exist (merge needs a model, checkpoint or "
                                "run folder, or a Hugging Face Hub id)", name, option)
    folder = resolve_model_path(name)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{name} is not a model folder (no config.json): a merge combines "
                         "folders written by cliplab or HF save_pretrained, or run/checkpoint "
                         f"folders holding one{_not_a_model_hint(name, folder)}")
    return folder


def _not_a_model_hint(name: str, folder: Path) -> str:
    """What to do with ``folder`` (given as ``name``) that holds no model but something cliplab
    knows: an OpenCLIP checkpoint, an ONNX export, a LoRA adapter (empty: none of them)."""
    from cliplab.models.convert.openclip_files import is_openclip_checkpoint
    from cliplab.models.onnx_encoder import is_onnx_export

    if is_openclip_checkpoint(folder):
        return (f"; an OpenCLIP checkpoint: convert it first, cliplab convert --from open_clip "
                f"{name} --out DIR")
    if is_onnx_export(folder):
        return ("; an ONNX export holds graphs, not weights to merge: merge the models it was "
                "exported from")
    if (folder / "adapter_config.json").is_file():
        # RUN/checkpoints/step-N/adapter: the run's options.merge=true wrote RUN/merged
        run = folder.parent.parent.parent
        merged = run / "merged"
        if folder.parent.parent.name == CHECKPOINTS and (merged / "config.json").is_file():
            return f"; a LoRA adapter: its run's merged model is {merged}: give that"
        return ("; a LoRA adapter, not a whole model: load it with cliplab.adapt.lora.load_lora, "
                "or run adapt --method lora with options.merge=true for a whole model folder "
                "(RUN/merged)")
    return ""


def load_ingredient(path: str | Path) -> Ingredient:
    """Load a model folder's weights through `DualEncoder.load` (so HF's own key conversions
    apply) with its config, metadata, origin record, how it reads its inputs and its stored
    dtype. ``path`` may be a model, checkpoint or run folder, as `cliplab merge` takes."""
    path = ingredient_folder(str(path), "load_ingredient")
    model = DualEncoder.load(path)
    state = {k: v.detach() for k, v in model.model.state_dict().items()}
    broken = non_finite(state)
    if broken:  # averaged in, they spread over the tensor; TIES would drop them unsaid
        key, bad, total = broken
        raise ModelError(f"{path}: {total} weights are NaN or infinite ({bad} of them in "
                         f"{key!r}): a broken model (a training run that diverged?) merges "
                         "into a broken model")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    meta = read_meta(path)
    return Ingredient(path, state, config, meta, weights_fingerprint(state), read_origin(path),
                      model_reading(model, path, meta), stored_dtype(path))


def _source(path: Path, meta: dict, key: str, fallbacks: tuple[str, ...]) -> Path:
    """The file a loaded field comes from: ``cliplab.json`` when it holds ``key``, else the
    first of ``fallbacks`` the folder has (``config.json`` when none)."""
    if key in meta:
        return path / CLIPLAB_FILE
    return next((path / f for f in fallbacks if (path / f).is_file()), path / "config.json")


def model_reading(model: DualEncoder, path: Path, meta: dict) -> Reading:
    """How ``model`` (loaded from ``path``) reads its inputs, as `DualEncoder.load` resolved it
    from cliplab.json or the HF processor/tokenizer files: each field with its source file."""
    pre = model.preprocess_config.to_dict()
    pre_file = _source(path, meta, "preprocess", (PROCESSOR_FILE, COMBINED_PROCESSOR_FILE))
    reading: Reading = {f"preprocess.{k}": (pre[k], pre_file) for k in READ_PREPROCESS_KEYS}
    reading["text_pooling"] = (model.text_pooling, _source(path, meta, "text_pooling", ()))
    reading["context_length"] = (model.context_length, _source(
        path, meta, "context_length", ("tokenizer_config.json",)))
    reading["tokenizer"] = tokenizer_fingerprint(model.tokenizer, path)
    return reading


def tokenizer_fingerprint(tokenizer, path: Path) -> tuple[str, Path]:
    """A hash of the ids ``tokenizer`` (loaded from ``path``) gives texts, with the file it
    comes from: its tokenizer.json content (vocabulary, merges, normaliser, pre- and
    post-processing, special tokens) as canonical JSON without the run-time settings, so the
    same tokenizer saved in two folders hashes the same; for a tokenizer without a tokenizers
    backend, the bytes of the vocabulary files the folder holds."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest = hashlib.sha256()
    if backend is not None:
        content = json.loads(backend.to_str())
        for key in TOKENIZER_SETTINGS:
            content.pop(key, None)
        digest.update(json.dumps(content, sort_keys=True).encode("utf-8"))
        files = [path / "tokenizer.json"]
    else:
        files = [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
        for file in files:
            digest.update(file.name.encode("utf-8") + b"\0" + file.read_bytes())
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    digest.update(special.encode("utf-8"))
    return digest.hexdigest(), (files[0] if files else path)


def _same(a, b) -> bool:
    """Equal values, floats (alone or in tuples) to 1e-6 relative (JSON round trips)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def check_reading(ref: Ingredient, ing: Ingredient) -> None:
    """``ing`` reads images and texts as ``ref`` does (one-line error naming both files)."""
    for key, (want, ref_file) in ref.reading.items():
        got, file = ing.reading[key]
        if key == "tokenizer" and want != got:  # a hash: which file says more than its value
            raise ModelError(f"{file}: the tokenizer differs from {ref_file}'s (other token "
                             "ids or text normalisation); merged token embeddings would mix "
                             "rows meant for different tokens")
        if not _same(want, got):
            raise ModelError(f"{file}: {key!r} differs from {ref_file}'s ({_shown(got)} vs "
                             f"{_shown(want)}); merged weights would be read differently")


def _shown(value) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def first_difference(a, b) -> str | None:
    """The dotted path of the first differing field of two JSON-like values, or None."""
    return next(iter(changed_key_paths(a, b, VOLATILE_CONFIG_KEYS)), None)


def check_architecture(ingredients: list[Ingredient]) -> None:
    """Same model type and config, same resolved preprocessing/pooling, same tensor names,
    shapes and dtypes as the first ingredient; the error names the file and the key."""
    ref = ingredients[0]
    for ing in ingredients[1:]:
        kinds = ref.config.get("model_type"), ing.config.get("model_type")
        if kinds[0] != kinds[1]:  # named first: the field sorted first says less
            raise ModelError(f"{ing.path}/config.json is a {kinds[1]!r} model, "
                             f"{ref.path}/config.json a {kinds[0]!r} one: not the same "
                             "architecture")
        diff = first_difference(ref.config, ing.config)
        if diff is not None:
            raise ModelError(f"{ing.path}/config.json differs from {ref.path}/config.json at "
                             f"{diff!r}: not the same architecture")
        check_reading(ref, ing)
    check_same_keys([i.state for i in ingredients], [i.name for i in ingredients])


def check_origin(models: list[Ingredient], base: Ingredient | None) -> dict:
    """Every recorded ``base`` fingerprint must match the base model's (when given) and each
    other's. Returns ``{"fingerprint": ..., "path": ..., "unrecorded": [paths]}``."""
    recorded = [m for m in models if m.origin is not None]
    if base is not None:
        unrecorded = [m.name for m in models
                      if m.origin is None and m.fingerprint != base.fingerprint]
        for m in recorded:
            if m.origin["fingerprint"] != base.fingerprint:
                raise ModelError(f"{m.path}/{CLIPLAB_FILE}: fine-tuned from "
                                 f"{m.origin.get('path')} (fingerprint "
                                 f"{m.origin['fingerprint'][:12]}…), not from the base "
                                 f"{base.path} ({base.fingerprint[:12]}…)")
        return {"path": str(base.path), "fingerprint": base.fingerprint,
                "unrecorded": unrecorded}
    if recorded:
        ref = recorded[0]
        for m in recorded[1:]:
            if m.origin["fingerprint"] != ref.origin["fingerprint"]:
                raise ModelError(f"{m.path}/{CLIPLAB_FILE}: fine-tuned from "
                                 f"{m.origin.get('path')}, but {ref.path} from "
                                 f"{ref.origin.get('path')}: different pretrained origins")
        # the origin itself may be an ingredient (e.g. the zero-shot model in a soup)
        unrecorded = [m.name for m in models
                      if m.origin is None and m.fingerprint != ref.origin["fingerprint"]]
        return {**ref.origin, "unrecorded": unrecorded}
    return {"path": None, "fingerprint": None, "unrecorded": [m.name for m in models]}


def save_merged(template: str | Path, state: dict[str, torch.Tensor], out: str | Path,
                origin: dict | None, record: dict,
                dtype: torch.dtype = torch.float32, head=None) -> Path:
    """Write ``state`` as a normal model folder (config, tokenizer and cliplab.json of
    ``template``) in ``dtype`` plus ``merge.json`` (and ``head``'s ``head.safetensors``, a
    soup's averaged classifier); ``cliplab.json`` records the common pretrained origin.
    It is built in a hidden folder beside ``out`` and renamed to ``out`` complete (replacing
    what was there)."""
    out = Path(out)
    model = DualEncoder.load(template)
    try:
        model.model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"merged weights do not fit {template}: "
                         f"{str(err).splitlines()[0]}") from None
    model.model.to(dtype)
    broken = non_finite(model.model.state_dict())
    if broken:
        key, bad, total = broken
        raise ModelError(f"the merged weights hold {total} NaN or infinite values in {dtype} "
                         f"({bad} of them in {key!r}), so nothing was written: a scale too "
                         "large for the weights' dtype?")
    with built_beside(out) as work:
        model.save(work)
        set_config_dtype(work / "config.json", dtype)
        if origin and origin.get("fingerprint"):
            write_origin(work, origin.get("path"), origin["fingerprint"])
        if head is not None:
            head.save(work)
        write_json(work / "merge.json", stamp(record))  # the caller's record carries it too
    return out
