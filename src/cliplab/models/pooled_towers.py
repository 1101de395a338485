"""Towers that compute their last block only where they pool.

HF's CLIP and ViT towers run every block on every token, then keep one token per sequence: the
class token of an image tower (CLIP's, or a ``ViTModel``'s before its dense+tanh pooler), the
first EOS token of CLIP's (causal) text tower. In the last block no other token's output is read,
so its query, attention output, residual and MLP are only needed at that one position; keys and
values still come from every token. Computing just that is exact (same features and gradients up
to float rounding) and skips ~10/12 of the last block's matrix products: ~14% of a 6-block
tower's work, ~19% of a 4-block one's, ~7% of a 12-block one's.

The weights are HF's own modules (LoRA layers, frozen parameters and checkpointing apply as
before); towers whose blocks are sharded with FSDP take HF's path, because the shard hooks
fire on a block's own forward, which this bypasses for the last block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.vit.modeling_vit import ViTLayer, ViTModel


def _pooled_blocks(tower: nn.Module) -> list[nn.Module] | None:
    """The blocks of an HF CLIP tower or of a ``ViTModel`` with its pooler, else None."""
    if isinstance(tower, ViTModel):
        layers = list(tower.layers) if tower.pooler is not None else []
        return layers if layers and all(isinstance(b, ViTLayer) for b in layers) else None
    layers = list(getattr(getattr(tower, "encoder", None), "layers", None) or [])
    return layers if layers and all(isinstance(b, CLIPEncoderLayer) for b in layers) else None


def supports_pooled_forward(tower: nn.Module) -> bool:
    """Whether ``tower`` is an HF CLIP tower or ``ViTModel`` whose last block can run at the
    pooled token only (not when its blocks are sharded with FSDP)."""
    from torch.distributed.fsdp import FSDPModule

    layers = _pooled_blocks(tower)
    return layers is not None and not any(isinstance(layer, FSDPModule) for layer in layers)


def _attend_at(attn: nn.Module, at: torch.Tensor, normed: torch.Tensor, heads: int,
               head_dim: int, scale: float, dropout: float,
               key_mask: torch.Tensor | None) -> torch.Tensor:
    """Multi-head attention of one query per sequence (from ``at``, ``[B, W]``) over every
    token of ``normed`` (``[B, N, W]``), before the output projection: ``[B, heads * head_dim]``.
    """
    batch = normed.shape[0]
    split = (batch, -1, heads, head_dim)
    queries = attn.q_proj(at).view(batch, 1, heads, head_dim).transpose(1, 2)
    keys = attn.k_proj(normed).view(split).transpose(1, 2)
    values = attn.v_proj(normed).view(split).transpose(1, 2)
    # one query per sequence: plain matmuls (HF's eager attention), cheap in every precision
    scores = (queries @ keys.transpose(-1, -2)) * scale  # [B, heads, 1, N]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(queries.dtype)
    weights = F.dropout(weights, p=dropout, training=attn.training)
    return (weights @ values).reshape(batch, heads * head_dim)  # [B, heads, 1, d] -> [B, h*d]


def last_block_at(layer: CLIPEncoderLayer, hidden: torch.Tensor, positions: torch.Tensor,
                  key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(hidden)[b, positions[b]]`` for every ``b``, as ``[B, W]``, computing the query,
    attention output and MLP at those positions only.

    ``key_mask``: ``[B, N]`` booleans, the keys each pooled position may attend to (None: all).
    """
    attn = layer.self_attn
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    normed = layer.layer_norm1(hidden)
    mixed = _attend_at(attn, normed[rows, positions], normed, attn.num_heads, attn.head_dim,
                       attn.scale, attn.dropout, key_mask)
    pooled = hidden[rows, positions] + attn.out_proj(mixed)
    return pooled + layer.mlp(layer.layer_norm2(pooled))


def vit_last_block_at_cls(layer: ViTLayer, hidden: torch.Tensor) -> torch.Tensor:
    """``layer(hidden)[:, 0]`` as ``[B, W]`` (HF's pre-LN ``ViTLayer``), computing the query,
    attention output and MLP at the class token only."""
    attn = layer.attention
    normed = layer.layernorm_before(hidden)
    mixed = _attend_at(attn, normed[:, 0], normed, attn.num_attention_heads, attn.head_dim,
                       attn.scaling, attn.attention_dropout, None)
    pooled = layer.dropout(attn.o_proj(mixed)) + hidden[:, 0]
    return layer.dropout(layer.mlp(layer.layernorm_after(pooled))) + pooled


def clip_image_pooled(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The pooled output of an HF CLIP vision tower (``tower(pixel_values).pooler_output``)."""
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    *blocks, last = tower.encoder.layers
    for block in blocks:
        hidden = block(hidden, None)
    cls = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)  # traceable
    return tower.post_layernorm(last_block_at(last, hidden, cls))


def vit_image_pooled(tower: ViTModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The pooled output of an HF ``ViTModel`` (``tower(pixel_values).pooler_output``: final
    layer norm, then the dense+tanh pooler, at the class token)."""
    weight = tower.embeddings.patch_embeddings.projection.weight
    hidden = tower.embeddings(pixel_values.to(weight.dtype))  # HF casts the same way
    *blocks, last = tower.layers
    for block in blocks:
        hidden = block(hidden, None)
    # the pooler reads token 0 of its input: give it the one token there is
    return tower.pooler(tower.layernorm(vit_last_block_at_cls(last, hidden))[:, None])


def image_pooled(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``tower(pixel_values).pooler_output`` of a tower `supports_pooled_forward` accepts."""
    if isinstance(tower, ViTModel):
        return vit_image_pooled(tower, pixel_values)
    return clip_image_pooled(tower, pixel_values)


def clip_text_pooled(tower: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                     eos_positions: torch.Tensor) -> torch.Tensor:
    """The pooled output of an HF CLIP text tower from its input embeddings ``hidden``
    (token + position embeddings), pooled at ``eos_positions``."""
    mask = create_causal_mask(config=tower.config, inputs_embeds=hidden,
                              attention_mask=attention_mask, cache=None)
    *blocks, last = tower.encoder.layers
    for block in blocks:
        hidden = block(hidden, mask, is_causal=True)
    keys = torch.arange(hidden.shape[1], device=hidden.device)
    visible = (keys[None, :] <= eos_positions[:, None]) & attention_mask.bool()
    return tower.final_layer_norm(last_block_at(last, hidden, eos_positions, visible))
