"""LoRA (Hu et al. 2021) on the attention and MLP projections of either tower or both, via peft.

Target modules are chosen by name among the linear layers of each chosen tower's numbered
blocks (``…layer(s).N.…``), so one rule covers CLIP / SigLIP (``q_proj k_proj v_proj out_proj``,
``fc1 fc2``), HF ViT (``q_proj … o_proj``, ``fc1 fc2``) and BERT / MiniLM (``query key value``,
``attention.output.dense``; ``intermediate.dense``, ``output.dense``). Training is the one `Trainer` loop, with either the
contrastive objective (labelled images turned into caption pairs) or a zero-shot-initialised
classification head. The result is a peft adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, plus ``head.safetensors`` and ``cliplab.json`` with the base
model's path and fingerprint) that loads back onto its base, or merges into a full model folder.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import Field, field_validator, model_validator
from torch import nn

from cliplab.adapt.base import (AdaptContext, Adapter, copy_written, kept_training_state,
                               method_options, require_pytorch_model, written_inside)
from cliplab.adapt.common import checked_train_section, count_parameters, \
    refuse_contrastive_settings
from cliplab.adapt.finetune import save_finetuned
from cliplab.adapt.head import HEAD_FILE, ClassifierHead, zeroshot_classifier_head
from cliplab.models.folder import check_same_origin, model_fingerprint, require_origin, write_origin
from cliplab.adapt.training import (check_batch_fits_images, settings_that_ran,
                                    trainer_config)
from cliplab.config import Section, refuse_unused
from cliplab.data.pairs import labelled_to_pairs
from cliplab.data.types import LabelledImages
from cliplab.errors import ModelError
from cliplab.evaluate.features import ImageFeatures
from cliplab.evaluate.zeroshot import zeroshot_classifier
from cliplab.file_modes import as_umask
from cliplab.models.device import seeded
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.resolve import load_model
from cliplab.output_folder import resolved_path
from cliplab.runs import CHECKPOINTS, latest_checkpoint
from cliplab.train.trainer import Trainer

TOWER_PREFIX = {"image": "vision_model", "text": "text_model"}
# regexes of a module name after its block ("…layers.3."); "output.dense" right after the block
# number is BERT's MLP output, "attention.output.dense" its attention output
MODULE_FAMILIES = {
    "attention": [r"(.*\.)?(q_proj|k_proj|v_proj|out_proj|o_proj|query|key|value)",
                  r"attention\.output\.dense"],
    "mlp": [r"(.*\.)?(fc1|fc2)", r"intermediate\.dense", r"output\.dense"],
}
MODULE_FAMILIES["all"] = MODULE_FAMILIES["attention"] + MODULE_FAMILIES["mlp"]
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
TRAIN_DEFAULTS = {"epochs": 2, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.01,
                  "warmup": 0.1, "augment": {"hflip": False}}


NEEDS_PYTORCH_MODEL = "it trains low-rank adapters on the model's weights"


class Options(Section):
    """Where the adapters go, their size, and what they train for."""

    towers: list[Literal["image", "text"]] = Field(["image"], min_length=1)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / rank: 0 trains nothing
    dropout: float = Field(0.0, ge=0, lt=1)
    modules: Literal["all", "attention", "mlp"] | Annotated[  # or module names: [q_proj]
        list[str], Field(min_length=1)] = "all"
    objective: Literal["classifier", "contrastive"] = "classifier"  # head | captions of labels
    train_head: bool = True  # classifier objective: the head trains with the adapters
    merge: bool = False  # also write the merged full model folder
    train: dict[str, Any] = {}  # the Trainer's settings over TRAIN_DEFAULTS

    @field_validator("towers", mode="before")
    @classmethod
    def _one_tower(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("train")
    @classmethod
    def _trainer_settings(cls, value: dict) -> dict:
        return checked_train_section(value, TRAIN_DEFAULTS, classifier=False)

    @model_validator(mode="after")
    def _classifier_trains_the_image_tower(self) -> "Options":
        if self.objective == "classifier" and self.towers != ["image"]:
            raise ValueError("objective 'classifier' trains the image tower only (the head "
                             "replaces the text tower); use towers: [image], or objective: "
                             "contrastive for text-tower adapters")
        if self.objective == "classifier":
            refuse_contrastive_settings(trainer_config(TRAIN_DEFAULTS, self.train), "train.")
        if self.objective == "contrastive":
            refuse_unused(self, ["train_head"], "with objective 'contrastive' (it trains "
                          "against the label captions, with no head)")
        return self


def target_regex(towers: list[str], modules: str | list[str]) -> str:
    """The peft ``target_modules`` regex (full-matched against module names)."""
    if isinstance(modules, str):
        suffix = "|".join(MODULE_FAMILIES[modules])
    else:
        suffix = r"(.*\.)?(" + "|".join(re.escape(m) for m in modules) + ")"
    prefixes = "|".join(TOWER_PREFIX[t] for t in towers)
    return rf"({prefixes})\.(.*\.)?layers?\.\d+\.({suffix})"


def target_modules(model: DualEncoder, towers: list[str], modules: str | list[str]) -> list[str]:
    """Names of the linear layers LoRA would wrap; a tower with none is an error."""
    pattern = re.compile(target_regex(towers, modules))
    names = [n for n, m in model.model.named_modules()
             if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
    for tower in towers:
        if not any(n.startswith(TOWER_PREFIX[tower] + ".") for n in names):
            module = model.tower(tower)
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules()
                             if isinstance(m, nn.Linear)})
            given = modules if isinstance(modules, str) else ", ".join(map(str, modules))
            raise ModelError(f"options.modules: {given} match no linear layer of the {tower} "
                             f"tower; its linear layers are named {', '.join(linear)}")
    return names


def add_lora(model: DualEncoder, opts: Options, seed: int = 0) -> PeftModel:
    """Wrap the target layers of ``model`` (in place) with LoRA adapters, initialised from
    ``seed``; only they train. Returns the peft handle (save / merge)."""
    target_modules(model, opts.towers, opts.modules)  # fail clearly before peft does
    config = LoraConfig(r=int(opts.rank), lora_alpha=float(opts.alpha),
                        lora_dropout=float(opts.dropout),
                        target_modules=target_regex(opts.towers, opts.modules))
    with _quiet_peft(), seeded(seed, model.device):  # peft draws A from torch's generator
        return get_peft_model(model.model, config)


@contextlib.contextmanager
def _quiet_peft():
    """peft asks transformers a deprecated question (``is_gradient_checkpointing``): the
    FutureWarning is not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


