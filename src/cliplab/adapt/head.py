"""A classification head on image embeddings, initialised from the zero-shot text classifier.

``logits = scale * normalize(image_embedding) @ weight.T``: at initialisation ``weight`` is the
zero-shot classifier (unit rows, one per class) and ``scale`` the model's temperature, so the
head's logits are exactly the zero-shot logits (what WiSE-FT fine-tunes from).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from cliplab.data.types import LabelledImages
from cliplab.errors import ModelError
from cliplab.evaluate.features import ImageFeatures
from cliplab.evaluate.tasks.base import LinearHead, class_order
from cliplab.evaluate.zeroshot import zeroshot_classifier
from cliplab.file_modes import save_tensors
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.hf_files import note_head_in_card
from cliplab.models.resolve import model_folder

HEAD_FILE = "head.safetensors"


class ClassifierHead(nn.Module):
    """Linear classifier over unit image embeddings with a fixed temperature; also an eval
    `Classifier` (``TaskContext(classifier=head)``) for data of its own classes."""

    probe = None  # it reads the embeddings only

    def __init__(self, weight: torch.Tensor, scale: float, classnames: Sequence[str]):
        super().__init__()
        if weight.ndim != 2 or weight.shape[0] != len(classnames):
            raise ModelError(f"head weight {tuple(weight.shape)} does not fit "
                             f"{len(classnames)} classes")
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.classnames = list(classnames)

    @classmethod
    def from_zeroshot(cls, model: DualEncoder, classnames: Sequence[str],
                      prompt_names: Sequence[str], templates: Sequence[str]) -> "ClassifierHead":
        """The zero-shot classifier of ``prompt_names`` x ``templates`` at the model's scale."""
        weight = zeroshot_classifier(model, prompt_names, templates)
        return cls(weight, model.logit_scale.detach().exp().item(), classnames)

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of (unnormalised or unit) image embeddings ``[B, D]``."""
        feats = F.normalize(image_embeddings, dim=-1)
        return self.scale * feats @ self.weight.to(feats.dtype).t()

    @torch.no_grad()
    def logits(self, features: ImageFeatures, progress: bool = False) -> torch.Tensor:
        """The eval `Classifier` face: logits of image features' embeddings (features and
        logits on the CPU, as every eval head's; the head may sit on the GPU it trained on)."""
        return self(features.embeddings.float().to(self.weight.device)).cpu()

    def in_class_order(self, classnames: Sequence[str]) -> ClassifierHead | None:
        """This head with its rows in the order of ``classnames`` (itself when they are its
        own), or None when they are other classes (data of other classes gets the text
        head; `class_order`)."""
        order = class_order(self.classnames, classnames)
        if order is None:
            return None
        return self if order == list(range(len(order))) else \
            ClassifierHead(self.weight.detach()[order], self.scale.item(), classnames)

    def save(self, folder: str | Path) -> Path:
        """Write ``head.safetensors`` (weight, scale; class names in the metadata)."""
        path = Path(folder) / HEAD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors({"weight": self.weight.detach().cpu().contiguous(),
                      "scale": self.scale.detach().cpu().reshape(1)}, str(path),
                     metadata={"classnames": json.dumps(self.classnames)})
        note_head_in_card(folder, len(self.classnames))  # a model folder's card says it is there
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "ClassifierHead":
        """Read the ``head.safetensors`` of a model or adapter folder (or of the model of a
        checkpoint or run folder)."""
        path = Path(folder) / HEAD_FILE
        if not path.is_file():
            path = model_folder(folder) / HEAD_FILE
        if not path.is_file():
            raise ModelError(f"{folder} has no {HEAD_FILE}: give the model folder of a "
                             "`cliplab adapt --method finetune` run (RUN/checkpoints/step-N/"
                             "model) or a lora adapter folder with a head")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            classnames = json.loads((f.metadata() or {}).get("classnames", "null") or "null")
        tensors = load_file(str(path))
        if classnames is None:
            classnames = [str(i) for i in range(tensors["weight"].shape[0])]
        return cls(tensors["weight"], tensors["scale"].item(), classnames)


def saved_head_classifier(folder: str | Path) -> LinearHead | None:
    """The fine-tuned head saved in a model folder (``head.safetensors``, written by
    finetune, lora, wise-ft; a checkpoint or run folder means its model's) as an eval
    `Classifier` for its own classes, labelled with its path; None for a folder without one."""
    file = saved_head_file(folder)
    if file is None:
        return None
    head = ClassifierHead.load(file.parent)
    return LinearHead(head.weight, head.classnames, label=str(file))


def saved_head_file(folder: str | Path) -> Path | None:
    """The ``head.safetensors`` of a model folder (a checkpoint or run folder: its model's),
    or None for a folder without one."""
    file = model_folder(folder) / HEAD_FILE
    return file if file.is_file() else None


def zeroshot_classifier_head(model: DualEncoder, data: LabelledImages) -> ClassifierHead:
    """The head whose logits equal the zero-shot logits on ``data``'s classes and prompts."""
    return ClassifierHead.from_zeroshot(model, data.classnames, data.prompt_names,
                                        data.templates)
