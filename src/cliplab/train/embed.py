"""The forward passes of a training step, under the run's precision: uint8 images to model
inputs (with the run's augmentation), and (micro-)batches to unnormalised embeddings."""

from __future__ import annotations

import contextlib
from dataclasses import asdict

import torch

from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.preprocess import AugmentConfig
from cliplab.train.step_batch import TextSource


def augment_config(model: DualEncoder, augment: bool | dict) -> AugmentConfig | None:
    """The model's augmentation with the ``train.augment`` overrides applied (None: the model's
    own, as is); the model's config is not changed."""
    if not isinstance(augment, dict):
        return None
    base = asdict(model.preprocess_config.augment)
    base.update({k: tuple(v) if isinstance(v, list) else v for k, v in augment.items()})
    return AugmentConfig(**base)


class Embedder:
    """``model``'s training-time forward passes on ``device``; ``precision`` "bf16" runs them
    under autocast, "fp32" as they are."""

    def __init__(self, model: DualEncoder, device: torch.device, precision: str,
                 augment: bool | dict):
        self.model, self.device, self.precision = model, device, precision
        self.train_augment = bool(augment)
        self.augment = augment_config(model, augment)

    def autocast(self):
        """bf16 autocast when the run asks for it. On CPU it also switches the towers to HF's
        eager attention (matmuls + fp32 softmax): PyTorch's CPU flash-attention backward in
        bf16 is slow at CLIP's short sequences (a quarter of the step in the throughput
        benchmark's profile); on CUDA the model keeps its SDPA kernels."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        if self.device.type == "cpu":
            stack.enter_context(self.model.attention_implementation("eager"))
        return stack

    def pixels(self, images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Model inputs of uint8 ``images``, randomly augmented when ``train.augment`` is on."""
        with self.autocast():  # as the recipes' numbers were measured
            return self.model.preprocess(images, train=self.train_augment, generator=rng,
                                         augment=self.augment)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings of model inputs ``[b, C, H, W]``, or of a locked
        tower's cached features ``[b, D]`` (only the projection runs). Call under `autocast`."""
        if images.dim() == 2:
            return self.model.project_image(images.to(self.device))
        return self.model.encode_image(images.to(self.device), normalize=False)

    def texts(self, source: TextSource, captions: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings of rows ``captions`` of ``source``: cached features of
        a locked tower (only the projection runs) or tokens run through the tower. Call under
        `autocast`."""
        if isinstance(source, torch.Tensor):
            return self.model.project_text(source[captions.to(self.device)])
        ids, mask = source["input_ids"][captions], source["attention_mask"][captions]
        if self.model.kind != "siglip":  # SigLIP expects its fixed max-length padding
            width = int(mask.sum(1).max())
            ids, mask = ids[:, :width], mask[:, :width]
        return self.model.encode_text(ids.to(self.device), mask.to(self.device), normalize=False)

    def pairs(self, images: torch.Tensor, source: TextSource, captions: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised image and text embeddings of one (micro-)batch of pairs."""
        with self.autocast():
            return self.images(images), self.texts(source, captions)
