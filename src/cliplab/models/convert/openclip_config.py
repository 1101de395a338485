"""OpenCLIP model configs ↔ transformers ``CLIPConfig``: which OpenCLIP architectures HF can hold.

OpenCLIP's own ViT and text transformer are CLIP's (pre-norm blocks, fused attention, class-token
and EOS pooling), so they map one to one onto ``CLIPModel`` as long as the config stays inside
what HF's classes have: anything else (timm or HF towers inside OpenCLIP, ResNets, LayerScale,
attentional pooling, a text projection with bias, ...) is refused with the key that asks for it.
"""

from __future__ import annotations

import math
from pathlib import Path

from transformers import CLIPConfig

from cliplab.errors import ModelError
from cliplab.models.preprocess import is_finite_number

# OpenCLIP's defaults (open_clip/model.py CLIPVisionCfg / CLIPTextCfg)
VISION_DEFAULTS = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16,
                       image_size=224)
TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12,
                     mlp_ratio=4.0, pool_type="argmax", proj_type="linear", proj_bias=False)
CLIP_EOT_ID = 49407  # OpenCLIP's SimpleTokenizer: <|endoftext|>, the largest id

# config keys whose non-default values HF's CLIP classes cannot hold: key → allowed values
_VISION_UNSUPPORTED = {
    "timm_model_name": (None,), "hf_model_name": (None,), "ls_init_value": (None,),
    "attentional_pool": (False,), "attn_pooler_queries": (256,), "no_ln_pre": (False,),
    "pos_embed_type": ("learnable",), "pool_type": ("tok",), "input_patchnorm": (False,),
    "global_average_pool": (False,), "output_tokens": (False,), "block_type": (None, "default"),
    **{k: (False,) for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                             "scale_attn", "scale_fc")},
}
_TEXT_UNSUPPORTED = {
    "hf_model_name": (None,), "ls_init_value": (None,), "embed_cls": (False,),
    "no_causal_mask": (False,), "proj_bias": (False,), "proj_type": ("linear", None),
    "pool_type": ("argmax", "eos"), "output_tokens": (False,), "block_type": (None, "default"),
    "use_pad_mask": (False,), "tokenizer_mode": (None,),
    **{k: (False,) for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                             "scale_attn", "scale_fc")},
}
_TOP_UNSUPPORTED = {"init_logit_bias": (None,), "custom_text": (False, True)}


def _check(cfg: dict, unsupported: dict, where: str, file: Path) -> None:
    for key, allowed in unsupported.items():
        if key in cfg and cfg[key] not in allowed:
            raise ModelError(f"{file}: {where}{key}={cfg[key]!r} is not supported: transformers' "
                             "CLIPModel has no equivalent (cliplab imports OpenCLIP's own ViT + "
                             "text transformer towers)")


def _act(model_cfg: dict, file: Path) -> str:
    for tower in ("vision_cfg", "text_cfg"):
        kwargs = model_cfg[tower].get("act_kwargs") or {}
        if kwargs and kwargs != {"approximate": "none"}:
            raise ModelError(f"{file}: {tower}.act_kwargs={kwargs!r} is not supported")
    return "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"


