"""An offline byte-level tokenizer for from-scratch text towers (the `tiny-clip` preset).

Every string tokenizes (one token per UTF-8 byte, lower-cased), nothing is downloaded, and the
tokenizer saves with the model as a plain HF ``tokenizer.json``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
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
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=context_length)
