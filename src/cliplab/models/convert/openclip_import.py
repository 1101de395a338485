"""OpenCLIP checkpoint → cliplab/transformers ``CLIPModel`` folder (``cliplab convert``)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPModel, PretrainedConfig

from cliplab.errors import ModelError, first_line
from cliplab.models.convert.atomic import MODEL_FOLDER, atomic_folder
from cliplab.models.convert.clip_bpe import clip_bpe_tokenizer
from cliplab.models.convert.openclip_config import (TEXT_DEFAULTS, clip_config_from_openclip,
                                                    positive_int)
from cliplab.models.convert.openclip_files import (OpenClipCheckpoint, find_openclip_files,
                                                   is_hf_model_folder, read_openclip)
from cliplab.models.convert.openclip_weights import openclip_to_hf
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.folder import update_meta
from cliplab.models.loading import has_tokenizer, quiet_transformers
from cliplab.models.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig, are_finite_numbers
from cliplab.output_folder import check_out
from cliplab.provenance import stamp


def _tokenizer(ckpt: OpenClipCheckpoint, context_length: int):
    """The tokenizer OpenCLIP would use: with ``text_cfg.hf_tokenizer_name``, the tokenizer files
    in the checkpoint's folder (as OpenCLIP's ``local-dir:`` loader does), else that name (a
    folder, relative to the config, or a Hub id in transformers' cache); without it, OpenCLIP's
    default, CLIP's BPE."""
    name = ckpt.model_cfg["text_cfg"].get("hf_tokenizer_name")
    if not name:
        return clip_bpe_tokenizer(context_length)
    if not isinstance(name, str):
        raise ModelError(f"{ckpt.config_file}: text_cfg.hf_tokenizer_name must be a Hub id or a "
                         f"folder, not {name!r}")
    where = f"{ckpt.config_file}: text_cfg.hf_tokenizer_name {name!r}"
    source = _tokenizer_folder(ckpt, name, where)
    kwargs = {}
    if source == ckpt.weights_file.parent and (source / "config.json").is_file() \
            and not is_hf_model_folder(source):
        # the OpenCLIP folder's own config.json (timm's Hub layout) is its image tower's, which
        # transformers would read (needing timm) to choose the tokenizer class; without it the
        # class comes from tokenizer_config.json (or tokenizer.json)
        kwargs["config"] = PretrainedConfig()
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(source or name, **kwargs)
    except Exception as err:  # noqa: BLE001 - transformers, tokenizers and imports alike
        first = first_line(err)
        raise ModelError(f"{where} cannot be loaded offline ({first})" if source is None else
                         f"{where}: the tokenizer in {source} cannot be read ({first})") from None
    tok.model_max_length = context_length
    return tok


def _tokenizer_folder(ckpt: OpenClipCheckpoint, name: str, where: str) -> Path | None:
    """The local folder holding the tokenizer ``name`` stands for: the checkpoint's own folder
    when it holds tokenizer files, else ``name`` read relative to the config when that is a
    folder (which must then hold them); None: ``name`` is a Hub id."""
    folder = ckpt.weights_file.parent
    if has_tokenizer(folder):
        return folder
    local = ckpt.config_file.parent / name
    if not local.is_dir():
        return None
    if not has_tokenizer(local):
        raise ModelError(f"{where} names the folder {local}, which holds no tokenizer files "
                         "(tokenizer.json and tokenizer_config.json, as tokenizer.save_pretrained "
                         "writes them); copy the model's tokenizer files there")
    return local


def _eos_id(tok, text_cfg: dict, file: Path) -> int:
    """The token HF's CLIP text tower must pool at, as OpenCLIP's ``pool_type`` pools."""
    pool = text_cfg.get("pool_type", TEXT_DEFAULTS["pool_type"])
    if pool == "eos":
        eos = text_cfg.get("eos_id", 2)
        if not isinstance(eos, int) or isinstance(eos, bool) or eos < 0:
            raise ModelError(f"{file}: text_cfg.eos_id must be a token id (an integer >= 0), "
                             f"not {eos!r}")
    else:  # 'argmax': the largest id, which is the end token only if it is the largest
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eos is None or eos != len(tok) - 1:
            raise ModelError(f"{file}: text_cfg.pool_type='argmax' pools at the largest token id, "
                             f"but the tokenizer's end token ({eos}) is not its largest "
                             f"({len(tok) - 1}); transformers' CLIP pools at the end token")
    if eos == 2:  # HF's legacy rule: an eos id of 2 means argmax pooling
        raise ModelError(f"{file}: text_cfg.eos_id 2 cannot be expressed in transformers' CLIP "
                         "config (it reads id 2 as 'pool at the largest id')")
    return int(eos)


def _preprocess(ckpt: OpenClipCheckpoint, image_size: int) -> PreprocessConfig:
    """Mean/std/size/resize mode from the model and preprocess configs (OpenCLIP's defaults:
    OpenAI's mean/std, bicubic, shortest side + centre crop)."""
    vcfg = ckpt.model_cfg["vision_cfg"]
    pre = {**(ckpt.model_cfg.get("preprocess_cfg") or {}), **ckpt.preprocess_cfg}
    mean = _channels(pre, vcfg, "mean", CLIP_MEAN, ckpt.config_file)
    std = _channels(pre, vcfg, "std", CLIP_STD, ckpt.config_file)
    interpolation = pre.get("interpolation") or vcfg.get("image_interpolation") or "bicubic"
    resize_mode = pre.get("resize_mode") or vcfg.get("image_resize_mode") or "shortest"
    if interpolation not in ("bicubic", "bilinear") or \
            resize_mode not in ("shortest", "squash", "longest"):
        raise ModelError(f"{ckpt.config_file}: preprocessing interpolation={interpolation!r} / "
                         f"resize_mode={resize_mode!r} is not supported")
    return PreprocessConfig(image_size=image_size, mean=mean, std=std, resize_mode=resize_mode,
                            interpolation=interpolation)


def _channels(pre: dict, vcfg: dict, name: str, default: tuple[float, float, float],
              file: Path) -> tuple[float, float, float]:
    """The per-channel ``mean`` or ``std`` from ``preprocess_cfg``, else ``vision_cfg.image_*``,
    else ``default``; 3 finite numbers (``std``: positive), else a one-line `ModelError` naming
    the key it came from."""
    for key, value in ((f"preprocess_cfg.{name}", pre.get(name)),
                       (f"vision_cfg.image_{name}", vcfg.get(f"image_{name}"))):
        if value:
            if not are_finite_numbers(value, 3, positive=name == "std"):
                want = "3 positive numbers" if name == "std" else "3 numbers"
                raise ModelError(f"{file}: {key} must be {want} (R, G, B), not {value!r}")
            return tuple(float(v) for v in value)
    return default


def openclip_to_dual_encoder(src: str | Path, config: str | Path | None = None) -> DualEncoder:
    """A `DualEncoder` holding the weights of an OpenCLIP checkpoint (file or Hub folder)."""
    ckpt = read_openclip(src, config)
    cfg = ckpt.model_cfg
    if cfg.get("custom_text") and any(k.startswith("transformer.") for k in ckpt.state_dict):
        raise ModelError(f"{ckpt.config_file}: custom_text is set but {ckpt.weights_file} holds "
                         "a plain CLIP text tower")
    context_length = positive_int(cfg["text_cfg"].get("context_length",
                                                      TEXT_DEFAULTS["context_length"]),
                                  "text_cfg.context_length", ckpt.config_file)
    tok = _tokenizer(ckpt, context_length)
    eos = _eos_id(tok, cfg["text_cfg"], ckpt.config_file)
    hf_config = clip_config_from_openclip(cfg, ckpt.config_file, eos_token_id=eos,
                                          pad_token_id=tok.pad_token_id or 0,
                                          bos_token_id=tok.bos_token_id)
    if len(tok) > hf_config.text_config.vocab_size:
        raise ModelError(f"{ckpt.config_file}: the tokenizer has {len(tok)} tokens, more than "
                         f"text_cfg.vocab_size {hf_config.text_config.vocab_size}")
    with torch.device("meta"):
        expected = CLIPModel(hf_config).state_dict()
    state = openclip_to_hf(ckpt.state_dict, expected, ckpt.weights_file,
                           custom_text=bool(cfg.get("custom_text")))
    model = CLIPModel(hf_config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in state.items()}, strict=False, assign=False)
    pre = _preprocess(ckpt, hf_config.vision_config.image_size)
    return DualEncoder(model.eval(), tok, pre, text_pooling="model",
                       context_length=context_length).eval()


