"""A cache of text embeddings keyed by (text tower, precision, text), shared by every task.

Zero-shot prompts and retrieval captions go through it: a text already embedded under the same
text tower is not encoded again, duplicate texts in one request are encoded once (a labelled set
turned into pairs has a few dozen distinct captions for thousands of images), and the texts
that must be encoded are sorted by token length first, so a batch pads to a near-equal length.
Changing any text-tower weight or setting, the projection, the tokenizer or the pooling changes
the key (`models.fingerprints`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cliplab.models.dual_encoder import DualEncoder, evaluating
from cliplab.models.fingerprints import text_tower_fingerprint
from cliplab.models.finite import finite_embeddings
from cliplab.models.precision import autocast
from cliplab.models.tokenizer import clean_texts


class TextFeatureCache:
    """Unit-length text embeddings by (text tower fingerprint, precision, text), in memory.

    ``hits`` / ``misses`` count distinct texts served from the cache / encoded.
    """

    def __init__(self, batch_size: int = 256):
        self.batch_size = batch_size
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def embeddings(self, model: DualEncoder, texts: Sequence[str], progress: bool = False,
                   precision: str = "fp32", desc: str = "encode texts") -> torch.Tensor:
        """``[len(texts), D]`` float32 unit embeddings of ``texts`` (in order), encoding only
        the distinct texts this cache has not seen under this model and precision."""
        key = f"{text_tower_fingerprint(model)}-{precision}"
        table = self.memory.setdefault(key, {})
        unique = list(dict.fromkeys(texts))
        missing = [t for t in unique if t not in table]
        self.hits += len(unique) - len(missing)
        self.misses += len(missing)
        if missing:
            table.update(zip(missing, encode_texts_sorted(
                model, missing, self.batch_size, progress, precision, desc)))
        if not texts:
            return torch.empty(0, model.embed_dim)
        rows = {t: table[t] for t in unique}
        return torch.stack([rows[t] for t in texts])


@torch.no_grad()
def encode_texts_sorted(model: DualEncoder, texts: Sequence[str], batch_size: int = 256,
                        progress: bool = False, precision: str = "fp32",
                        desc: str = "encode texts") -> torch.Tensor:
    """Unit embeddings of ``texts`` (in their order), encoded in batches of texts of similar
    token length so each batch pads little."""
    lengths = [len(ids) for ids in model.tokenizer(
        clean_texts(texts), truncation=True, max_length=model.context_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out = torch.empty(len(texts), model.embed_dim)
    with evaluating(model), autocast(precision, model.device.type):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress,
                          leave=False):
            idx = order[start:start + batch_size]
            tok = {k: v.to(model.device) for k, v in model.tokenize([texts[i] for i in idx]).items()}
            emb = model.encode_text(**tok, normalize=False).float().cpu()
            out[idx] = finite_embeddings(F.normalize(emb, dim=-1), "text")
    return out
