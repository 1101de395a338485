"""Image embeddings of a dataset, computed in batches under no_grad with a progress bar."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cliplab.errors import InputError, ModelError, checked_batch_size
from cliplab.models.dual_encoder import DualEncoder, evaluating
from cliplab.models.finite import finite_embeddings
from cliplab.models.precision import autocast
from cliplab.models.preprocess import to_uint8_batch


@dataclass
class ImageFeatures:
    """``embeddings``: unit-length projected features ``[N, D]`` (zero-shot, retrieval);
    ``backbone``: pooled tower output before the projection ``[N, H]``; ``probe``: the
    ``tokens`` or ``layers`` probe features of ``DualEncoder.image_backbone_and_probe``, when
    asked for."""

    embeddings: torch.Tensor
    backbone: torch.Tensor
    probe: torch.Tensor | None = None
    probe_kind: str | None = None

    def get(self, name: str) -> torch.Tensor:
        """The features named ``embeddings``, ``backbone``, ``tokens`` or ``layers``."""
        if name in ("embeddings", "backbone"):
            return getattr(self, name)
        if name == self.probe_kind and self.probe is not None:
            return self.probe
        raise ValueError(f"no {name!r} features were computed (choose one of {PROBE_FEATURES})")


PROBE_FEATURES = ("embeddings", "backbone", "tokens", "layers")
EXTRA_PROBES = ("tokens", "layers")  # the ones computed only when asked for
DEFAULT_PROBE_LAYERS = 4  # blocks the ``layers`` probe reads, unless told
ENCODE_BATCH = 500  # images per forward pass of `encode_images`, unless told


def image_blocks(model: DualEncoder) -> int | None:
    """How many blocks the model's image tower has (None where that cannot be told, e.g. an
    ONNX export): a ``layers`` probe of more would take every hidden state, the patch
    embeddings too."""
    tower_layers = getattr(model, "tower_layers", None)
    if tower_layers is None:
        return None
    try:
        return len(tower_layers("image"))
    except ModelError:  # a tower whose blocks cannot be found
        return None


@torch.no_grad()
def encode_images(model: DualEncoder, images: torch.Tensor,
                  batch_size: int = ENCODE_BATCH,
                  progress: bool = True, desc: str = "encode images",
                  probe: str | None = None, probe_layers: int = DEFAULT_PROBE_LAYERS,
                  precision: str = "fp32") -> ImageFeatures:
    """Encode uint8 images ``[N, H, W, C]`` (or what `to_uint8_batch` takes: one image, a list
    of PIL images of one size) with ``model`` in eval mode; with ``probe`` set to
    ``"tokens"`` or ``"layers"`` also those probe features, from the same forward pass.
    ``precision="bf16"`` runs the towers under bfloat16 autocast (outputs stay float32)."""
    if probe is not None and probe not in PROBE_FEATURES:
        raise InputError(f"unknown probe features {probe!r}; choose one of {PROBE_FEATURES}")
    images = to_uint8_batch(images)  # one [H, W, C] image is one image, not H rows of pixels
    batch_size = checked_batch_size(batch_size)
    extra = probe if probe in EXTRA_PROBES else None
    emb, back, probes = [], [], []
    with evaluating(model), autocast(precision, model.device.type):
        batches = tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress,
                       leave=False)
        for i in batches:
            pixels = model.preprocess(images[i:i + batch_size]).to(model.device)
            if extra:
                b, feats = model.image_backbone_and_probe(pixels, extra, probe_layers)
                probes.append(feats.float().cpu())
            else:
                b = model.image_backbone(pixels)
            emb.append(finite_embeddings(
                F.normalize(model.project_image(b).float(), dim=-1).cpu(), "image"))
            back.append(b.float().cpu())
    if not emb:
        return ImageFeatures(torch.empty(0, model.embed_dim), torch.empty(0, 0))
    return ImageFeatures(torch.cat(emb), torch.cat(back), torch.cat(probes) if probes else None,
                         extra)
