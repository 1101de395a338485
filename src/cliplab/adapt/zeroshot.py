"""Zero-shot head: the text classifier of hand-written prompts (CLIP's prompt ensembling),
the starting point every other adapter is measured against. Nothing is trained."""

from __future__ import annotations

import torch

from cliplab.adapt.base import AdaptContext, Adapter, method_options
from cliplab.adapt.options import PromptOptions
from cliplab.data.types import LabelledImages
from cliplab.evaluate.features import ImageFeatures
from cliplab.evaluate.zeroshot import zeroshot_classifier
from cliplab.models.dual_encoder import DualEncoder


# nothing is fitted to data.train's images: a class without any stays a class of the head
LEARNS_FROM_IMAGES = False


class Options(PromptOptions):
    """The zero-shot head has only its prompts."""


def class_texts(train: LabelledImages, names: str) -> list[str]:
    """What fills the prompt templates: ``"prompt"`` names/descriptions or bare ``"class"``
    names."""
    return list(train.prompt_names if names == "prompt" else train.classnames)


def text_head(model: DualEncoder, train: LabelledImages, options: PromptOptions) -> torch.Tensor:
    """The ``[C, D]`` zero-shot classifier that ``options`` (templates, names) describe."""
    return zeroshot_classifier(model, class_texts(train, options.names),
                               options.templates or train.templates)


class ZeroShotHead(Adapter):
    """Logits = logit scale x cosine of image embeddings to the class text embeddings."""

    method = "zeroshot"

    def __init__(self, model, classnames, options, weights: torch.Tensor, scale: torch.Tensor):
        super().__init__(model, classnames, options)
        self.weights, self.scale = weights, scale.reshape(())

    def feature_logits(self, feats: ImageFeatures, progress: bool = False) -> torch.Tensor:
        return self.scale * feats.embeddings.float() @ self.weights.t()

    def state(self):
        return {"weights": self.weights, "scale": self.scale.reshape(1)}

    @classmethod
    def from_state(cls, model, classnames, options, tensors):
        return cls(model, classnames, options, tensors["weights"], tensors["scale"])


def fit(model: DualEncoder, train: LabelledImages, options: Options | dict | None,
        ctx: AdaptContext) -> ZeroShotHead:
    opts = method_options(Options, options, "zeroshot")
    weights = text_head(model, train, opts)
    scale = model.logit_scale.detach().float().exp().cpu()
    return ZeroShotHead(model, train.classnames, opts.to_dict(), weights, scale)


ADAPTER = ZeroShotHead
