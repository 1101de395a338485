"""Full fine-tuning of the image tower with a classification head initialised from the
zero-shot text classifier (the fine-tuning WiSE-FT starts from).

The image tower and its projection train, with the head, by cross-entropy through the one
`Trainer` loop; the text tower, text projection and temperature stay as they were. The result
is a run folder whose checkpoints (``checkpoints/step-N/model``) are normal model folders plus
``head.safetensors``; each ``cliplab.json`` records the pretrained origin
(``"base": {path, fingerprint}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import field_validator

from cliplab.adapt.base import (AdaptContext, Adapter, kept_training_state, method_options,
                               require_pytorch_model, written_inside)
from cliplab.adapt.common import checked_train_section, count_parameters
from cliplab.adapt.head import ClassifierHead, zeroshot_classifier_head
from cliplab.models.folder import model_fingerprint, require_origin, write_origin
from cliplab.adapt.training import (check_batch_fits_images, settings_that_ran,
                                    trainer_config)
from cliplab.config import Section
from cliplab.data.types import LabelledImages
from cliplab.evaluate.features import ImageFeatures
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.resolve import model_folder
from cliplab.output_folder import built_beside, resolved_path
from cliplab.runs import RunDir
from cliplab.train.trainer import MODEL_DIR, TrainConfig, Trainer

NEEDS_PYTORCH_MODEL = "it trains the model's weights"

# Fine-tuning moves pretrained weights: a small rate, a short warm-up, no flips by default.
TRAIN_DEFAULTS = {"epochs": 2, "batch_size": 128, "lr": 1e-4, "weight_decay": 0.1,
                  "warmup": 0.1, "augment": {"hflip": False}}


class Options(Section):
    """``train_head``: the zero-shot-initialised head trains with the tower (false: fixed);
    ``train``: the `Trainer`'s settings (``cliplab.train.trainer.TrainConfig``) over
    ``TRAIN_DEFAULTS``."""

    train_head: bool = True
    train: dict[str, Any] = {}

    @field_validator("train")
    @classmethod
    def _trainer_settings(cls, value: dict) -> dict:
        return checked_train_section(value, TRAIN_DEFAULTS)


def image_tower_trainable(model: DualEncoder) -> None:
    """Only the image tower and its projection train; everything else is frozen."""
    model.model.requires_grad_(False)
    model.vision_tower.requires_grad_(True)
    proj = getattr(model.model, "visual_projection", None)
    if proj is not None:
        proj.requires_grad_(True)


def save_finetuned(model: DualEncoder, head: ClassifierHead, folder: str | Path,
                   base_path: str, fingerprint: str, **extra) -> Path:
    """A model folder (``DualEncoder.save``) + ``head.safetensors`` + the origin record, built
    beside ``folder`` and renamed in whole: a kill between the model and its head left a folder
    that eval scored as a plain model, without a word."""
    folder = Path(folder)
    with built_beside(folder) as work:
        model.save(work)
        head.save(work)
        write_origin(work, base_path, fingerprint, **extra)
    return folder


def load_finetuned(folder: str | Path, device: str | torch.device = "cpu"
                   ) -> tuple[DualEncoder, ClassifierHead]:
    """The model (on ``device``) and head (on the CPU, as every eval head) of a fine-tuned
    model folder (or of a finetune run or checkpoint folder's model)."""
    folder = model_folder(folder)
    require_origin(folder)  # fails clearly on a folder that is not a fine-tune
    return DualEncoder.load(folder, device), ClassifierHead.load(folder)


def finetune(model: DualEncoder, train: LabelledImages, train_cfg: TrainConfig,
             run: RunDir | None, base_path: str, train_head: bool = True,
             fingerprint: str | None = None) -> tuple[ClassifierHead, Trainer]:
    """Fine-tune ``model``'s image tower (in place) with a zero-shot-initialised head; with a
    run folder, checkpoints are fine-tuned model folders. Returns the head (on the CPU) and the
    trainer."""
    check_batch_fits_images(train_cfg.batch_size, len(train))
    fingerprint = fingerprint or model_fingerprint(model)
    head = zeroshot_classifier_head(model, train)
    head.weight.requires_grad_(train_head)
    image_tower_trainable(model)

    def save(folder: Path) -> None:
        save_finetuned(model, head, folder / MODEL_DIR, base_path, fingerprint)

    trainer = Trainer(model, train_cfg, run, head=head, save_model=save, settings="options.train")
    trainer.fit(train)
    return head.cpu(), trainer  # an eval head, on the CPU as the features it scores


class FineTuned(Adapter):
    """A fine-tuned model and its head: logits = the head on the model's image embeddings."""

    method = "finetune"

    def __init__(self, model: DualEncoder, classnames, options: dict, head: ClassifierHead,
                 base_path: str, fingerprint: str, model_dir: Path | None = None,
                 params: dict | None = None):
        super().__init__(model, classnames, options)
        self.head, self.base_path, self.fingerprint = head, base_path, fingerprint
        self.model_dir = model_dir
        # what trained (fit leaves the model's flags as it found them): counted while it did
        self.params = params or count_parameters(model, head)

    def feature_logits(self, feats: ImageFeatures, progress: bool = False) -> Any:
        return self.head.logits(feats)

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """The model folder ``folder/model``, unless training already wrote it inside
        ``folder`` (the run's last checkpoint: that one is returned)."""
        if self.model_dir is not None and written_inside(self.model_dir, folder):
            return self.model_dir
        written = save_finetuned(self.model, self.head, Path(folder) / MODEL_DIR,
                                 self.base_path, self.fingerprint)
        self.model_dir = self.model_dir or written
        return written

    def summary(self) -> dict:
        params = self.params
        return {"params": {**params, "fraction": params["trainable"] / params["total"]},
                "model_dir": resolved_path(self.model_dir)}


def fit(model: DualEncoder, train: LabelledImages, options: Options | dict | None,
        ctx: AdaptContext) -> FineTuned:
    """Fine-tune ``model``'s weights in place on the whole of ``train`` (its ``requires_grad``
    flags and train/eval mode are left as they were); checkpoints go to ``ctx.run``."""
    require_pytorch_model("finetune", NEEDS_PYTORCH_MODEL, model)
    opts = method_options(Options, options, "finetune")
    train_cfg = trainer_config(TRAIN_DEFAULTS, opts.train, seed=ctx.seed, lock_text=True,
                               progress=ctx.progress, device=model.device)
    fingerprint = model_fingerprint(model)
    with kept_training_state(model):
        head, trainer = finetune(model, train, train_cfg, ctx.run, ctx.origin(model),
                                 opts.train_head, fingerprint)
        params = count_parameters(model, head)
    model_dir = trainer.last_checkpoint / MODEL_DIR if trainer.last_checkpoint else None
    adapter = FineTuned(model, train.classnames, opts.to_dict(), head, ctx.origin(model),
                        fingerprint, model_dir, params)
    adapter.trained_with = settings_that_ran(train_cfg, trainer.precision)
    return adapter
