"""OpenAI CLIP's BPE tokenizer (what OpenCLIP's default ``SimpleTokenizer`` implements) as a
transformers ``CLIPTokenizerFast``, built offline from the merges list shipped with cliplab.

``bpe_simple_vocab_16e6.txt.gz`` is the file OpenAI's CLIP and OpenCLIP ship (MIT licence); the
vocabulary is derived from it exactly as ``SimpleTokenizer`` does: the 256 byte symbols, the same
with ``</w>``, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (id 49407).
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizerFast

BPE_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (CLIP uses the same)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    with gzip.open(BPE_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:N_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_bpe_tokenizer(context_length: int = 77) -> CLIPTokenizerFast:
    """CLIP's tokenizer (vocab 49408, ``<|endoftext|>`` = 49407 pads and ends every text)."""
    vocab, merges = _vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:  # files: the one input every version accepts
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizerFast(vocab=str(vocab_file), merges=str(merges_file),
                                 model_max_length=context_length)
