"""`DualEncoder`: one face over HF CLIP, SigLIP and VisionTextDualEncoder models.

Every stage calls ``encode_image`` / ``encode_text`` / ``tokenize`` / ``preprocess`` and the logit
scale (and bias) here instead of reaching into a model. A saved folder is a plain HF model
folder (``config.json`` + ``model.safetensors`` + tokenizer files) plus ``cliplab.json`` holding
what HF has no field for: the preprocessing and the text pooling.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from cliplab.errors import ModelError, checked_batch_size, warn
from cliplab.file_modes import as_umask, rust_os_error
from cliplab.models.device import resolve_device
from cliplab.models.finite import finite_embeddings
from cliplab.models.folder import CLIPLAB_FILE, read_meta, write_meta
from cliplab.models.hf_files import (preprocess_from_processor_config, processor_disagreement,
                                     write_model_card, write_processor_config)
from cliplab.models.loading import (MODEL_CLASSES, load_config, load_tokenizer, load_weights,
                                    quiet_transformers)
from cliplab.models.pooled_towers import (clip_text_pooled, image_pooled,
                                          supports_pooled_forward)
from cliplab.models.preprocess import ImagePreprocessor, PreprocessConfig
from cliplab.models.tokenizer import clean_texts

TEXT_POOLINGS = ("model", "mean")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token states where ``attention_mask`` is 1 (sentence-transformers pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class DualEncoder(nn.Module):
    """A contrastive image-text model: towers, projections, tokenizer and preprocessing.

    ``text_pooling`` is ``"model"`` (the HF model's own pooled output, e.g. CLIP's EOS token) or
    ``"mean"`` (mean of token states, what sentence encoders such as MiniLM were trained with).
    """

    def __init__(self, model: PreTrainedModel, tokenizer, preprocess: PreprocessConfig,
                 text_pooling: str = "model", context_length: int | None = None):
        super().__init__()
        if model.config.model_type not in MODEL_CLASSES:
            raise ModelError(f"unsupported model type {model.config.model_type!r}; "
                             f"cliplab handles {sorted(MODEL_CLASSES)}")
        if text_pooling not in TEXT_POOLINGS:
            raise ModelError(f"text_pooling must be 'model' or 'mean', not {text_pooling!r}")
        self.model = model
        self.source: str | None = None  # the folder `load` read it from (None: built in memory)
        self.tokenizer = tokenizer
        self.preprocess_config = preprocess
        self.preprocessor = ImagePreprocessor(preprocess)
        self.text_pooling = text_pooling
        self.context_length = _context_length(model, tokenizer, context_length)

    # -- identity -----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.model.config.model_type

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_model

    @property
    def text_tower(self) -> nn.Module:
        return self.model.text_model

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim if self.kind != "siglip" else \
            self.model.config.text_config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- inputs -------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask for ``texts`` cleaned as OpenCLIP cleans them
        (`clean_texts`), padded to the model's context length."""
        padding = "max_length" if self.kind == "siglip" else "longest"
        enc = self.tokenizer(clean_texts(texts), padding=padding, truncation=True,
                             max_length=self.context_length, return_attention_mask=True,
                             return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def preprocess(self, images, train: bool = False, generator: torch.Generator | None = None,
                   augment=None) -> torch.Tensor:
        """Pixel values for a batch of uint8 ``[B, H, W, C]`` images (or PIL images); with
        ``train``, randomly augmented (``augment``: an ``AugmentConfig`` overriding the model's)."""
        return self.preprocessor(images, train=train, generator=generator, augment=augment)

    # -- features -----------------------------------------------------------------------------
    def image_backbone(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled image-tower output before the projection (what linear probes read)."""
        tower = self.vision_tower
        if supports_pooled_forward(tower):  # CLIP's and ViT towers: last block at the CLS token
            return image_pooled(tower, pixel_values)
        return tower(pixel_values=pixel_values).pooler_output

    def image_backbone_and_probe(self, pixel_values: torch.Tensor, kind: str = "tokens",
                                 layers: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled output and, from the same forward pass, linear-probe features:

        - ``"tokens"``: every token state of the last block, flattened (the spatial feature map
          a probe needs to tell apart classes that differ in where things are);
        - ``"layers"``: per block of the last ``layers``, the class token and the mean of the
          patch tokens, concatenated (DINO-style; towers without a class token, such as
          SigLIP's, give the mean of all tokens).
        """
        out = self.model.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        if kind == "tokens":
            return out.pooler_output, out.hidden_states[-1].flatten(1)
        states = out.hidden_states[-layers:]
        if self.kind == "siglip":
            feats = [h.mean(1) for h in states]
        else:
            feats = [torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=1) for h in states]
        return out.pooler_output, torch.cat(feats, dim=1)

    def text_backbone(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled text-tower output before the projection (what a frozen tower's cache holds)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self._pools_clip_text():
            tower = self.text_tower
            return clip_text_pooled(tower, tower.embeddings(input_ids=input_ids), attention_mask,
                                    _clip_eos_positions(input_ids, tower.eos_token_id))
        # SigLIP was trained on max-length padding without a mask; masking changes its output.
        mask = None if self.kind == "siglip" else attention_mask
        out = self.model.text_model(input_ids=input_ids, attention_mask=mask)
        if self.text_pooling == "mean":
            return mean_pool(out.last_hidden_state, attention_mask)
        return out.pooler_output

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        proj = getattr(self.model, "visual_projection", None)
        return pooled if proj is None else proj(pooled)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        proj = getattr(self.model, "text_projection", None)
        return pooled if proj is None else proj(pooled)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings ``[B, D]`` (unit length unless ``normalize=False``)."""
        feats = self.project_image(self.image_backbone(pixel_values))
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """Text embeddings ``[B, D]`` (unit length unless ``normalize=False``)."""
        feats = self.project_text(self.text_backbone(input_ids, attention_mask))
        return F.normalize(feats, dim=-1) if normalize else feats

    def _pools_clip_text(self) -> bool:
        """Whether the text tower is CLIP's, pooled at EOS, and can run its last block there."""
        return (self.kind == "clip" and self.text_pooling == "model"
                and supports_pooled_forward(self.text_tower))

    # -- prompt-learning hooks ----------------------------------------------------------------
    def token_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text tower's input word embeddings ``[B, L, W]`` of ``input_ids`` (no position
        embeddings): what prompt learning (CoOp) edits before ``encode_text_embeddings``."""
        return self.text_tower.get_input_embeddings()(input_ids)

    def encode_text_embeddings(self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor | None = None,
                               normalize: bool = True) -> torch.Tensor:
        """Text embeddings ``[B, D]`` from input word embeddings instead of token ids.

        ``encode_text_embeddings(token_embedding(ids), ids, mask)`` equals
        ``encode_text(ids, mask)``. ``input_ids`` only say where the tower pools (CLIP's EOS
        token); their embeddings are not read, so placeholders may stand where learned vectors go.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tower = self.text_tower
        if self.kind == "vision-text-dual-encoder":  # BERT-style towers take inputs_embeds
            out = tower(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
            pooled = mean_pool(out.last_hidden_state, attention_mask) \
                if self.text_pooling == "mean" else out.pooler_output
        elif self._pools_clip_text():
            pooled = clip_text_pooled(tower, tower.embeddings(inputs_embeds=inputs_embeds),
                                      attention_mask,
                                      _clip_eos_positions(input_ids, tower.eos_token_id))
        else:  # CLIP / SigLIP text transformers take only ids: run their parts in order
            from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

            hidden = tower.embeddings(inputs_embeds=inputs_embeds)
            if self.kind == "clip":
                mask = create_causal_mask(config=tower.config, inputs_embeds=hidden,
                                          attention_mask=attention_mask, cache=None)
                hidden = tower.encoder(inputs_embeds=hidden, attention_mask=mask,
                                       is_causal=True).last_hidden_state
            else:  # SigLIP: no mask, as in text_backbone
                mask = create_bidirectional_mask(config=tower.config, inputs_embeds=hidden,
                                                 attention_mask=None)
                hidden = tower.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
            hidden = tower.final_layer_norm(hidden)
            if self.text_pooling == "mean":
                pooled = mean_pool(hidden, attention_mask)
            elif self.kind == "siglip":
                pooled = tower.head(hidden[:, -1])
            else:
                pooled = hidden[torch.arange(len(hidden), device=hidden.device),
                                _clip_eos_positions(input_ids, tower.eos_token_id)]
        feats = self.project_text(pooled)
        return F.normalize(feats, dim=-1) if normalize else feats

    @torch.no_grad()
    def encode_texts(self, texts: list[str] | str, batch_size: int = 256) -> torch.Tensor:
        """Convenience: tokenize and embed a list of strings (one string: a batch of one) in
        batches (eval mode, no grad): unit float32 rows on the model's device, whatever the
        model's dtype."""
        texts = [texts] if isinstance(texts, str) else texts  # not one text per character
        batch_size = checked_batch_size(batch_size)
        out = []
        with evaluating(self):
            for i in range(0, len(texts), batch_size):
                tok = {k: v.to(self.device)
                       for k, v in self.tokenize(texts[i:i + batch_size]).items()}
                # normalised in float32, as evaluate.features.encode_images does
                feats = self.encode_text(**tok, normalize=False).float()
                out.append(F.normalize(feats, dim=-1))
        return finite_embeddings(torch.cat(out), "text") if out else \
            torch.empty(0, self.embed_dim)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return getattr(self.model, "logit_bias", None)

    # -- training hooks -----------------------------------------------------------------------
    def tower(self, name: str) -> nn.Module:
        """The ``"image"`` or ``"text"`` tower."""
        if name not in ("image", "text"):
            raise ModelError(f"tower must be 'image' or 'text', not {name!r}")
        return self.vision_tower if name == "image" else self.text_tower

    def freeze_tower(self, tower: str, except_last: int = 0) -> None:
        """Freeze the ``"image"`` or ``"text"`` tower, optionally leaving its last k blocks free
        together with what follows them (final norm, pooling head), as OpenCLIP's ``lock``
        unlocks the last group. The tower's projection into the shared space is no part of it
        and stays trainable (OpenCLIP's ``lock`` freezes its ``proj``)."""
        module = self.tower(tower)
        module.requires_grad_(False)
        if except_last > 0:
            layers = _encoder_layers(module)
            if except_last >= len(layers):  # then nothing would be locked
                raise ModelError(f"the {tower} tower has {len(layers)} blocks: leave fewer than "
                                 f"that trainable (lock_{tower}_except_last={except_last}), or "
                                 f"do not lock it")
            for part in [*layers[-except_last:], *_modules_after_encoder(module)]:
                part.requires_grad_(True)

    @contextlib.contextmanager
    def attention_implementation(self, name: str):
        """Run both towers with HF's attention implementation ``name`` (``"eager"``,
        ``"sdpa"``, ...) inside the block; the model's own choice is restored after."""
        previous = getattr(self.model.config, "_attn_implementation", None)
        if previous is None or previous == name:
            yield
            return
        self.model.set_attn_implementation(name)
        try:
            yield
        finally:
            self.model.set_attn_implementation(previous)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block's activations in backward instead of storing them
        (less memory, ~30% more compute), in both towers."""
        towers = [self.model] if self.model.supports_gradient_checkpointing \
            else [self.vision_tower, self.text_tower]
        for module in towers:
            if not getattr(module, "supports_gradient_checkpointing", False):
                raise ModelError(f"{type(module).__name__} does not support gradient "
                                 "checkpointing")
            enable = getattr(module, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers >= 5
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                module.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})

    def tower_layers(self, tower: str) -> list[nn.Module]:
        """The transformer blocks of the ``"image"`` or ``"text"`` tower, in order."""
        return _encoder_layers(self.tower(tower))

    def tower_is_frozen(self, tower: str) -> bool:
        module = self.tower(tower)
        return not any(p.requires_grad for p in module.parameters())

    # -- persistence --------------------------------------------------------------------------
    def save_tokenizer(self, path: str | Path, input_names: list[str] | None = None) -> None:
        """The tokenizer in ``path`` as plain transformers should use it: truncating where
        cliplab does (``model_max_length``), and for SigLIP returning no attention mask
        (``input_names``: the inputs it returns instead, e.g. an ONNX graph's)."""
        try:
            self.tokenizer.save_pretrained(path)
        except Exception as err:
            # tokenizers (Rust) reports a failed write as a bare Exception naming the errno
            # ("No space left on device (os error 28)"): raised as the OSError it is
            code = rust_os_error(err) if type(err) is Exception else None
            if code is None:
                raise
            raise OSError(code, os.strerror(code), str(path)) from err
        settings: dict = {"model_max_length": self.context_length}
        if input_names is not None:
            settings["model_input_names"] = list(input_names)
        elif self.kind == "siglip":  # SigLIP runs its text unmasked; HF's SigLIP tokenizers say so
            settings["model_input_names"] = ["input_ids"]
        _update_tokenizer_config(Path(path), settings)

    def save(self, path: str | Path, state_dict: dict | None = None) -> Path:
        """Write a plain HF model folder (safetensors) plus tokenizer, the image processor
        config transformers' pipelines read, a model card and ``cliplab.json``
        (``state_dict``: the weights to write instead of the module's, e.g. gathered from
        FSDP shards)."""
        path = Path(path)
        if state_dict is None and any("lora_" in name for name, _ in self.named_parameters()):
            # peft's layers rename the weights: the folder would load nowhere
            raise ModelError("this model carries LoRA adapters (lora's fit adds them in place): "
                             "save the fitted adapter (adapter.save(folder); options merge: "
                             "true also writes the full model), or fold them in first with "
                             "cliplab.adapt.lora.merge_adapter(model, adapter.peft_model)")
        if state_dict is not None:
            self._check_fits(state_dict)  # before writing: a folder that cannot load back
        path.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():  # its shard bar: cliplab tells its own writes
            self.model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
        for weights in path.glob("*.safetensors"):  # safetensors writes them owner-only
            as_umask(weights)
        self.save_tokenizer(path)
        write_processor_config(path, self.preprocess_config)
        write_model_card(path, self.kind, self.text_pooling, self.context_length,
                         self.preprocess_config.resize_mode)
        write_meta(path, {"preprocess": self.preprocess_config.to_dict(),
                          "text_pooling": self.text_pooling,
                          "context_length": self.context_length})
        return path

    def _check_fits(self, state_dict: dict) -> None:
        """A `ModelError` naming the first key ``state_dict`` lacks, has extra or shapes
        otherwise than this model's weights."""
        own = self.model.state_dict()
        missing = sorted(own.keys() - state_dict.keys())
        extra = sorted(state_dict.keys() - own.keys())
        if missing or extra:
            raise ModelError(f"state_dict does not fit this {self.kind} model: "
                             + (f"{len(missing)} key(s) missing (e.g. {missing[0]})" if missing
                                else "") + ("; " if missing and extra else "")
                             + (f"{len(extra)} unknown (e.g. {extra[0]})" if extra else ""))
        for key, value in state_dict.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ModelError(f"state_dict does not fit this {self.kind} model: {key} is "
                                 f"{tuple(value.shape)}, the model's {tuple(own[key].shape)}")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "DualEncoder":
        """Load a cliplab folder or any local HF CLIP / SigLIP / VisionTextDualEncoder folder
        onto ``device`` (a torch device or a name: ``auto`` is the GPU when there is one); an
        unreadable or inconsistent folder is a one-line `ModelError` naming the file."""
        path = Path(path).expanduser()
        config = load_config(path)
        model = load_weights(path, config).to(resolve_device(device))
        tokenizer = load_tokenizer(path)
        meta = read_meta(path)
        _check_meta(path / CLIPLAB_FILE, meta, model)
        if "preprocess" in meta:
            pre = PreprocessConfig.from_dict(meta["preprocess"], source=str(path / CLIPLAB_FILE))
            disagreement = processor_disagreement(path, pre)
            if disagreement:  # e.g. a processor re-saved into the folder the transformers way
                warn(disagreement, stacklevel=2)
        else:
            pre = preprocess_from_processor_config(path, config.vision_config.image_size,
                                                   config.model_type)
        if "text_pooling" not in meta and config.model_type == "vision-text-dual-encoder":
            warn(f"{_no_text_pooling(path)}: assuming text_pooling 'model' (the text "
                 "model's pooler, as transformers does); a cliplab LiT model pools by mean: "
                 "if this is one (e.g. re-saved by transformers), copy its "
                 f"{CLIPLAB_FILE} back or set \"text_pooling\": \"mean\" in it")
        loaded = cls(model, tokenizer, pre, meta.get("text_pooling", "model"),
                     meta.get("context_length")).eval()
        loaded.source = str(path.resolve())
        return loaded


@contextlib.contextmanager
def kept_modes(module: nn.Module):
    """After the block each submodule's own train/eval mode is restored (a locked tower kept in
    eval mode while the rest trains stays so; ``module.train(was)`` would set every part)."""
    # an ONNX encoder (no submodules) only says it is not training
    parts = module.modules() if isinstance(module, nn.Module) else [module]
    modes = [(m, m.training) for m in parts]
    try:
        yield module
    finally:
        for m, was_training in modes:
            m.training = was_training


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """Eval mode (no dropout) inside the block, each submodule's previous mode after it."""
    with kept_modes(module):
        module.eval()
        yield module


def _no_text_pooling(path: Path) -> str:
    """What a VisionTextDualEncoder folder lacks for its text pooling, as it is."""
    file = path / CLIPLAB_FILE
    return f"{file} sets no text_pooling" if file.is_file() else f"{path} has no {CLIPLAB_FILE}"


def _update_tokenizer_config(folder: Path, settings: dict) -> None:
    """Record ``settings`` (e.g. which inputs the tokenizer returns, where it truncates) in
    the saved ``tokenizer_config.json``."""
    file = folder / "tokenizer_config.json"
    config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    config.update(settings)
    file.write_text(json.dumps(config, indent=2), encoding="utf-8")


def text_positions(model: PreTrainedModel) -> int | None:
    """How many token positions the text tower embeds (CLIP's, SigLIP's and BERT's
    ``max_position_embeddings``; None when its config does not say)."""
    return getattr(model.config.text_config, "max_position_embeddings", None)


def _context_length(model: PreTrainedModel, tokenizer, requested: int | None) -> int:
    """``requested``, or when not given the tokenizer's ``model_max_length`` (at most 512);
    never more than the text tower's positions."""
    positions = text_positions(model)
    if not requested:
        inferred = min(getattr(tokenizer, "model_max_length", 77), 512)
        return min(inferred, positions) if positions else inferred
    if positions and requested > positions:
        raise ModelError(f"context_length {requested} is more than the text tower's "
                         f"{positions} positions; use at most {positions}")
    return requested


def _check_meta(file: Path, meta: dict, model: PreTrainedModel) -> None:
    """A one-line `ModelError` naming ``file`` (cliplab.json) for a text pooling or context
    length the model cannot use."""
    pooling = meta.get("text_pooling", "model")
    if pooling not in TEXT_POOLINGS:
        raise ModelError(f"{file}: text_pooling must be 'model' or 'mean', not {pooling!r}")
    length = meta.get("context_length")
    if length is None:
        return
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ModelError(f"{file}: context_length must be a positive whole number, not "
                         f"{length!r}")
    positions = text_positions(model)
    if positions and length > positions:
        raise ModelError(f"{file}: context_length {length} is more than the text tower's "
                         f"{positions} positions (text_config.max_position_embeddings in "
                         f"config.json); set it to at most {positions}")


def _clip_eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Where HF's CLIP text model pools: the first EOS token (the highest id for old configs)."""
    ids = input_ids.to(torch.int)
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


def _modules_after_encoder(tower: nn.Module) -> list[nn.Module]:
    """The tower's children after its blocks (final norm, pooling head, pooler): HF towers
    register them in the order they run, embeddings first."""
    children = list(tower.named_children())
    names = [name for name, _ in children]
    blocks = "encoder" if "encoder" in names else "layers"  # layers: transformers 5's ViT
    if blocks not in names:
        return []
    return [child for _, child in children[names.index(blocks) + 1:]]


def _encoder_layers(module: nn.Module) -> list[nn.Module]:
    for attr in ("encoder.layers", "encoder.layer", "layers"):  # layers: transformers 5's ViT
        obj = module
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise ModelError(f"cannot find the transformer layers of {type(module).__name__}")
