"""What a tower's embeddings depend on, hashed: the keys of the evaluation caches and the
identity an index keeps of the model that filled it.

A tower's fingerprint covers its weights (and projection), its architecture settings from
``config.json`` (activation, norm epsilon, heads, the token CLIP pools at: a config fixed in
place changes every embedding without touching a weight) and what turns an input into the
tower's tensors (the image preprocessing; the tokenizer, pooling and context length). Equal
fingerprints mean equal embeddings for the same input. `folder.weights_fingerprint` is the other
identity: the weights alone, which is what a fine-tune's recorded origin is about.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.preprocess import RESIZE_VERSION

# config fields that cannot change an embedding: bookkeeping, initialisation, and dropout (an
# embedding is computed in eval mode); kept out so a saved and reloaded model keys as before
_NOT_OUTPUT_SETTINGS = frozenset({
    "architectures", "transformers_version", "dtype", "torch_dtype", "id2label", "label2id",
    "problem_type", "return_dict", "output_attentions", "output_hidden_states",
    "chunk_size_feed_forward", "initializer_range", "initializer_factor", "gradient_checkpointing",
    "use_cache", "attention_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "classifier_dropout", "dropout", "tie_word_embeddings", "logit_scale_init_value",
})
_TOWERS = {"image": ("vision", ("vision_model.", "visual_projection.")),
           "text": ("text", ("text_model.", "text_projection."))}


def tower_settings(model: DualEncoder, tower: str) -> dict[str, Any]:
    """The ``config.json`` settings ``tower`` ("image" or "text") computes with: its sub-config
    and the projection width, without the fields that cannot change an output."""
    config = model.model.config
    sub = getattr(config, f"{_TOWERS[tower][0]}_config").to_dict()
    settings = {k: v for k, v in sub.items()
                if not k.startswith("_") and k not in _NOT_OUTPUT_SETTINGS}
    settings["projection_dim"] = getattr(config, "projection_dim", None)
    return settings


def _tower_hash(model: DualEncoder, tower: str) -> hashlib._Hash:
    h = hashlib.sha256()
    for name, tensor in sorted(model.model.state_dict().items()):
        if name.startswith(_TOWERS[tower][1]):
            h.update(name.encode())
            h.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([model.kind, tower_settings(model, tower)], sort_keys=True,
                        default=str).encode())
    return h


def image_tower_fingerprint(model: DualEncoder) -> str:
    """Hash of everything image embeddings depend on: the vision tower and projection weights,
    their settings and the preprocessing (size, normalisation, resize)."""
    if hasattr(model, "tower_fingerprint"):  # an ONNX export: its graph file
        return model.tower_fingerprint("image")
    h = _tower_hash(model, "image")
    pre = model.preprocess_config.to_dict()
    pre.pop("augment", None)  # train-time only
    pre["resize_version"] = RESIZE_VERSION  # features cached before resizing changed differ
    h.update(json.dumps(pre, sort_keys=True).encode())
    return h.hexdigest()[:16]


def text_tower_fingerprint(model: DualEncoder) -> str:
    """Hash of everything text embeddings depend on: the text tower and projection weights,
    their settings, the tokenizer (`tokenizer_settings`), the pooling and the context
    length."""
    if hasattr(model, "tower_fingerprint"):  # an ONNX export: its graph file
        return model.tower_fingerprint("text")
    h = _tower_hash(model, "text")
    h.update(json.dumps([tokenizer_settings(model.tokenizer), model.text_pooling,
                         model.context_length]).encode())
    return h.hexdigest()[:16]


def tokenizer_settings(tok: Any) -> list:
    """What turns a text into token ids: a fast tokenizer's whole pipeline (normalizer — e.g.
    the lowercasing —, pre-tokenizer, vocabulary and merges, post-processor), else the
    vocabulary and the casing; and the special tokens."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # without the padding and truncation of the last call (set per call; the context
        # length is keyed on its own)
        state = {k: v for k, v in json.loads(backend.to_str()).items()
                 if k not in ("padding", "truncation")}
        pipeline = json.dumps(state, sort_keys=True)
    else:
        vocab = sorted(tok.get_vocab().items()) if hasattr(tok, "get_vocab") else []
        pipeline = json.dumps([vocab, getattr(tok, "do_lower_case", None)])
    special = getattr(tok, "special_tokens_map", {})
    return [type(tok).__name__, hashlib.sha256(pipeline.encode()).hexdigest(),
            json.dumps(special, sort_keys=True, default=str)]


def embedding_fingerprints(model: DualEncoder) -> dict[str, str]:
    """``{"image": ..., "text": ...}``: the two towers' fingerprints, which together say
    whether two models embed alike (an index is searched with the model that filled it)."""
    return {"image": image_tower_fingerprint(model), "text": text_tower_fingerprint(model)}
