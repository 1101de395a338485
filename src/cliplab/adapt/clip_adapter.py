"""CLIP-Adapter (Gao et al., 2021): a residual bottleneck MLP on the frozen image embedding.

    f' = ratio * MLP(f) + (1 - ratio) * f,     MLP(f) = ReLU(W2 ReLU(W1 f))   (no biases)

and logits = logit scale x cos(f', text classifier). Only the MLP trains (cross-entropy on the
cached features of the un-augmented k shots; the paper's code crops and flips them every
epoch); the residual ratio keeps the zero-shot knowledge (ratio 0 is the zero-shot head
exactly). Reduction 4 and ratio 0.2 are the paper's defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cliplab.adapt.base import AdaptContext, Adapter, method_options
from cliplab.adapt.options import PromptOptions, TrainingOptions
from cliplab.adapt.training import train_steps
from cliplab.adapt.zeroshot import text_head
from cliplab.data.types import LabelledImages
from cliplab.evaluate.features import ImageFeatures
from cliplab.models.device import seeded
from cliplab.models.dual_encoder import DualEncoder


class Options(PromptOptions, TrainingOptions):
    """``ratio``: weight of the adapted embedding in the residual blend (0: zero-shot);
    ``reduction``: the bottleneck's width divisor; AdamW training on the k-shot features."""

    ratio: float = Field(0.2, ge=0, le=1)
    reduction: int = Field(4, ge=1)


def bottleneck(dim: int, reduction: int) -> nn.Sequential:
    """Linear(dim, dim/r) - ReLU - Linear(dim/r, dim) - ReLU, without biases (the paper's)."""
    hidden = max(1, dim // reduction)
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim, bias=False), nn.ReLU(inplace=True))


class ClipAdapter(Adapter):
    method = "clip-adapter"

    def __init__(self, model, classnames, options, weights: torch.Tensor, scale: torch.Tensor,
                 mlp: nn.Module | None = None):
        super().__init__(model, classnames, options)
        self.weights, self.scale = weights, scale.reshape(())
        self.mlp = mlp or bottleneck(weights.shape[1], int(options["reduction"]))

    def adapted(self, feats: torch.Tensor) -> torch.Tensor:
        """The residual blend of the adapted and the original embedding (unnormalised)."""
        ratio = float(self.options["ratio"])
        return ratio * self.mlp(feats) + (1 - ratio) * feats

    def embedding_logits(self, feats: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(self.adapted(feats), dim=-1) @ self.weights.t()

    def feature_logits(self, feats: ImageFeatures, progress: bool = False) -> torch.Tensor:
        self.mlp.eval()
        return self.embedding_logits(feats.embeddings.float())

    def state(self):
        return {"weights": self.weights, "scale": self.scale.reshape(1),
                **{f"mlp.{k}": v for k, v in self.mlp.state_dict().items()}}

    @classmethod
    def from_state(cls, model, classnames, options, tensors):
        adapter = cls(model, classnames, options, tensors["weights"], tensors["scale"])
        adapter.mlp.load_state_dict({k[4:]: v for k, v in tensors.items()
                                     if k.startswith("mlp.")})
        return adapter


def trains_on_features(options: Options) -> bool:
    """The MLP trains on the cached embeddings of the un-augmented images only: a training
    set of all its images is streamed."""
    return True


def fit(model: DualEncoder, train: LabelledImages, options: Options | dict | None,
        ctx: AdaptContext) -> ClipAdapter:
    given = method_options(Options, options, "clip-adapter")
    opts = given.to_dict()
    weights = text_head(model, train, given)
    scale = model.logit_scale.detach().float().exp().cpu()
    with seeded(ctx.seed):
        adapter = ClipAdapter(model, train.classnames, opts, weights, scale)
    feats = ctx.features(model, train, desc="encode train").embeddings.float()

    def loss(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(adapter.embedding_logits(feats[idx]), train.labels[idx])

    adapter.mlp.train()
    history = train_steps(list(adapter.mlp.parameters()), loss, len(feats), int(opts["epochs"]),
                          int(opts["batch_size"]), float(opts["lr"]), opts["optimizer"],
                          float(opts["weight_decay"]), seed=ctx.seed, progress=ctx.progress,
                          desc="clip-adapter")
    adapter.mlp.eval()
    adapter.options["final_train_loss"] = history[-1]
    return adapter


ADAPTER = ClipAdapter
