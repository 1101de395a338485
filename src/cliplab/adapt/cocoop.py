"""CoCoOp (Zhou et al., 2022, "Conditional Prompt Learning"): CoOp's context plus a
per-image shift from a small meta-net, so the prompts adapt to each image.

    v_m(x) = v_m + pi(x),   pi = Linear(D, D/16) - ReLU - Linear(D/16, W)

on the unit image embedding x. Context and meta-net train, both towers stay frozen. Every
image gets its own C prompts, so training and inference run the text tower C times per image
(the method's known cost). Inference scores the images in passes of at most ``infer_batch``
images and ``infer_prompts`` prompts (images x C), so its memory stays bounded whatever C (one
image's C prompts always run together); a training step runs ``batch_size`` x C prompts at
once, with gradients (C at the paper's batch 1). The paper's optimiser settings (SGD lr 0.002,
batch 1, 10 epochs, init "a photo of a"), on the cached features of the un-augmented shots,
where the paper augments each image every epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pydantic import Field

from cliplab.adapt.base import AdaptContext, Adapter, frozen, method_options, require_pytorch_model
from cliplab.adapt.coop import CoOp, PromptLearner, build_learner
from cliplab.adapt.coop import Options as CoOpOptions
from cliplab.adapt.training import train_steps
from cliplab.data.types import LabelledImages
from cliplab.evaluate.features import ImageFeatures
from cliplab.models.device import seeded
from cliplab.models.dual_encoder import DualEncoder


NEEDS_PYTORCH_MODEL = "it back-propagates through the text tower to learn the prompt context"

# The most prompts (images x classes) one inference pass runs through the text tower. 1024 keeps
# the default 64 images one pass up to 16 classes (10-class sets score as before). Measured peak
# memory on CPU: ~0.35 MB a prompt on tiny-clip's text tower, ~1.4 MB on a CLIP ViT-B-shaped one
# (width 512, 12 layers, 77 tokens): a pass stays near 0.4 / 1.5 GB however many classes, where
# one pass of 64 images of 997 classes (63 808 prompts) would take ~20 GB on tiny-clip.
INFER_PROMPTS = 1024


class Options(CoOpOptions):
    """CoOp's options plus the meta-net's width divisor and, at inference, the most images
    (``infer_batch``) and prompts, images x classes (``infer_prompts``), scored in one pass of
    the text tower; the paper trains 10 epochs at batch 1 (on augmented images; here on the
    cached un-augmented ones)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(1, ge=1)
    meta_reduction: int = Field(16, ge=1)
    infer_batch: int = Field(64, ge=1)
    infer_prompts: int = Field(INFER_PROMPTS, ge=1)


def images_per_pass(options: dict, classes: int) -> int:
    """Images scored per text-tower pass at inference: at most ``infer_batch``, and no more
    than keep images x ``classes`` within ``infer_prompts``; at least one (an image's prompts
    run together)."""
    budget = int(options.get("infer_prompts", INFER_PROMPTS))  # adapters saved before it
    return max(1, min(int(options["infer_batch"]), budget // max(1, classes)))


def meta_net(dim: int, width: int, reduction: int) -> nn.Sequential:
    hidden = max(1, dim // reduction)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width))


class CoCoOp(Adapter):
    method = "cocoop"

    def __init__(self, model, classnames, options, learner: PromptLearner, net: nn.Module,
                 scale: torch.Tensor):
        super().__init__(model, classnames, options)
        self.learner, self.net, self.scale = learner, net, scale.reshape(())

    def train_logits(self, img: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]``: each image against its own conditioned prompts."""
        text = self.learner.text_features(self.model, self.net(img))
        text = text.view(len(img), len(self.classnames), -1)
        return self.scale * torch.einsum("bd,bcd->bc", img, text)

    def feature_logits(self, feats: ImageFeatures, progress: bool = False) -> torch.Tensor:
        img = feats.embeddings.float()
        step = images_per_pass(self.options, len(self.classnames))
        out = []
        with frozen(self.model):
            self.net.eval()
            for i in tqdm(range(0, len(img), step), desc="cocoop prompts", leave=False,
                          disable=not progress or len(img) <= 10 * step):
                out.append(self.train_logits(img[i:i + step]))
        return torch.cat(out) if out else torch.empty(0, len(self.classnames))

    def for_classes(self, data: LabelledImages) -> "CoCoOp":
        """The learned context and meta-net for ``data``'s class names (base-to-novel)."""
        learner, opts = CoOp.transferred_learner(self, data)
        return CoCoOp(self.model, data.classnames, opts, learner, self.net, self.scale)

    def state(self):
        return {**CoOp.state(self), **{f"net.{k}": v for k, v in self.net.state_dict().items()}}

    @classmethod
    def from_state(cls, model, classnames, options, tensors):
        learner = CoOp.learner_from_state(model, options, tensors)
        net = meta_net(tensors["net.0.weight"].shape[1], learner.embeds.shape[-1],
                       int(options["meta_reduction"]))
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        return cls(model, classnames, options, learner, net, tensors["scale"])


def trains_on_features(options: Options) -> bool:
    """The context and meta-net train on the cached embeddings of the un-augmented images only:
    a training set of all its images is streamed."""
    return True


def fit(model: DualEncoder, train: LabelledImages, options: Options | dict | None,
        ctx: AdaptContext) -> CoCoOp:
    require_pytorch_model("cocoop", NEEDS_PYTORCH_MODEL, model)
    opts = method_options(Options, options, "cocoop").to_dict()
    learner = build_learner(model, train, opts, ctx.seed)
    feats = ctx.features(model, train, desc="encode train").embeddings.float()
    with seeded(ctx.seed):
        net = meta_net(feats.shape[1], learner.embeds.shape[-1], int(opts["meta_reduction"]))
    adapter = CoCoOp(model, train.classnames, opts, learner, net,
                     model.logit_scale.detach().float().exp().cpu())

    def loss(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(adapter.train_logits(feats[idx]), train.labels[idx])

    with frozen(model):
        net.train()
        history = train_steps([learner.ctx, *net.parameters()], loss, len(feats),
                              int(opts["epochs"]), int(opts["batch_size"]), float(opts["lr"]),
                              opts["optimizer"], float(opts["weight_decay"]),
                              int(opts["warmup"]), seed=ctx.seed, progress=ctx.progress,
                              desc="cocoop")
    net.eval()
    adapter.options["final_train_loss"] = history[-1]
    return adapter


ADAPTER = CoCoOp
