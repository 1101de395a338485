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


def tower_identity(model: DualEncoder, tower: str) -> dict[str, Any]:
    """What ``tower`` ("image" or "text") embeds with besides its weights, in the open (an
    index keeps it to say which of them differs): its ``settings`` and, for the image tower,
    its ``preprocess``ing; for the text tower its ``tokenizer`` (`tokenizer_digest`),
    ``pooling`` and ``context_length``. Empty for an ONNX export (its files are its weights)."""
    if hasattr(model, "tower_fingerprint"):
        return {}
    identity: dict[str, Any] = {"settings": tower_settings(model, tower)}
    if tower == "image":
        pre = model.preprocess_config.to_dict()
        pre.pop("augment", None)  # train-time only
        pre["resize_version"] = RESIZE_VERSION  # features cached before resizing changed differ
        identity["preprocess"] = pre
    else:
        identity.update(tokenizer=tokenizer_digest(model), pooling=model.text_pooling,
                        context_length=model.context_length)
    return identity


def _tower_fingerprint(model: DualEncoder, tower: str, identity: dict | None = None) -> str:
    """The tower's weights and its `tower_identity` (given, when the caller has it), hashed."""
    if hasattr(model, "tower_fingerprint"):  # an ONNX export: its files
        return model.tower_fingerprint(tower)
    identity = tower_identity(model, tower) if identity is None else identity
    h = hashlib.sha256()
    for name, tensor in sorted(model.model.state_dict().items()):
        if name.startswith(_TOWERS[tower][1]):
            h.update(name.encode())
            h.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            h.update(memoryview(tensor.detach().cpu().contiguous().view(torch.uint8).numpy()))
    h.update(json.dumps([model.kind, identity], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def image_tower_fingerprint(model: DualEncoder) -> str:
    """Hash of everything image embeddings depend on: the vision tower and projection weights,
    their settings and the preprocessing (size, normalisation, resize)."""
    return _tower_fingerprint(model, "image")


def text_tower_fingerprint(model: DualEncoder) -> str:
    """Hash of everything text embeddings depend on: the text tower and projection weights,
    their settings, the tokenizer (`tokenizer_digest`), the pooling and the context length."""
    return _tower_fingerprint(model, "text")


# texts that tell tokenizers apart: casing, accents, punctuation, digits, long and joined
# words, other scripts, odd spacing
_PROBE_TEXTS = ["A Photo of a CAT.", "two dogs running on the beach, at sunset!",
                "Crème brûlée — café au lait", "ÉCOLE 123 4.5% x2", "unbelievably-hyphenated "
                "words_and CamelCaseNames", "一只猫 🐱 кошка", "  spaced\tout\ntext  "]


def tokenizer_digest(model: DualEncoder) -> str:
    """What turns a text into token ids, by what it does rather than how a library version
    writes it down: the vocabulary, the special tokens, and the ids of `_PROBE_TEXTS` as the
    model tokenizes them (normalizer — e.g. the lowercasing —, pre-tokenizer, merges and
    post-processor all show there)."""
    tok = model.tokenizer
    vocab = sorted(tok.get_vocab().items()) if hasattr(tok, "get_vocab") else []
    special = getattr(tok, "special_tokens_map", {})
    ids = model.tokenize(_PROBE_TEXTS)["input_ids"].tolist()
    state = json.dumps([vocab, special, ids], sort_keys=True, default=str)
    return hashlib.sha256(state.encode()).hexdigest()[:16]


IDENTITY_VERSION = 1  # of the record `embedding_identity` gives; another is read as none


def embedding_identity(model: DualEncoder) -> dict[str, Any]:
    """Both towers' fingerprints with what goes into them in the open: ``{"version", "image":
    {"fingerprint", ...}, "text": {...}}`` (`tower_identity`), what an index keeps of the model
    that filled it."""
    identity: dict[str, Any] = {"version": IDENTITY_VERSION}
    for tower in ("image", "text"):
        parts = tower_identity(model, tower)
        identity[tower] = {"fingerprint": _tower_fingerprint(model, tower, parts), **parts}
    return json.loads(json.dumps(identity, default=str))  # as index.json reads back: lists


def identity_difference(then: dict, now: dict) -> str | None:
    """What differs between two `embedding_identity` records of models of the same weights,
    named (e.g. "image preprocessing (mean: [0.5, ...] then, [0.2, ...] now)"), or None when
    they embed alike. A record of another version says nothing: None. Settings are compared
    on the keys both hold (a transformers version adds or drops generic config keys)."""
    if then.get("version") != IDENTITY_VERSION or now.get("version") != IDENTITY_VERSION:
        return None
    for tower in ("image", "text"):
        a, b = then.get(tower) or {}, now.get(tower) or {}
        if a.get("fingerprint") == b.get("fingerprint"):
            continue
        named = {"preprocess": "image preprocessing", "tokenizer": "tokenizer",
                 "pooling": "text pooling", "context_length": "context length",
                 "settings": f"{tower} tower setting"}
        for field, what in named.items():
            if field not in a or field not in b:
                continue
            if isinstance(a[field], dict):
                keys = [k for k in a[field] if k in b[field] and a[field][k] != b[field][k]]
                if keys:
                    k = keys[0]
                    return f"{what} {k} ({_brief(a[field][k])} then, {_brief(b[field][k])} now)"
            elif a[field] != b[field]:
                return f"{what} ({_brief(a[field])} then, {_brief(b[field])} now)"
    return None


def _brief(value: Any, width: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."
