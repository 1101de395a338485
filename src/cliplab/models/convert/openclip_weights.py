"""OpenCLIP ↔ transformers CLIP state dicts: the key mapping, in both directions.

The two formats hold the same tensors: OpenCLIP fuses q/k/v into ``attn.in_proj_weight``
(``[3W, W]``, q then k then v), names the MLP ``c_fc``/``c_proj`` and the norms ``ln_1``/``ln_2``,
and stores the projections as ``[in, out]`` matrices used as ``x @ proj`` where HF's ``Linear``
holds ``[out, in]``. Every tensor is moved, split or transposed, never recomputed, so a round trip
gives back bit-identical tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cliplab.errors import ModelError

_BLOCK = {  # OpenCLIP resblock suffix → HF encoder layer suffix (q/k/v handled apart)
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_VISION = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TEXT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_IGNORED = {"attn_mask", "text.attn_mask"}  # a buffer some OpenCLIP versions saved
_UNSUPPORTED_HINT = "not part of an OpenCLIP ViT + text transformer CLIP (unsupported architecture?)"


def _towers(custom_text: bool) -> list[tuple[str, str]]:
    """(OpenCLIP prefix of the resblocks, HF prefix of the layers) per tower."""
    text = "text.transformer.resblocks." if custom_text else "transformer.resblocks."
    return [("visual.transformer.resblocks.", "vision_model.encoder.layers."),
            (text, "text_model.encoder.layers.")]


def _map_key(oc_key: str, tensor: torch.Tensor, custom_text: bool, file: Path
             ) -> list[tuple[str, torch.Tensor]] | None:
    """The HF tensors one OpenCLIP tensor becomes (q/k/v split, projections transposed), or
    None if the key has no place in an HF ``CLIPModel``."""
    tp = "text." if custom_text else ""
    if oc_key in _VISION:
        return [(_VISION[oc_key], tensor)]
    if oc_key.startswith(tp) and oc_key[len(tp):] in _TEXT:
        return [(_TEXT[oc_key[len(tp):]], tensor)]
    if oc_key in ("visual.proj", tp + "text_projection"):
        if tensor.ndim != 2:
            raise ModelError(f"{file}: {oc_key} has shape {list(tensor.shape)}, expected a 2-D "
                             "projection")
        return [(_TRANSPOSED[oc_key[len(tp):] if oc_key != "visual.proj" else oc_key],
                 tensor.t().contiguous())]
    if oc_key == tp + "text_projection.weight":  # OpenCLIP's nn.Linear projection (no bias)
        return [("text_projection.weight", tensor)]
    if oc_key == "logit_scale":
        return [("logit_scale", tensor.reshape(()))]
    for oc_prefix, hf_prefix in _towers(custom_text):
        if not oc_key.startswith(oc_prefix):
            continue
        index, _, suffix = oc_key[len(oc_prefix):].partition(".")
        layer = f"{hf_prefix}{index}."
        if suffix in _BLOCK:
            return [(layer + _BLOCK[suffix], tensor)]
        if suffix in ("attn.in_proj_weight", "attn.in_proj_bias"):
            if tensor.shape[0] % 3:
                raise ModelError(f"{file}: {oc_key} has shape {list(tensor.shape)}, not three "
                                 "stacked q/k/v blocks")
            kind = suffix.rsplit("_", 1)[1]
            return [(f"{layer}self_attn.{name}_proj.{kind}", part.contiguous())
                    for name, part in zip("qkv", tensor.chunk(3, dim=0))]
    return None


def openclip_to_hf(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                   file: Path, custom_text: bool = False) -> dict[str, torch.Tensor]:
    """The HF ``CLIPModel`` state dict of an OpenCLIP one; ``expected`` (the HF model's own state
    dict) gives the keys and shapes every tensor must have. Unexpected, misshapen and missing
    keys are reported with the file and the OpenCLIP key."""
    out: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    for oc_key, tensor in state.items():
        if oc_key in _IGNORED:
            continue
        parts = _map_key(oc_key, tensor, custom_text, file)
        if parts is None:
            raise ModelError(f"{file}: unexpected key {oc_key!r}: {_UNSUPPORTED_HINT}")
        for hf_key, part in parts:
            if hf_key not in expected:
                raise ModelError(f"{file}: key {oc_key!r} has no place in the model the config "
                                 "describes (more layers than the config says?)")
            if part.shape != expected[hf_key].shape:
                want = list(expected[hf_key].shape)
                if oc_key != hf_key and oc_key in ("visual.proj", "text_projection",
                                                   "text.text_projection"):
                    want = want[::-1]
                raise ModelError(f"{file}: key {oc_key!r} has shape {list(tensor.shape)}, the "
                                 f"config implies {want}" if len(parts) == 1 else
                                 f"{file}: key {oc_key!r} has shape {list(tensor.shape)}, the "
                                 f"config implies 3 x {want}")
            out[hf_key] = part
            source_of[hf_key] = oc_key
    missing = [k for k in expected if k not in out and not k.endswith("position_ids")]
    if missing:
        raise ModelError(f"{file}: missing key {hf_to_openclip_key(missing[0], custom_text)!r} "
                         f"({len(missing)} tensors of the model have no source)")
    return out


def hf_to_openclip_key(hf_key: str, custom_text: bool = False) -> str:
    """The OpenCLIP key an HF CLIP key comes from (for messages)."""
    tp = "text." if custom_text else ""
    for table, prefix in ((_VISION, ""), (_TEXT, tp)):
        for oc, hf in table.items():
            if hf == hf_key:
                return prefix + oc
    for oc, hf in _TRANSPOSED.items():
        if hf == hf_key:
            return oc if oc == "visual.proj" else tp + oc
    for oc_prefix, hf_prefix in _towers(custom_text):
        if hf_key.startswith(hf_prefix):
            index, _, suffix = hf_key[len(hf_prefix):].partition(".")
            for oc, hf in _BLOCK.items():
                if hf == suffix:
                    return f"{oc_prefix}{index}.{oc}"
            return f"{oc_prefix}{index}.attn.in_proj_{suffix.rsplit('.', 1)[-1]}"
    return hf_key


def hf_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The OpenCLIP ``CLIP`` state dict of an HF ``CLIPModel`` one (q/k/v fused back)."""
    inverse = {hf: oc for table in (_VISION, _TEXT) for oc, hf in table.items()}
    inverse_t = {hf: oc for oc, hf in _TRANSPOSED.items()}
    block = {hf: oc for oc, hf in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for hf_key, tensor in state.items():
        if hf_key.endswith("position_ids"):
            continue
        if hf_key in inverse:
            out[inverse[hf_key]] = tensor
        elif hf_key in inverse_t:
            out[inverse_t[hf_key]] = tensor.t().contiguous()
        elif hf_key == "logit_scale":
            out["logit_scale"] = tensor
        else:
            for oc_prefix, hf_prefix in _towers(False):
                if not hf_key.startswith(hf_prefix):
                    continue
                index, _, suffix = hf_key[len(hf_prefix):].partition(".")
                module, _, kind = suffix.rpartition(".")
                if suffix in block:
                    out[f"{oc_prefix}{index}.{block[suffix]}"] = tensor
                    break
                if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                    fused.setdefault(f"{oc_prefix}{index}.attn.in_proj_{kind}", {})[
                        module[len("self_attn.")]] = tensor
                    break
            else:
                raise ModelError(f"HF key {hf_key!r} has no OpenCLIP equivalent")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