def convert_openclip(src: str | Path, out: str | Path, config: str | Path | None = None,
                     overwrite: bool = False) -> Path:
    """Write an OpenCLIP checkpoint as a cliplab model folder at ``out`` (written to a temporary
    folder beside it and moved into place, so a failure leaves nothing half-written).
    ``overwrite`` replaces only a previous model folder; ``src`` and ``config`` are never
    touched."""
    inputs = (src, config)
    check_out(out, "convert", inputs, overwrite, MODEL_FOLDER, error=ModelError)  # before work
    model = openclip_to_dual_encoder(src, config)
    weights, config_file = find_openclip_files(src, config)
    with atomic_folder(out, overwrite, "convert", MODEL_FOLDER, inputs) as tmp:
        model.save(tmp)
        # where the weights came from (the model card says cliplab.json records it)
        update_meta(tmp, converted_from=stamp({
            "format": "open_clip", "weights": str(weights.resolve()),
            "config": str(config_file.resolve()), "sha256": file_sha256(weights)}))
    return Path(out)


def file_sha256(file: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_openclip(path: str | Path, config: str | Path | None = None,
                  device: str | torch.device = "cpu") -> DualEncoder:
    """An OpenCLIP checkpoint as a `DualEncoder`, converted through a temporary cliplab folder
    (so it behaves exactly as ``cliplab convert`` output would); its ``source`` is the
    checkpoint given, not that folder, which is gone when this returns."""
    model = openclip_to_dual_encoder(path, config)
    with tempfile.TemporaryDirectory(prefix="cliplab-openclip-") as tmp:
        model.save(tmp)
        loaded = DualEncoder.load(tmp, device=device)
    loaded.source = str(Path(path).expanduser().resolve())
    return loaded
