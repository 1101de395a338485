"""The files beside the weights that plain transformers tools read: ``preprocessor_config.json``
(so ``AutoProcessor`` and ``pipeline("zero-shot-image-classification")`` open a folder cliplab
saved, preprocessing images as cliplab does) and the model card ``README.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

from cliplab.errors import ModelError
from cliplab.models.preprocess import PreprocessConfig

PROCESSOR_FILE = "preprocessor_config.json"
COMBINED_PROCESSOR_FILE = "processor_config.json"  # transformers' newer processor.save_pretrained
CARD_FILE = "README.md"
PIL_BILINEAR = 2


def image_processor_config(pre: PreprocessConfig) -> dict:
    """A ``CLIPImageProcessor`` config doing what `ImagePreprocessor` does at eval time: resize
    the shorter side to ``image_size`` (bilinear), crop the centre square, scale to [0, 1],
    normalise. Used for every kind (SigLIP's own processor squashes non-square images instead
    of cropping them, which cliplab does not)."""
    size = int(pre.image_size)
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True,
            "do_resize": True, "size": {"shortest_edge": size}, "resample": PIL_BILINEAR,
            "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(pre.mean), "image_std": list(pre.std)}


def write_processor_config(folder: str | Path, pre: PreprocessConfig) -> Path:
    file = Path(folder) / PROCESSOR_FILE
    file.write_text(json.dumps(image_processor_config(pre), indent=2))
    return file


def preprocess_from_processor_config(folder: str | Path, image_size: int) -> PreprocessConfig:
    """cliplab's eval preprocessing from a folder's ``preprocessor_config.json`` (size, mean,
    std) or, as newer transformers save a processor, ``processor_config.json``'s
    ``image_processor``; the model's ``image_size`` with CLIP's normalisation when it has
    neither."""
    pre = PreprocessConfig(image_size=image_size)
    file = Path(folder) / PROCESSOR_FILE
    if not file.is_file():
        file = Path(folder) / COMBINED_PROCESSOR_FILE
        if not file.is_file():
            return pre
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{file}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if file.name == COMBINED_PROCESSOR_FILE:
        d = d.get("image_processor") if isinstance(d, dict) else None
        if not isinstance(d, dict):
            return pre
    crop = d.get("crop_size") or d.get("size") or image_size
    if isinstance(crop, dict):
        crop = crop.get("height") or crop.get("shortest_edge") or image_size
    pre.image_size = int(crop)
    pre.mean = tuple(d.get("image_mean", pre.mean))
    pre.std = tuple(d.get("image_std", pre.std))
    return pre


def model_card(kind: str, text_pooling: str, context_length: int) -> str:
    """The saved folder's README: what it is and how to open it outside cliplab."""
    lines = ["---", "library_name: transformers",
             "tags: [cliplab, clip, zero-shot-image-classification]", "---", "", "# A cliplab dual encoder", "",
             f"A contrastive image-text model ({kind}) saved by cliplab: `config.json` and "
             "`model.safetensors` are a plain Hugging Face transformers model, with its "
             "tokenizer and `preprocessor_config.json` (cliplab's resize, centre crop and "
             "normalisation); `cliplab.json` holds cliplab's own settings (preprocessing, "
             "text pooling, context length, and where the weights came from).", "",
             "In cliplab: `cliplab eval --model THIS_FOLDER ...` or "
             "`cliplab.models.resolve.load_model(\"THIS_FOLDER\")`.", ""]
    if text_pooling == "mean" or kind == "vision-text-dual-encoder":
        lines += ["## Warning: plain transformers does not reproduce this model", "",
                  "Its text embedding is the **mean of the text tower's token states** "
                  "(sentence-transformers pooling), then the projection. "
                  "`VisionTextDualEncoderModel` (and so `pipeline(\"zero-shot-image-"
                  "classification\")`) pools at the first token instead, so texts embedded "
                  "outside cliplab land elsewhere and zero-shot scores there are wrong. "
                  "`from_pretrained` still loads the weights; use cliplab to embed text.", ""]
    else:
        lines += ["Outside cliplab it opens as any HF model:", "", "```python",
                  "from transformers import pipeline",
                  "classify = pipeline(\"zero-shot-image-classification\", model=\"THIS_FOLDER\")",
                  "classify(image, candidate_labels=[\"cat\", \"dog\"])", "```", ""]
        if kind == "siglip":
            lines += ["The pipeline's SigLIP scores are per-label sigmoids (they need not sum "
                      "to 1). SigLIP pools its text at the last position, so texts must be "
                      f"padded to this model's context length, {context_length} tokens: the "
                      "pipeline pads to 64 unless given "
                      f"`tokenizer_kwargs={{\"max_length\": {context_length}}}`.", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, kind: str, text_pooling: str,
                     context_length: int) -> Path:
    file = Path(folder) / CARD_FILE
    file.write_text(model_card(kind, text_pooling, context_length))
    return file
