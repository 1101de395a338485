"""Text cleaning every model's tokenize applies, and an offline byte-level tokenizer for
from-scratch text towers (the `tiny-clip` preset).

`clean_texts` is OpenCLIP's and OpenAI CLIP's cleaning (``basic_clean`` then
``whitespace_clean``), applied before any tokenizer so that a text gets the ids OpenCLIP gives
it. The byte-level tokenizer tokenizes every string (one token per UTF-8 byte, lower-cased),
downloads nothing, and saves with the model as a plain HF ``tokenizer.json``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

import ftfy
from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors)
from transformers import PreTrainedTokenizerFast

# CLIP's text tower pools at the first EOS token unless eos_token_id == 2 (a legacy path that
# pools at argmax(input_ids)), so EOS deliberately does not take id 2.
SPECIAL_TOKENS = {"<pad>": 0, "<bos>": 1, "<unk>": 2, "<eos>": 3}


def byte_level_tokenizer(context_length: int = 64) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (vocab 260) wrapping every text in ``<bos> … <eos>``."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = dict(SPECIAL_TOKENS)
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    # clean_text's whitespace rule in the saved tokenizer too: plain transformers, which does
    # not call clean_text, then gets cliplab's ids for texts with runs of spaces (it cannot
    # hold ftfy and HTML unescaping: README says those texts differ there)
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Strip(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=context_length)


# printable ASCII without '&', and whitespace: text ftfy and html.unescape leave as it is
_PLAIN = re.compile(r"[ -%'-~\t\n\r]*")


def clean_text(text: str) -> str:
    """``text`` as OpenCLIP cleans it before tokenizing: mojibake and other Unicode damage
    fixed (``ftfy.fix_text``), HTML entities unescaped (twice: some captions are escaped
    twice), runs of whitespace made one space, the ends stripped."""
    if not _PLAIN.fullmatch(text):  # most captions are plain: ftfy costs ~20x the rest
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split())


# `clean_text` as a record for those who tokenize without cliplab (an ONNX export's
# onnx_export.json): the steps, and the Python that does them (what `clean_text` computes)
TEXT_CLEANING = {
    "steps": ["ftfy.fix_text", "html.unescape, twice",
              "runs of whitespace made one space, the ends stripped"],
    "python": "' '.join(html.unescape(html.unescape(ftfy.fix_text(text))).split())",
    "applies_to": "every text, before tokenizer.json (which cannot hold these steps)",
}


def clean_texts(texts: Iterable[str] | str) -> list[str]:
    """`clean_text` of each text (one string: one text, not one per character): what every
    ``tokenize`` (PyTorch or ONNX) calls first."""
    return [clean_text(text) for text in ([texts] if isinstance(texts, str) else texts)]
