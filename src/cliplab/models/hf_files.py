"""The files beside the weights that plain transformers tools read: ``preprocessor_config.json``
(so ``AutoProcessor`` and ``pipeline("zero-shot-image-classification")`` open a folder cliplab
saved, preprocessing images as cliplab does) and the model card ``README.md``.

Both directions map exactly: what cliplab writes, transformers' ``CLIPImageProcessor`` and
``SiglipImageProcessor`` reproduce (to PIL's uint8 rounding); what cliplab reads from a plain HF
folder it reproduces, or refuses with a `ModelError` naming the key it cannot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NoReturn

from cliplab.errors import ModelError, warn
from cliplab.models.folder import CLIPLAB_FILE
from cliplab.models.preprocess import PreprocessConfig, are_finite_numbers

PROCESSOR_FILE = "preprocessor_config.json"
COMBINED_PROCESSOR_FILE = "processor_config.json"  # transformers' newer processor.save_pretrained
CARD_FILE = "README.md"
PIPELINE_SIGLIP_LENGTH = 64  # transformers' zero-shot pipeline pads SigLIP labels to this
# PIL.Image.Resampling codes, as transformers' `resample` holds them
PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}
PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box",
                      5: "hamming"}
LONGEST_NOTE = ("transformers' image processors cannot resize the longer side and pad to a "
                "centred square (cliplab's resize_mode 'longest'): preprocessor_config.json "
                "squashes the image to the square instead, so images preprocessed outside "
                "cliplab differ")


def image_processor_config(pre: PreprocessConfig) -> dict:
    """A ``CLIPImageProcessor`` config doing what `ImagePreprocessor` does at eval time: resize
    with ``pre``'s interpolation, either the shorter side to ``image_size`` then the centre
    square (``shortest``) or both sides to ``image_size`` (``squash``; ``longest`` is written
    as squash, see `LONGEST_NOTE`), scale to [0, 1], normalise."""
    size = int(pre.image_size)
    square = {"height": size, "width": size}
    crop = pre.resize_mode == "shortest"
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True,
            "do_resize": True, "size": {"shortest_edge": size} if crop else square,
            "resample": PIL_RESAMPLE[pre.interpolation],
            "do_center_crop": crop, "crop_size": square,
            "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(pre.mean), "image_std": list(pre.std)}


def write_processor_config(folder: str | Path, pre: PreprocessConfig) -> Path:
    file = Path(folder) / PROCESSOR_FILE
    if pre.resize_mode == "longest":
        warn(LONGEST_NOTE, stacklevel=2)  # once per process: every save would repeat it
    file.write_text(json.dumps(image_processor_config(pre), indent=2), encoding="utf-8")
    return file


# the image processor transformers pairs with a model type, whose defaults a folder without a
# processor file is read with
DEFAULT_PROCESSORS = {"siglip": "SiglipImageProcessor"}


def preprocess_from_processor_config(folder: str | Path, image_size: int,
                                     model_type: str = "clip") -> PreprocessConfig:
    """cliplab's eval preprocessing from a folder's ``preprocessor_config.json`` or, as newer
    transformers save a processor, ``processor_config.json``'s ``image_processor``, read as
    transformers reads it (its class's defaults for missing keys), which must make the model's
    ``image_size``. A folder with neither is read with the defaults of ``model_type``'s image
    processor (SigLIP's for ``siglip``, else CLIP's) at that size, with a warning naming the
    folder and what is assumed."""
    found = _processor_dict(Path(folder))
    if found is None:
        name = DEFAULT_PROCESSORS.get(model_type, "CLIPImageProcessor")
        raw = {"image_processor_type": name, "size": {"height": image_size, "width": image_size}}
        if name == "CLIPImageProcessor":
            raw.update(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size})
        pre = processor_to_preprocess(_image_processor("", raw), "", raw)
        warn(assumed_preprocessing_note(folder, pre, name), stacklevel=2)
        return pre
    where, raw = found
    pre = processor_to_preprocess(_image_processor(where, raw), where, raw)
    if pre.image_size != image_size:  # the towers take no other size (transformers fails too)
        _refuse(where, "crop_size" if pre.resize_mode == "shortest" else "size", raw,
                f"it makes {pre.image_size} px images; the model's config.json takes "
                f"{image_size} px")
    return pre


def processor_disagreement(folder: str | Path, pre: PreprocessConfig) -> str | None:
    """Where the folder's processor file reads images otherwise than ``pre`` (its
    ``cliplab.json``'s preprocessing, which cliplab uses): a warning naming the first differing
    field and both files, or None (they agree, there is no processor file, or ``pre`` is a
    ``longest`` resize, which a processor file can only write as a squash, as its card says)."""
    found = _processor_dict(Path(folder))
    if found is None or pre.resize_mode == "longest":
        return None
    where, raw = found
    file = where.rsplit(": ", 1)[0]
    uses = (f"cliplab uses {CLIPLAB_FILE}'s preprocessing, transformers the processor file's, "
            "so the two embed images differently")
    try:
        theirs = processor_to_preprocess(_image_processor(where, raw), where, raw)
    except ModelError as err:  # cliplab.json holds what the model was trained with
        return (f"{err}; {uses}: saving the model with cliplab writes a processor file that "
                "agrees")
    key = next((k for k in ("image_size", "mean", "std", "resize_mode", "interpolation")
                if not _same_setting(getattr(pre, k), getattr(theirs, k))), None)
    if key is None:
        return None
    return (f"{file} has {key} {_setting(getattr(theirs, key))}, {CLIPLAB_FILE} "
            f"{_setting(getattr(pre, key))}: {uses}; make them agree (without its 'preprocess' "
            f"record, {CLIPLAB_FILE} leaves the processor file to decide)")


def _same_setting(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))
    return a == b


def _setting(value) -> str:
    return "[" + ", ".join(f"{v:g}" for v in value) + "]" if isinstance(value, (tuple, list)) \
        else str(value)


def assumed_preprocessing_note(folder: str | Path, pre: PreprocessConfig, processor: str) -> str:
    """The warning for a folder without an image processor config: what is assumed, how to fix."""
    return (f"{folder} has no {PROCESSOR_FILE} (nor {COMBINED_PROCESSOR_FILE}): assuming "
            f"{processor}'s defaults at {pre.image_size} px (config.json's image_size): mean "
            f"{list(pre.mean)}, std {list(pre.std)}, resize_mode {pre.resize_mode!r}, "
            f"{pre.interpolation} interpolation; if the model was trained otherwise, add its "
            f"{PROCESSOR_FILE} to the folder")


def _processor_dict(folder: Path) -> tuple[str, dict] | None:
    """(where, the image processor's dict), ``where`` naming the file and the key path."""
    file = folder / PROCESSOR_FILE
    if not file.is_file():
        file = folder / COMBINED_PROCESSOR_FILE
        if not file.is_file():
            return None
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(f"{file}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if file.name == COMBINED_PROCESSOR_FILE:
        d = d.get("image_processor") if isinstance(d, dict) else None
        return (f"{file}: image_processor.", d) if isinstance(d, dict) else None
    if not isinstance(d, dict):
        raise ModelError(f"{file}: must hold a JSON object, not {type(d).__name__}")
    return f"{file}: ", d


def _image_processor(where: str, raw: dict):
    """The transformers image processor ``raw`` describes (its PIL backend, which reads the
    same keys as the torchvision one and needs no torchvision)."""
    from transformers.models.auto.image_processing_auto import \
        get_image_processor_class_from_name

    # older files name a feature extractor (ViTFeatureExtractor: ViTImageProcessor's keys)
    legacy = str(raw.get("feature_extractor_type") or "").replace("FeatureExtractor",
                                                                   "ImageProcessor")
    name = str(raw.get("image_processor_type") or legacy or "CLIPImageProcessor")
    name = name.removesuffix("Fast").removesuffix("Pil")
    cls = get_image_processor_class_from_name(name + "Pil") \
        or get_image_processor_class_from_name(name)
    if cls is None:
        raise ModelError(f"{where}image_processor_type {name!r} is not an image processor "
                         "transformers has; use CLIPImageProcessor's keys")
    try:
        return cls.from_dict(raw)
    except Exception as err:  # each processor validates its keys its own way
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{where}not a valid {name} config ({why})") from None


def processor_to_preprocess(processor, where: str, raw: dict) -> PreprocessConfig:
    """The `PreprocessConfig` doing what transformers' ``processor`` does, or a `ModelError`
    naming (after ``where``) the first key cliplab cannot reproduce."""
    if not processor.do_resize:
        _refuse(where, "do_resize", raw, "cliplab resizes every image to the model's size; "
                "set it to true")
    if not processor.do_rescale or not math.isclose(processor.rescale_factor, 1 / 255):
        _refuse(where, "rescale_factor" if processor.do_rescale else "do_rescale", raw,
                "cliplab scales pixels to [0, 1]: do_rescale true, rescale_factor 1/255")
    if getattr(processor, "do_pad", False):
        _refuse(where, "do_pad", raw, "cliplab pads only in its own 'longest' resize; set it "
                "to false")
    size, mode = _resize(processor, where, raw)
    mean, std = _normalisation(processor, where, raw)
    return PreprocessConfig(image_size=size, mean=mean, std=std, resize_mode=mode,
                            interpolation=_interpolation(processor, where, raw))


def _resize(processor, where: str, raw: dict) -> tuple[int, str]:
    """(image size, resize mode): ``shortest_edge`` with a centre crop of that square, or a
    square ``height``/``width`` without a crop (or with one of the same size)."""
    given = _size_fields(processor.size)
    # processors without a crop (ViT's) may lack the attributes
    crop = _size_fields(getattr(processor, "crop_size", None)) \
        if getattr(processor, "do_center_crop", False) else None
    crop = (crop.get("height"), crop.get("width")) if crop is not None else None
    if given.keys() == {"shortest_edge"}:
        side = given["shortest_edge"]
        if crop != (side, side):
            _refuse(where, "do_center_crop" if crop is None else "crop_size", raw,
                    f"after the shorter side is resized to {side}, cliplab crops the centre "
                    f"{side}x{side} square: do_center_crop true, crop_size {side}x{side}")
        return side, "shortest"
    if given.keys() == {"height", "width"} and given["height"] == given["width"]:
        if crop not in (None, (given["height"], given["width"])):
            _refuse(where, "crop_size", raw, "cliplab does not crop an image it squashed to "
                    "a square; set do_center_crop to false")
        return given["height"], "squash"
    _refuse(where, "size", raw, "cliplab resizes to {'shortest_edge': S} (then crops the "
            "centre) or to a square {'height': S, 'width': S} only")


def _size_fields(size) -> dict:
    """A processor's ``size`` / ``crop_size`` as a dict of its set fields (a ``SizeDict``
    in newer transformers, a plain dict in 5.0)."""
    fields = size if isinstance(size, dict) else vars(size) if size is not None else {}
    return {k: v for k, v in fields.items() if v is not None}


def _interpolation(processor, where: str, raw: dict) -> str:
    code = processor.resample
    code = 2 if code is None else code  # transformers' PIL backend resizes bilinear then
    by_code = {v: k for k, v in PIL_RESAMPLE.items()}
    if not isinstance(code, int) or code not in by_code:
        name = PIL_RESAMPLE_NAMES.get(code, "unknown") if isinstance(code, int) else "unknown"
        _refuse(where, "resample", raw, f"{name} is not an interpolation cliplab has; set 2 "
                "(bilinear) or 3 (bicubic)")
    return by_code[int(code)]


def _normalisation(processor, where: str, raw: dict) -> tuple[tuple, tuple]:
    """(mean, std) per channel: 0 and 1 without ``do_normalize``; a single number (which
    transformers allows) applies to all three channels."""
    if not processor.do_normalize:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return (_per_channel(processor.image_mean, "image_mean", where, raw),
            _per_channel(processor.image_std, "image_std", where, raw, positive=True))


def _per_channel(value, key: str, where: str, raw: dict, positive: bool = False) -> tuple:
    values = [value] * 3 if isinstance(value, (int, float)) else value
    if not are_finite_numbers(values, 3, positive):
        _refuse(where, key, raw, f"it must be 3 {'positive ' if positive else ''}numbers "
                "(R, G, B) or one for all three")
    return tuple(float(v) for v in values)


def _refuse(where: str, key: str, raw: dict, why: str) -> NoReturn:
    shown = json.dumps(raw[key]) if key in raw else "(not set: the processor's default)"
    raise ModelError(f"{where}{key} = {shown}: cliplab's preprocessing cannot do this ({why})")


# which texts plain transformers tokenizes as cliplab does: the saved tokenizer cannot hold
# the repair cliplab (as OpenCLIP) makes first
REPAIR_NOTE = ("that cliplab's repair before tokenizing (OpenCLIP's `ftfy.fix_text` and HTML "
               "unescaping) leaves as they are: HTML entities, mojibake, curly quotes, "
               "ligatures and full-width characters are changed by it; "
               "`html.unescape(html.unescape(ftfy.fix_text(text)))` repairs a text alike")


CARD_TITLE = "# A cliplab dual encoder"
HEAD_TITLE = "## Its fine-tuned classifier head"


def model_card(kind: str, text_pooling: str, context_length: int,
               resize_mode: str = "shortest") -> str:
    """The saved folder's README: what it is and how to open it outside cliplab."""
    lines = ["---", "library_name: transformers",
             "tags: [cliplab, clip, zero-shot-image-classification]", "---", "", CARD_TITLE, "",
             f"A contrastive image-text model ({kind}) saved by cliplab: `config.json` and "
             "`model.safetensors` are a plain Hugging Face transformers model, with its "
             "tokenizer and `preprocessor_config.json` (cliplab's resize, interpolation, "
             "centre crop if any, and normalisation); `cliplab.json` holds cliplab's own "
             "settings (preprocessing, text pooling, context length) and, when cliplab made "
             "the weights, where they came from (`trained_by`: the training run and step; "
             "`base`: the model fine-tuned, adapted or merged from; `converted_from`: the "
             "checkpoint converted).", "",
             "In cliplab: `cliplab eval --model THIS_FOLDER ...` or "
             "`cliplab.models.resolve.load_model(\"THIS_FOLDER\")`.", ""]
    if text_pooling == "mean":  # a VTDE pooling as its own model does is reproduced there
        lines += ["## Warning: plain transformers does not reproduce this model", "",
                  "Its text embedding is the **mean of the text tower's token states** "
                  "(sentence-transformers pooling), then the projection. "
                  "`VisionTextDualEncoderModel` (and so `pipeline(\"zero-shot-image-"
                  "classification\")`) pools at the first token instead, so texts embedded "
                  "outside cliplab land elsewhere and zero-shot scores there are wrong. "
                  "`from_pretrained` still loads the weights; use cliplab to embed text.", ""]
        lines += ["In plain transformers the text embedding is (equal to cliplab's for texts "
                  f"{REPAIR_NOTE}):", "",
                  "```python", "import torch",
                  "from transformers import AutoTokenizer, VisionTextDualEncoderModel",
                  "model = VisionTextDualEncoderModel.from_pretrained(\"THIS_FOLDER\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\")",
                  "batch = tokenizer(texts, padding=True, truncation=True, "
                  "return_tensors=\"pt\")",
                  "with torch.no_grad():",
                  "    states = model.text_model(**batch).last_hidden_state",
                  "    mask = batch[\"attention_mask\"].unsqueeze(-1).to(states.dtype)",
                  "    text_embeds = model.text_projection((states * mask).sum(1) / "
                  "mask.sum(1))", "```", ""]
    else:
        lines += ["Outside cliplab it opens as any HF model:", "", "```python",
                  "from transformers import pipeline",
                  "classify = pipeline(\"zero-shot-image-classification\", model=\"THIS_FOLDER\")",
                  "classify(image, candidate_labels=[\"cat\", \"dog\"])", "```", "",
                  f"Scores equal cliplab's for texts {REPAIR_NOTE}.", ""]
        if kind == "siglip":
            lines += ["The pipeline's SigLIP scores are per-label sigmoids (they need not sum "
                      "to 1).", ""]
        if kind == "siglip" and context_length != PIPELINE_SIGLIP_LENGTH:
            lines += ["SigLIP pools its text at the last position, so texts must be padded to "
                      f"this model's context length, {context_length} tokens; the pipeline "
                      f"pads SigLIP labels to {PIPELINE_SIGLIP_LENGTH} (it ignores "
                      "`tokenizer_kwargs`), so it does not score this model as cliplab does "
                      "(or fails). Embed the labels with the processor instead:", "",
                      "```python", "import torch",
                      "from transformers import AutoModel, AutoProcessor",
                      "model = AutoModel.from_pretrained(\"THIS_FOLDER\")",
                      "processor = AutoProcessor.from_pretrained(\"THIS_FOLDER\")",
                      "inputs = processor(text=[f\"This is a photo of {label}.\" for label in "
                      "labels], images=image,",
                      f"                   padding=\"max_length\", max_length={context_length}, "
                      "truncation=True, return_tensors=\"pt\")",
                      "with torch.no_grad():",
                      "    probs = torch.sigmoid(model(**inputs).logits_per_image)", "```", ""]
    if resize_mode == "longest":
        lines += ["## Warning: images preprocessed outside cliplab differ", "",
                  LONGEST_NOTE[0].upper() + LONGEST_NOTE[1:] + ". Preprocess images with "
                  "cliplab (`DualEncoder.preprocess`).", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, kind: str, text_pooling: str,
                     context_length: int, resize_mode: str = "shortest") -> Path:
    file = Path(folder) / CARD_FILE
    file.write_text(model_card(kind, text_pooling, context_length, resize_mode), encoding="utf-8")
    return file


def head_card_section(classes: int) -> str:
    """The model card's section on a ``head.safetensors`` of ``classes`` classes."""
    return "\n".join([
        HEAD_TITLE, "",
        "`head.safetensors` is a classifier over this model's image embeddings, fine-tuned with "
        f"it for {classes} classes (their names in the file's metadata). `cliplab eval --model "
        "THIS_FOLDER` scores zero-shot tasks over those classes with it (`--head text`: with "
        "the text prompts). Plain transformers does not read it: its "
        "`pipeline(\"zero-shot-image-classification\")` scores with the text prompts, another "
        "classifier.", ""])


def note_head_in_card(folder: str | Path, classes: int) -> None:
    """Add the head's section to the model card of ``folder`` (once; a folder without
    cliplab's card, e.g. an adapter folder, is left as it is)."""
    file = Path(folder) / CARD_FILE
    if not file.is_file():
        return
    card = file.read_text(encoding="utf-8")
    if CARD_TITLE in card.splitlines() and HEAD_TITLE not in card.splitlines():
        file.write_text(card.rstrip("\n") + "\n\n" + head_card_section(classes),
                        encoding="utf-8")