def lora_parameter_count(model: DualEncoder) -> int:
    return sum(p.numel() for n, p in model.model.named_parameters() if "lora_" in n)


def save_adapter(peft_model: PeftModel, folder: str | Path, base_path: str, fingerprint: str,
                 head: ClassifierHead | None = None, options: Options | None = None) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``head.safetensors``) and
    ``cliplab.json`` recording the base model; both name the base as `write_origin` records it
    (a folder absolute), so plain peft finds it from any working folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    origin = write_origin(folder, base_path, fingerprint, adapter="lora",
                          lora=options.to_dict() if options else None)
    if origin["path"]:  # peft's record is the path as the base was opened (maybe relative)
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = origin["path"]
    # "auto" asks the base's config.json (the Hub for a preset name, offline: a warning on
    # every save) whether the vocabulary was resized; cliplab never resizes it
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty model card
    for weights in folder.glob("adapter_model*.safetensors"):  # safetensors: owner-only
        as_umask(weights)
    if head is not None:
        head.save(folder)
    return folder


def load_lora(folder: str | Path, base: str | None = None
              ) -> tuple[DualEncoder, PeftModel, ClassifierHead | None]:
    """The base model (``base`` or the recorded path; its weights must match the recorded
    fingerprint) with the LoRA adapter of ``folder`` on it, and the head if it has one.
    ``folder``: an adapter folder, a checkpoint holding ``adapter/`` or a lora run folder (its
    newest checkpoint's)."""
    folder = adapter_folder(folder)
    base_path = base or require_origin(folder)["path"]
    if base_path is None:
        raise ModelError(f"{folder} records no path of the model it was adapted from (it was "
                         "built in memory): pass base=MODEL")
    model = load_model(str(base_path))
    check_same_origin(folder, model, str(base_path))
    with _quiet_peft():
        peft_model = PeftModel.from_pretrained(model.model, str(folder))
    head = ClassifierHead.load(folder) if (folder / HEAD_FILE).is_file() else None
    return model.eval(), peft_model, head


def adapter_folder(path: str | Path) -> Path:
    """The peft adapter folder behind ``path``: itself, its ``adapter/`` (a checkpoint) or
    its newest checkpoint's (a run folder); a one-line error for anything else."""
    path = Path(path)
    latest = latest_checkpoint(path) if (path / CHECKPOINTS).is_dir() else None
    for candidate in (path, path / ADAPTER_DIR, *([latest / ADAPTER_DIR] if latest else [])):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ModelError(f"{path} is not a LoRA adapter folder (no adapter_config.json), nor a "
                     "checkpoint or run folder of `cliplab adapt --method lora`")


def merge_adapter(model: DualEncoder, peft_model: PeftModel) -> DualEncoder:
    """Fold the LoRA updates into the base weights; ``model`` becomes a plain model again."""
    model.model = peft_model.merge_and_unload()
    return model


