"""CoOp (Zhou et al., 2022): learn the prompt's context words as vectors.

Each class's prompt is ``[BOS] v_1 … v_M <class text>. [EOS]`` (no BOS for SigLIP) fed to the text tower as input
word embeddings (`DualEncoder.token_embedding` / `encode_text_embeddings`); only the M context
vectors train, both towers stay frozen. The context is shared by all classes (``unified``) or
one per class (``class_specific``), initialised from the word embeddings of ``init`` (e.g. "a
photo of a", so before training the prompts are exactly "a photo of a <class>.") or at random
(std 0.02; one draw per class when class-specific) when ``init`` is empty. The paper's
optimiser settings (SGD lr 0.002, momentum 0.9, cosine schedule, batch 32), but on the cached
features of the un-augmented shots: the paper crops and flips each image anew every epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from cliplab.adapt.base import AdaptContext, Adapter, frozen, method_options, require_pytorch_model
from cliplab.adapt.options import TrainingOptions
from cliplab.adapt.training import train_steps
from cliplab.adapt.zeroshot import class_texts
from cliplab.config import refuse_unused
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError, ModelError
from cliplab.evaluate.features import ImageFeatures
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.tokenizer import clean_text, clean_texts


NEEDS_PYTORCH_MODEL = "it back-propagates through the text tower to learn the prompt context"


class Options(TrainingOptions):
    """``init``: the words the context starts from ("" : ``n_ctx`` random vectors);
    ``class_specific``: one context per class; ``names``: class names or prompt names after
    the context. The paper's optimiser: SGD lr 0.002, batch 32 (without its augmentation: the
    shots' features are cached once); ``warmup`` counts steps of linear warm-up (1: none) — the
    paper's first epoch at a constant 1e-5 is not reproduced (every result of
    `benchmarks/papers.py` was measured so)."""

    init: str = "a photo of a"
    n_ctx: int = Field(4, ge=1)
    class_specific: bool = False
    names: Literal["prompt", "class"] = "class"
    lr: float = Field(0.002, ge=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    weight_decay: float = Field(5e-4, ge=0)
    warmup: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _n_ctx_only_without_init(self) -> Options:
        if clean_text(self.init):  # the context is init's tokens, as many as it has
            refuse_unused(self, ["n_ctx"], "unless init is '' (with init, the context is "
                          "init's tokens)")
        return self


def _pad(rows: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def leading_specials(tokenizer) -> int:
    """How many special tokens the tokenizer puts before the text (1 for CLIP's BOS or BERT's
    CLS, 0 for SigLIP's tokenizer, which only appends EOS)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    return next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)


def prompt_tokens(model: DualEncoder, names: list[str], init: str, n_ctx: int
                  ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Token ids and mask of every class's prompt, the first position S of the context slots
    and their number M: the slots are positions ``S … S+M-1``, right after the start token(s).

    With ``init`` the prompts are ``"{init} {name}."`` tokenized as a whole, and the slots hold
    ``init``'s tokens; without, ``n_ctx`` placeholder tokens are put before the class name.
    """
    tok = model.tokenizer
    start = leading_specials(tok)
    names, init = clean_texts(names), clean_text(init)  # as model.tokenize cleans its texts
    if init:
        prompts = [f"{init} {name}." for name in names]
        prefix = tok(init, add_special_tokens=False)["input_ids"]
        lengths = [len(r) for r in tok(prompts)["input_ids"]]
        enc = model.tokenize(prompts)
        ids, mask, m = enc["input_ids"], enc["attention_mask"], len(prefix)
        if max(lengths) <= model.context_length and \
                not (ids[:, start:start + m] == torch.tensor(prefix)).all():
            raise ModelError(f"the tokenizer does not keep {init!r} as the same tokens in front "
                             "of every class name; use init='' with n_ctx")
    else:
        if n_ctx < 1:
            raise ConfigError("coop option n_ctx must be at least 1 when init is empty")
        rows = tok([f"{name}." for name in names])["input_ids"]
        filler = tok("x", add_special_tokens=False)["input_ids"][:1] * n_ctx
        rows = [row[:start] + filler + row[start:] for row in rows]
        lengths = [len(r) for r in rows]
        width = min(max(lengths), model.context_length) if model.kind != "siglip" \
            else model.context_length
        ids, mask = _pad([r[:width] for r in rows], width, tok.pad_token_id or 0)
        m = n_ctx
    if max(lengths) > model.context_length:
        longest = names[max(range(len(names)), key=lambda i: lengths[i])]
        context = f"options.init ({len(prefix)} tokens)" if init else f"options.n_ctx={n_ctx}"
        raise ModelError(f"a prompt is longer than the text tower's {model.context_length} "
                         f"tokens ({max(lengths)} with class {longest!r}); shorten the class "
                         f"names or the context, {context}")
    return ids, mask, start, m


class PromptLearner(nn.Module):
    """The learnable context and the fixed rest of every class prompt."""

    def __init__(self, model: DualEncoder, ids: torch.Tensor, mask: torch.Tensor, start: int,
                 n_ctx: int, class_specific: bool, init: bool, seed: int = 0):
        super().__init__()
        self.start, self.n_ctx = start, n_ctx
        self.register_buffer("ids", ids)
        self.register_buffer("mask", mask)
        with torch.no_grad():
            embeds = model.token_embedding(ids.to(model.device)).float().cpu()
        self.register_buffer("embeds", embeds)  # frozen word embeddings of the whole prompt
        if init:  # each class's context starts from the same words
            ctx = embeds[0, start:start + n_ctx].clone()
            if class_specific:
                ctx = ctx.unsqueeze(0).repeat(len(ids), 1, 1)
        else:  # each class's context its own draw, as the paper's code draws them
            g = torch.Generator().manual_seed(seed)
            shape = (len(ids),) * class_specific + (n_ctx, embeds.shape[-1])
            ctx = torch.randn(*shape, generator=g) * 0.02
        self.ctx = nn.Parameter(ctx)

    def prompt_embeddings(self, shift: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings ``[C, L, W]``; with ``shift [B, W]`` (CoCoOp's meta-net output),
        one prompt set per image: ``[B * C, L, W]``, image-major."""
        c = len(self.ids)
        ctx = self.ctx if self.ctx.ndim == 3 else self.ctx.unsqueeze(0).expand(c, -1, -1)
        head, tail = self.embeds[:, :self.start], self.embeds[:, self.start + self.n_ctx:]
        if shift is None:
            return torch.cat([head, ctx, tail], dim=1)
        b = len(shift)
        ctx = ctx.unsqueeze(0) + shift[:, None, None, :]  # [B, C, M, W]
        rest = [t.unsqueeze(0).expand(b, -1, -1, -1) for t in (head, tail)]
        return torch.cat([rest[0], ctx, rest[1]], dim=2).flatten(0, 1)

    def text_features(self, model: DualEncoder, shift: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Unit text embeddings ``[C, D]`` (or ``[B * C, D]`` with ``shift``)."""
        embeds = self.prompt_embeddings(shift)
        reps = len(embeds) // len(self.ids)
        ids, mask = self.ids.repeat(reps, 1), self.mask.repeat(reps, 1)
        dev = model.device
        out = model.encode_text_embeddings(embeds.to(dev, model.text_tower.dtype), ids.to(dev),
                                           mask.to(dev))
        return out.float().cpu()


class CoOp(Adapter):
    method = "coop"

    def __init__(self, model, classnames, options, learner: PromptLearner, scale: torch.Tensor):
        super().__init__(model, classnames, options)
        self.learner, self.scale = learner, scale.reshape(())
        self._text: torch.Tensor | None = None

    def train_logits(self, img: torch.Tensor) -> torch.Tensor:
        return self.scale * img @ self.learner.text_features(self.model).t()

    def feature_logits(self, feats: ImageFeatures, progress: bool = False) -> torch.Tensor:
        if self._text is None:  # the prompts are fixed once trained: embed them once
            with frozen(self.model):
                self._text = self.learner.text_features(self.model)
        return self.scale * feats.embeddings.float() @ self._text.t()

    def transferred_learner(self, data: LabelledImages) -> tuple[PromptLearner, dict]:
        """A prompt learner for ``data``'s classes holding this adapter's learned context, and
        its options; only a unified context (one for all classes) transfers."""
        if self.options["class_specific"]:
            raise ModelError(f"{self.method}: a class-specific context belongs to the classes it "
                             "was learned on; learn a unified one (class_specific: false) to "
                             "apply it to other classes")
        opts = dict(self.options)
        learner = build_learner(self.model, data, opts, seed=0)
        if learner.ctx.shape != self.learner.ctx.shape:
            raise ModelError(f"{self.method}: the learned context has shape "
                             f"{tuple(self.learner.ctx.shape)}, the new classes' prompts need "
                             f"{tuple(learner.ctx.shape)}")
        learner.ctx.data.copy_(self.learner.ctx.data)
        return learner, opts

    def for_classes(self, data: LabelledImages) -> "CoOp":
        """The learned context in front of ``data``'s class names: base-to-novel evaluation
        applies prompts learned on some classes to classes never seen in learning."""
        learner, opts = self.transferred_learner(data)
        return CoOp(self.model, data.classnames, opts, learner, self.scale)

    def state(self):
        return {"ctx": self.learner.ctx, "ids": self.learner.ids, "mask": self.learner.mask,
                "scale": self.scale.reshape(1)}

    @classmethod
    def learner_from_state(cls, model, options, tensors) -> PromptLearner:
        learner = PromptLearner(model, tensors["ids"].long(), tensors["mask"].long(),
                                int(options["ctx_start"]), int(options["n_ctx_used"]),
                                bool(options["class_specific"]), init=True)
        learner.ctx.data.copy_(tensors["ctx"])
        return learner

    @classmethod
    def from_state(cls, model, classnames, options, tensors):
        return cls(model, classnames, options, cls.learner_from_state(model, options, tensors),
                   tensors["scale"])


def build_learner(model: DualEncoder, train: LabelledImages, opts: dict, seed: int
                  ) -> PromptLearner:
    """The prompt learner ``opts`` describe; records the context's slots and the prompts'
    words in ``opts``."""
    names = class_texts(train, opts["names"])
    ids, mask, start, m = prompt_tokens(model, names, opts["init"], int(opts["n_ctx"]))
    opts["ctx_start"], opts["n_ctx_used"] = start, m
    prefix = opts["init"] or " ".join(["X"] * m)  # X: a learned vector with no word behind it
    opts["prompts"] = [f"{prefix} {n}." for n in names]
    return PromptLearner(model, ids, mask, start, m, bool(opts["class_specific"]),
                         bool(opts["init"]), seed)


def trains_on_features(options: Options) -> bool:
    """The context trains on the cached embeddings of the un-augmented images only: a training
    set of all its images is streamed."""
    return True


def fit(model: DualEncoder, train: LabelledImages, options: Options | dict | None,
        ctx: AdaptContext) -> CoOp:
    require_pytorch_model("coop", NEEDS_PYTORCH_MODEL, model)
    opts = method_options(Options, options, "coop").to_dict()
    learner = build_learner(model, train, opts, ctx.seed)
    adapter = CoOp(model, train.classnames, opts, learner,
                   model.logit_scale.detach().float().exp().cpu())
    feats = ctx.features(model, train, desc="encode train").embeddings.float()

    def loss(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(adapter.train_logits(feats[idx]), train.labels[idx])

    with frozen(model):
        history = train_steps([learner.ctx], loss, len(feats), int(opts["epochs"]),
                              int(opts["batch_size"]), float(opts["lr"]), opts["optimizer"],
                              float(opts["weight_decay"]), int(opts["warmup"]), seed=ctx.seed,
                              progress=ctx.progress, desc="coop")
    adapter.options["final_train_loss"] = history[-1]
    return adapter


ADAPTER = CoOp