def _eps(tower_cfg: dict, where: str, file: Path) -> float:
    """The tower's layer-norm epsilon (``norm_kwargs.eps``, OpenCLIP's default 1e-5)."""
    kwargs = tower_cfg.get("norm_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ModelError(f"{file}: {where}norm_kwargs must be an object, not {kwargs!r}")
    extra = set(kwargs) - {"eps"}
    if extra:
        raise ModelError(f"{file}: {where}norm_kwargs {sorted(extra)} are not supported")
    return positive_number(kwargs.get("eps", 1e-5), f"{where}norm_kwargs.eps", file)


def positive_number(value, key: str, file: Path) -> float:
    """``value`` of config key ``key`` as a float, if it is a finite number > 0; else a
    one-line `ModelError` naming the file and the key."""
    if not is_finite_number(value) or value <= 0:
        raise ModelError(f"{file}: {key} must be a positive number, not {value!r}")
    return float(value)


def positive_int(value, key: str, file: Path) -> int:
    """``value`` of config key ``key``, if it is an integer > 0 (a size given as a list, as
    OpenCLIP allows, must be square); else a one-line `ModelError` naming the file and the key."""
    if isinstance(value, (list, tuple)):
        if len(value) == 0 or any(v != value[0] for v in value):
            raise ModelError(f"{file}: {key}={list(value)}: only square sizes are supported")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(f"{file}: {key} must be a positive integer, not {value!r}")
    return value


def _mlp_width(width: int, tower_cfg: dict, where: str, file: Path) -> int:
    """The MLP width exactly as OpenCLIP computes it: ``int(width * mlp_ratio)``."""
    return int(width * positive_number(tower_cfg["mlp_ratio"], f"{where}mlp_ratio", file))


def mlp_ratio(width: int, intermediate: int) -> float:
    """The ``mlp_ratio`` OpenCLIP turns back into ``intermediate``: it computes
    ``int(width * mlp_ratio)``, and ``intermediate / width`` can fall a hair short in floats
    (246 / 60 = 4.1, but 60 * 4.1 = 245.99999999999997), so the ratio is raised by the least
    float steps that make the product truncate to ``intermediate``."""
    ratio = intermediate / width
    while int(width * ratio) < intermediate:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def clip_config_from_openclip(model_cfg: dict, file: Path, eos_token_id: int,
                              pad_token_id: int = 0, bos_token_id: int | None = None
                              ) -> CLIPConfig:
    """The ``CLIPConfig`` of an OpenCLIP model config (refused where HF has no equivalent)."""
    _check(model_cfg, _TOP_UNSUPPORTED, "", file)
    vcfg = {**VISION_DEFAULTS, **model_cfg["vision_cfg"]}
    tcfg = {**TEXT_DEFAULTS, **model_cfg["text_cfg"]}
    _check(vcfg, _VISION_UNSUPPORTED, "vision_cfg.", file)
    _check(tcfg, _TEXT_UNSUPPORTED, "text_cfg.", file)
    if isinstance(vcfg["layers"], (list, tuple)):
        raise ModelError(f"{file}: vision_cfg.layers={vcfg['layers']} is a ResNet tower; "
                         "cliplab imports ViT towers only")
    act = _act(model_cfg, file)
    embed_dim = positive_int(model_cfg["embed_dim"], "embed_dim", file)
    width = positive_int(vcfg["width"], "vision_cfg.width", file)
    head_width = positive_int(vcfg["head_width"], "vision_cfg.head_width", file)
    if width % head_width:
        raise ModelError(f"{file}: vision_cfg.width {width} is not a multiple of head_width "
                         f"{head_width}")
    text_width = positive_int(tcfg["width"], "text_cfg.width", file)
    heads = positive_int(tcfg["heads"], "text_cfg.heads", file)
    if text_width % heads:
        raise ModelError(f"{file}: text_cfg.width {text_width} is not a multiple of heads {heads}")
    vision = dict(
        hidden_size=width, intermediate_size=_mlp_width(width, vcfg, "vision_cfg.", file),
        num_attention_heads=width // head_width,
        num_hidden_layers=positive_int(vcfg["layers"], "vision_cfg.layers", file),
        image_size=positive_int(vcfg["image_size"], "vision_cfg.image_size", file),
        patch_size=positive_int(vcfg["patch_size"], "vision_cfg.patch_size", file),
        hidden_act=act, layer_norm_eps=_eps(vcfg, "vision_cfg.", file),
        projection_dim=embed_dim)
    text = dict(
        vocab_size=positive_int(tcfg["vocab_size"], "text_cfg.vocab_size", file),
        hidden_size=text_width, intermediate_size=_mlp_width(text_width, tcfg, "text_cfg.", file),
        num_attention_heads=heads,
        num_hidden_layers=positive_int(tcfg["layers"], "text_cfg.layers", file),
        max_position_embeddings=positive_int(tcfg["context_length"], "text_cfg.context_length",
                                             file),
        hidden_act=act, layer_norm_eps=_eps(tcfg, "text_cfg.", file),
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        bos_token_id=bos_token_id if bos_token_id is not None else eos_token_id - 1,
        projection_dim=embed_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def openclip_config_from_clip(config: CLIPConfig, eos_token_id: int | None,
                              tokenizer_name: str | None) -> dict:
    """The OpenCLIP model config of a ``CLIPConfig`` (``tokenizer_name``: a Hub id or folder for
    ``text_cfg.hf_tokenizer_name``, None for OpenCLIP's default CLIP tokenizer)."""
    v, t = config.vision_config, config.text_config
    if v.hidden_act != t.hidden_act or v.hidden_act not in ("gelu", "quick_gelu"):
        raise ModelError(f"activations {v.hidden_act!r} (image) / {t.hidden_act!r} (text): "
                         "OpenCLIP's towers use gelu or quick_gelu, the same in both")
    vision_cfg = dict(image_size=v.image_size, layers=v.num_hidden_layers, width=v.hidden_size,
                      head_width=v.hidden_size // v.num_attention_heads,
                      mlp_ratio=mlp_ratio(v.hidden_size, v.intermediate_size),
                      patch_size=v.patch_size)
    text_cfg = dict(context_length=t.max_position_embeddings, vocab_size=t.vocab_size,
                    width=t.hidden_size, heads=t.num_attention_heads, layers=t.num_hidden_layers,
                    mlp_ratio=mlp_ratio(t.hidden_size, t.intermediate_size))
    for cfg, eps in ((vision_cfg, v.layer_norm_eps), (text_cfg, t.layer_norm_eps)):
        if eps != 1e-5:
            cfg["norm_kwargs"] = {"eps": eps}
    if eos_token_id is not None:  # HF pools at the first EOS; OpenCLIP's 'argmax' only if it is
        text_cfg["pool_type"] = "eos"  # the largest id, so name it
        text_cfg["eos_id"] = eos_token_id
    if tokenizer_name is not None:
        text_cfg["hf_tokenizer_name"] = tokenizer_name
    cfg = dict(embed_dim=config.projection_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)
    if v.hidden_act == "quick_gelu":
        cfg["quick_gelu"] = True
    return cfg