class LoraAdapted(Adapter):
    """A model with LoRA adapters: logits from the head (classifier objective) or from the
    zero-shot classifier of the adapted text tower (contrastive objective)."""

    method = "lora"

    def __init__(self, model: DualEncoder, classnames, options: dict, peft_model: PeftModel,
                 head: ClassifierHead | None, text_head: torch.Tensor | None, base_path: str,
                 fingerprint: str, params: dict, adapter_dir: Path | None = None):
        super().__init__(model, classnames, options)
        self.peft_model, self.head, self.text_head = peft_model, head, text_head
        self.base_path, self.fingerprint, self.params = base_path, fingerprint, params
        self.adapter_dir, self.merged_dir = adapter_dir, None

    def feature_logits(self, feats: ImageFeatures, progress: bool = False) -> torch.Tensor:
        if self.head is not None:
            return self.head.logits(feats)
        return feats.embeddings.float() @ self.text_head.t()

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """The peft adapter folder ``folder/adapter`` (unless training already wrote it inside
        ``folder``, as its last checkpoint) and, with option ``merge``, the full model folder
        ``folder/merged``; saved once already elsewhere, the same files are copied."""
        opts, folder = Options.model_validate(self.options), Path(folder)
        if self.adapter_dir is None:
            self.adapter_dir = written = save_adapter(
                self.peft_model, folder / ADAPTER_DIR, self.base_path, self.fingerprint,
                self.head, opts)
        elif written_inside(self.adapter_dir, folder):
            written = self.adapter_dir
        else:
            written = copy_written(self.adapter_dir, folder / ADAPTER_DIR)
        if opts.merge and self.merged_dir is None:
            merged = merge_adapter(self.model, self.peft_model)
            self.merged_dir = folder / MERGED_DIR
            if self.head is not None:
                save_finetuned(merged, self.head, self.merged_dir, self.base_path,
                               self.fingerprint)
            else:
                merged.save(self.merged_dir)
                write_origin(self.merged_dir, self.base_path, self.fingerprint)
        elif opts.merge and not written_inside(self.merged_dir, folder):
            copy_written(self.merged_dir, folder / MERGED_DIR)
        return written

    def summary(self) -> dict:
        return {"params": self.params,
                "adapter_dir": resolved_path(self.adapter_dir),
                **({"merged_dir": resolved_path(self.merged_dir)} if self.merged_dir else {})}


def fit(model: DualEncoder, train: LabelledImages, options: Options | dict | None,
        ctx: AdaptContext) -> LoraAdapted:
    """Train LoRA adapters on the whole of ``train``, added to ``model`` in place (its own
    weights' ``requires_grad`` flags and train/eval mode are left as they were; the adapter's
    ``save`` with option ``merge``, or `merge_adapter`, folds them in); checkpoints are adapter
    folders in ``ctx.run``."""
    require_pytorch_model("lora", NEEDS_PYTORCH_MODEL, model)
    opts = method_options(Options, options, "lora")
    # a text tower without adapters is frozen: cache its caption features
    train_cfg = trainer_config(TRAIN_DEFAULTS, opts.train, seed=ctx.seed,
                               lock_text="text" not in opts.towers, progress=ctx.progress,
                               device=model.device)
    check_batch_fits_images(train_cfg.batch_size, len(train))
    fingerprint, origin = model_fingerprint(model), ctx.origin(model)
    full = count_parameters(model)["total"]
    image_full = count_parameters(model.vision_tower)["total"] + sum(
        p.numel() for p in getattr(model.model, "visual_projection", nn.Identity()).parameters())
    head = None
    if opts.objective == "classifier":
        head = zeroshot_classifier_head(model, train)
        head.weight.requires_grad_(opts.train_head)

    def save(folder: Path) -> None:
        save_adapter(peft_model, folder / ADAPTER_DIR, origin, fingerprint, head, opts)

    with kept_training_state(model):
        peft_model = add_lora(model, opts, train_cfg.seed)  # the training seed, as its steps
        trainer = Trainer(model, train_cfg, ctx.run, head=head, save_model=save,
                          settings="options.train")
        trainer.fit(train if head is not None else labelled_to_pairs(train))
    n_lora = lora_parameter_count(model)
    n_head = head.weight.numel() if head is not None and opts.train_head else 0
    params = {"lora": n_lora, "head": n_head, "trainable": n_lora + n_head, "total": full,
              "image_tower": image_full, "fraction_of_total": (n_lora + n_head) / full,
              "fraction_of_image_tower": (n_lora + n_head) / image_full}
    text_head = None
    if head is None:
        scale = model.logit_scale.detach().float().exp().cpu()
        text_head = scale * zeroshot_classifier(model, train.prompt_names, train.templates)
    adapter_dir = trainer.last_checkpoint / ADAPTER_DIR if trainer.last_checkpoint else None
    adapter = LoraAdapted(model, train.classnames, opts.to_dict(), peft_model, head, text_head,
                          origin, fingerprint, params, adapter_dir)
    adapter.trained_with = settings_that_ran(train_cfg, trainer.precision)
    return adapter
