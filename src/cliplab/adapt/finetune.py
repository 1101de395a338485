"""Full fine-tuning of the image tower with a classification head initialised from the
zero-shot text classifier (the fine-tuning WiSE-FT starts from).

The image tower and its projection train, with the head, by cross-entropy through the one
`Trainer` loop; the text tower, text projection and temperature stay as they were. The result
is a normal model folder plus ``head.safetensors``, whose ``cliplab.json`` records the
pretrained origin (``"base": {path, fingerprint}``).
"""

from __future__ import annotations

import time
from pathlib import Path

from cliplab.adapt.common import (DATA_KEYS, check_same_classes, count_parameters,
                                  head_metrics, load_split, section)
from cliplab.adapt.head import ClassifierHead
from cliplab.config import check_keys, deep_merge
from cliplab.data.types import LabelledImages
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.folder import model_fingerprint, require_origin, write_origin
from cliplab.models.resolve import load_model
from cliplab.runs import RunDir
from cliplab.train.trainer import MODEL_DIR, TrainConfig, Trainer

TOP_KEYS = {"method", "data", "train", "finetune"}
FINETUNE_KEYS = {"train_head"}
# Fine-tuning moves pretrained weights: a small rate, a short warm-up, no flips by default.
TRAIN_DEFAULTS = {"epochs": 2, "batch_size": 128, "lr": 1e-4, "weight_decay": 0.1,
                  "warmup": 0.1, "augment": {"hflip": False}}


def image_tower_trainable(model: DualEncoder) -> None:
    """Only the image tower and its projection train; everything else is frozen."""
    model.model.requires_grad_(False)
    model.vision_tower.requires_grad_(True)
    proj = getattr(model.model, "visual_projection", None)
    if proj is not None:
        proj.requires_grad_(True)


def zeroshot_head(model: DualEncoder, data: LabelledImages) -> ClassifierHead:
    """The head whose logits equal the zero-shot logits on ``data``'s classes and prompts."""
    return ClassifierHead.from_zeroshot(model, data.classnames, data.prompt_names,
                                        data.templates)


def save_finetuned(model: DualEncoder, head: ClassifierHead, folder: str | Path,
                   base_path: str, fingerprint: str, **extra) -> Path:
    """A model folder (``DualEncoder.save``) + ``head.safetensors`` + the origin record."""
    folder = model.save(folder)
    head.save(folder)
    write_origin(folder, base_path, fingerprint, **extra)
    return folder


def load_finetuned(folder: str | Path) -> tuple[DualEncoder, ClassifierHead]:
    """The model and head of a fine-tuned folder."""
    require_origin(folder)  # fails clearly on a folder that is not a fine-tune
    return DualEncoder.load(folder), ClassifierHead.load(folder)


def train_config(cfg: dict, progress: bool) -> TrainConfig:
    """``TRAIN_DEFAULTS`` updated by the config's ``train`` section."""
    merged = deep_merge(TRAIN_DEFAULTS, cfg.get("train") or {})
    return TrainConfig.from_dict({**merged, "lock_text": True, "progress": progress})


def finetune(model: DualEncoder, train: LabelledImages, train_cfg: TrainConfig,
             run: RunDir | None, base_path: str, train_head: bool = True
             ) -> tuple[ClassifierHead, Trainer]:
    """Fine-tune ``model``'s image tower (in place) with a zero-shot-initialised head; with a
    run folder, checkpoints are fine-tuned model folders. Returns the head and the trainer."""
    fingerprint = model_fingerprint(model)
    head = zeroshot_head(model, train)
    head.weight.requires_grad_(train_head)
    image_tower_trainable(model)

    def save(folder: Path) -> None:
        save_finetuned(model, head, folder / MODEL_DIR, base_path, fingerprint)

    trainer = Trainer(model, train_cfg, run, head=head, save_model=save)
    trainer.fit(train)
    return head, trainer


def run(model_path: str, cfg: dict, out: Path, progress: bool = True) -> dict:
    """`cliplab adapt --method finetune`: fine-tune on ``data.train``, report zero-shot and
    fine-tuned accuracy on ``data.test``; writes ``out/`` (run folder + results.json)."""
    start = time.time()
    check_keys(cfg, TOP_KEYS, "the finetune config")
    data_cfg = section(cfg, "data", DATA_KEYS)
    opts = section(cfg, "finetune", FINETUNE_KEYS)
    train_cfg = train_config(cfg, progress)
    train, test = load_split(data_cfg, "train"), load_split(data_cfg, "test")
    check_same_classes(train, test, "data.train and data.test")
    model = load_model(model_path)
    run_dir = RunDir(out)
    run_dir.write_config({**cfg, "model": str(model_path)})

    zs_test = head_metrics(model, zeroshot_head(model, test).weight, test, progress,
                           "zero-shot test")
    head, trainer = finetune(model, train, train_cfg, run_dir, str(model_path),
                             bool(opts.get("train_head", True)))
    params = count_parameters(model, head)
    results = {
        "method": "finetune", "base": str(model_path), "train_images": len(train),
        "params": {**params, "fraction": params["trainable"] / params["total"]},
        "zeroshot": zs_test,
        "finetuned": head_metrics(model, head.weight, test, progress, "fine-tuned test"),
        "model_dir": str(trainer.last_checkpoint / MODEL_DIR),
        "wall_time_s": round(time.time() - start, 1),
    }
    run_dir.write_json("results.json", results)
    return results
