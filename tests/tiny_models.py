"""Very small models the tests train in seconds (fresh on every call: tests may change them)."""

from cliplab.models import DualEncoder, build_model


def small_model(seed: int = 0, **overrides) -> DualEncoder:
    """tiny-clip at 16 px, width 32, one block per tower (``overrides`` change any option)."""
    options = dict(image_size=16, patch_size=8, width=32, layers=1, heads=2, embed_dim=16,
                   context_length=48, seed=seed)
    return build_model("tiny-clip", **{**options, **overrides})


def bare_siglip(context_length: int, tokenizer=None) -> DualEncoder:
    """A SigLIP built straight from HF's classes (no cliplab preset): 2 text blocks, 1 image
    block, width 32; ``tokenizer`` defaults to cliplab's byte-level one."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    from cliplab.models.preprocess import PreprocessConfig
    from cliplab.models.tokenizer import byte_level_tokenizer

    torch.manual_seed(0)
    tok = tokenizer or byte_level_tokenizer(context_length)
    cfg = SiglipConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=context_length),
                       vision_config=dict(image_size=16, patch_size=8, hidden_size=32,
                                          intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2))
    return DualEncoder(SiglipModel(cfg), tok, PreprocessConfig(image_size=16),
                       context_length=context_length).eval()


def tiny_clip_config():
    """A tiny transformers `CLIPConfig` (32 wide, one block a tower, 16 px, byte-level vocab)
    for folders written by plain transformers."""
    from transformers import CLIPConfig

    return CLIPConfig(text_config=dict(vocab_size=260, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       max_position_embeddings=32, eos_token_id=3),
                      vision_config=dict(image_size=16, patch_size=8, hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2), projection_dim=8)
