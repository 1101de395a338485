"""cliplab/transformers ``CLIPModel`` → OpenCLIP Hub folder (``cliplab export --format open_clip``).

Writes ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and
``open_clip_model.safetensors``, the layout ``open_clip.create_model_from_pretrained(
"local-dir:DIR")`` and ``hf-hub:`` read. A model whose tokenizer is not CLIP's BPE carries its
tokenizer files in the folder and names it in ``text_cfg.hf_tokenizer_name`` as ``"."`` (the
folder itself: OpenCLIP's ``local-dir:`` loader reads the files from the folder, cliplab reads
the name relative to the config; no machine path is written, so the folder can move; before
pushing it to the Hub, set the name to the repository id, which OpenCLIP's ``hf-hub:`` loader
reads), pooled at its end token (``pool_type: eos``). ``open_clip_export.json`` (`EXPORT_FILE`)
records under ``source`` what the folder was made from, as ``onnx_export.json`` does (OpenCLIP
reads its config's keys, so the record is a file of its own).
"""

from __future__ import annotations

import json
from pathlib import Path

from cliplab.errors import ModelError
from cliplab.file_modes import save_tensors
from cliplab.models.convert.atomic import atomic_folder
from cliplab.models.convert.openclip_config import CLIP_EOT_ID, openclip_config_from_clip
from cliplab.models.convert.openclip_files import CONFIG_FILE, WEIGHT_FILES
from cliplab.models.convert.openclip_weights import hf_to_openclip
from cliplab.models.dual_encoder import DualEncoder
from cliplab.output_folder import TOKENIZER_FILES, OutputFiles
from cliplab.provenance import stamp


def _is_clip_bpe(tokenizer) -> bool:
    return type(tokenizer).__name__.startswith("CLIPTokenizer") and len(tokenizer) == 49408 \
        and tokenizer.eos_token_id == CLIP_EOT_ID


def openclip_state_and_config(model: DualEncoder, tokenizer_name: str | None = None
                              ) -> tuple[dict, dict]:
    """``(state_dict, open_clip_config)`` of a CLIP `DualEncoder` in OpenCLIP's format."""
    if model.kind != "clip":
        raise ModelError(f"OpenCLIP export applies to CLIP towers only; this model is "
                         f"{model.kind!r} (export it with --format onnx instead)")
    if model.text_pooling != "model":
        raise ModelError("OpenCLIP export needs a text tower pooled at its end token; this model "
                         f"pools text by {model.text_pooling!r}")
    clip_bpe = _is_clip_bpe(model.tokenizer)
    text = model.model.config.text_config
    if text.eos_token_id == 2:
        eos = None  # HF's legacy argmax pooling: OpenCLIP's default 'argmax'
    else:
        eos = None if clip_bpe else text.eos_token_id
    model_cfg = openclip_config_from_clip(model.model.config, eos,
                                          None if clip_bpe else (tokenizer_name or "."))
    model_cfg["text_cfg"]["context_length"] = text.max_position_embeddings
    pre = model.preprocess_config
    preprocess_cfg = dict(size=pre.image_size, mean=list(pre.mean), std=list(pre.std),
                          interpolation=pre.interpolation, resize_mode=pre.resize_mode)
    state = {k: v.detach().cpu().contiguous()
             for k, v in hf_to_openclip(model.model.state_dict()).items()}
    return state, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


EXPORT_FILE = "open_clip_export.json"

# a previous OpenCLIP export: what `export_openclip` writes, and nothing else (exports made
# before the record was written have none)
OPENCLIP_EXPORT = OutputFiles((CONFIG_FILE, WEIGHT_FILES[0]), TOKENIZER_FILES | {EXPORT_FILE})


def export_openclip(model: DualEncoder, out: str | Path, overwrite: bool = False,
                    inputs=(), source: dict | None = None) -> Path:
    """Write ``model`` as an OpenCLIP folder at ``out`` (temporary folder, then moved;
    ``overwrite``: replacing a previous OpenCLIP export there; never one of the ``inputs``).
    ``source`` (what the model was loaded from, `cliplab.models.resolve.export_source`), if
    given, is kept in ``open_clip_export.json``."""
    out = Path(out)
    state, config = openclip_state_and_config(model, tokenizer_name=".")
    with atomic_folder(out, overwrite, "OpenCLIP export", OPENCLIP_EXPORT, inputs) as tmp:
        save_tensors(state, str(tmp / WEIGHT_FILES[0]))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if source is not None:  # a model given in Python without it: nothing to record
            (tmp / EXPORT_FILE).write_text(json.dumps(stamp({"source": source}), indent=2)
                                           + "\n", encoding="utf-8")
        if "hf_tokenizer_name" in config["model_cfg"]["text_cfg"]:
            model.tokenizer.save_pretrained(tmp)
    return out
