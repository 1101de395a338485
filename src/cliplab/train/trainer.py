"""One `Trainer` for every stage that updates a dual encoder's weights.

What differs between pretraining, LiT, fine-tuning and later adapters is the data, which
parameters train, the objective and the schedule; the loop, logging, checkpoints and resume
are shared here. The objective follows the data: image-text pairs train contrastively,
labelled images train a classification ``head`` (image features -> logits) with cross-entropy.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cliplab.data.types import ImageTextPairs, LabelledImages
from cliplab.errors import ConfigError
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.preprocess import AugmentConfig
from cliplab.train.losses import clip_loss
from cliplab.train.run_dir import RunDir
from cliplab.train.schedule import build_scheduler
from cliplab.train.text_cache import CaptionTable, text_backbone_features

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"


@dataclass
class TrainConfig:
    """Settings of one training run (every field is a YAML key under ``train:``)."""

    epochs: float = 1.0
    steps: int | None = None  # overrides epochs when set
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps (< 1) or a number of steps (>= 1)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    lock_text: bool = False
    lock_image: bool = False
    augment: bool | dict = True  # or overrides of AugmentConfig, e.g. {hflip: false}
    multi_positive: bool = True  # pairs sharing a group/caption are positives of each other
    # learning-rate multipliers by parameter-name substring, e.g. {text_projection: 0.1}
    lr_scale: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"  # or "bf16" (autocast on CPU and CUDA)
    device: str = "auto"
    seed: int = 0
    log_every: int = 25
    save_every: int = 0  # 0: only the final checkpoint
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrainConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown train option(s) {unknown}; valid: {sorted(known)}")
        for f in fields(cls):  # numbers written as strings ("2e-3") become numbers
            if f.name in d and isinstance(d[f.name], str) and isinstance(f.default, (int, float)) \
                    and not isinstance(f.default, bool):
                try:
                    number = float(d[f.name])
                    d[f.name] = int(number) if isinstance(f.default, int) else number
                except ValueError:
                    raise ConfigError(f"train.{f.name} must be a number, not {d[f.name]!r}") from None
        cfg = cls(**d)
        if cfg.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be 'fp32' or 'bf16', not {cfg.precision!r}")
        if cfg.batch_size < 2:
            raise ConfigError("train.batch_size must be at least 2 for a contrastive loss")
        if isinstance(cfg.augment, dict):
            known = {f.name for f in fields(AugmentConfig)}
            bad = sorted(set(cfg.augment) - known)
            if bad:
                raise ConfigError(f"unknown train.augment option(s) {bad}; valid: {sorted(known)}")
        if not isinstance(cfg.lr_scale, dict) or not all(
                isinstance(v, (int, float)) for v in cfg.lr_scale.values()):
            raise ConfigError("train.lr_scale must map parameter-name substrings to numbers, "
                              "e.g. {text_projection: 0.1}")
        return cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Training of a `DualEncoder`, with checkpoints and resume: contrastive on image-text
    pairs, or cross-entropy through ``head`` on labelled images.

    ``head`` (optional) is a module mapping unnormalised image embeddings to class logits; its
    parameters train with the model's. ``save_model(folder)`` (optional) replaces
    ``model.save(folder)`` when a checkpoint is written (e.g. to save only a LoRA adapter, or
    the head beside the model); resuming needs the default.
    """

    def __init__(self, model: DualEncoder, config: TrainConfig, run_dir: RunDir | None = None,
                 head: nn.Module | None = None,
                 save_model: Callable[[Path], None] | None = None):
        self.model = model
        self.config = config
        self.run_dir = run_dir
        self.head = head
        self.save_model = save_model
        self.device = resolve_device(config.device)
        self.model.to(self.device)
        if head is not None:
            head.to(self.device)
        if config.lock_text:
            model.freeze_tower("text")
        if config.lock_image:
            model.freeze_tower("image")
        self.params = [p for _, p in self._named_parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("nothing to train: every parameter is frozen")
        self.step = 0
        self.last_checkpoint: Path | None = None

    def _named_parameters(self):
        yield from self.model.named_parameters()
        if self.head is not None:
            for name, p in self.head.named_parameters():
                yield f"head.{name}", p

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW with one group per (weight decay, lr scale). No decay on gains, biases,
        position/class embeddings or the temperature; ``lr_scale`` multiplies the rate of
        parameters whose name contains a given substring."""
        groups: dict[tuple[float, float], list] = {}
        for name, p in self._named_parameters():
            if not p.requires_grad:
                continue
            flat = p.ndim < 2 or "logit_" in name or "embeddings" in name
            scale = next((v for k, v in self.config.lr_scale.items() if k in name), 1.0)
            wd = 0.0 if flat else self.config.weight_decay
            groups.setdefault((wd, float(scale)), []).append(p)
        return torch.optim.AdamW(
            [{"params": ps, "weight_decay": wd, "lr": self.config.lr * scale}
             for (wd, scale), ps in groups.items()], lr=self.config.lr)

    def fit(self, data: ImageTextPairs | LabelledImages,
            resume: str | Path | None = None) -> dict:
        """Train on ``data`` (pairs: contrastive; labelled images: cross-entropy through the
        head); returns the last logged metrics. ``resume`` is a checkpoint folder (or
        ``"latest"`` for this run's newest) to continue from exactly."""
        cfg = self.config
        n = len(data)
        if n < cfg.batch_size:
            raise ConfigError(f"train.batch_size={cfg.batch_size} is larger than the dataset "
                              f"({n} samples)")
        per_epoch = n // cfg.batch_size
        total = cfg.steps or max(1, round(cfg.epochs * per_epoch))
        warmup = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
        optimizer = self._optimizer()
        scheduler = build_scheduler(optimizer, total, warmup, cfg.min_lr_ratio)
        augment = None
        if isinstance(cfg.augment, dict):
            base = asdict(self.model.preprocess_config.augment)
            base.update({k: tuple(v) if isinstance(v, list) else v for k, v in cfg.augment.items()})
            augment = AugmentConfig(**base)
        objective = self._classification_objective if isinstance(data, LabelledImages) \
            else self._contrastive_objective
        batch_loss = objective(data, augment)
        sample_rng = torch.Generator().manual_seed(cfg.seed)
        epoch, pos = 0, 0
        if resume is not None:
            epoch, pos = self._load_state(resume, optimizer, scheduler, sample_rng)

        self.model.train()
        if self.head is not None:
            self.head.train()
        if cfg.lock_text:
            self.model.text_tower.eval()  # no dropout in a frozen tower
        bar = tqdm(total=total, initial=self.step, desc="train", disable=not cfg.progress,
                   dynamic_ncols=True)
        last: dict = {}
        start = time.time()
        seen = 0
        while self.step < total:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
            while pos + cfg.batch_size <= n and self.step < total:
                idx = order[pos:pos + cfg.batch_size]
                pos += cfg.batch_size
                loss = batch_loss(idx, sample_rng)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip) \
                    if cfg.grad_clip > 0 else torch.tensor(0.0)
                optimizer.step()
                scheduler.step()
                with torch.no_grad():  # CLIP clamps the temperature at 100
                    self.model.logit_scale.clamp_(0, 4.6052)
                self.step += 1
                seen += len(idx)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == total:
                    last = {"step": self.step, "epoch": epoch, "loss": loss.item(),
                            "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                            "logit_scale": self.model.logit_scale.exp().item(),
                            "images_per_s": seen / max(time.time() - start, 1e-9)}
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
                    if self.run_dir:
                        self.run_dir.log(last)
                if self.run_dir and cfg.save_every and self.step % cfg.save_every == 0 \
                        and self.step < total:
                    self.save_checkpoint(optimizer, scheduler, sample_rng, epoch, pos)
            if pos + cfg.batch_size > n:
                epoch, pos = epoch + 1, 0
        bar.close()
        if self.run_dir:
            self.last_checkpoint = self.save_checkpoint(optimizer, scheduler, sample_rng, epoch,
                                                        pos)
        self.model.eval()
        if self.head is not None:
            self.head.eval()
        return last

    # -- objectives: a function (batch index, rng) -> loss ---------------------------------------
    def _pixels(self, images: torch.Tensor, augment, rng: torch.Generator) -> torch.Tensor:
        """Pixel values of a batch, randomly augmented when ``train.augment`` is on."""
        return self.model.preprocess(images, train=bool(self.config.augment), generator=rng,
                                     augment=augment).to(self.device)

    def _contrastive_objective(self, pairs: ImageTextPairs, augment):
        """CLIP loss of the batch's images against one sampled caption each."""
        cfg = self.config
        table = CaptionTable(pairs)
        keys_from_groups = cfg.multi_positive and pairs.groups is not None
        # A locked tower's caption features are computed once; otherwise captions are
        # tokenized once and encoded every step.
        text_source = text_backbone_features(self.model, table.texts, progress=cfg.progress
                                             ).to(self.device) if cfg.lock_text \
            else self.model.tokenize(table.texts)

        def batch_loss(idx: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
            caption_ids = table.sample(idx, rng)
            with self._autocast():
                img = self.model.encode_image(self._pixels(pairs.images[idx], augment, rng),
                                              normalize=False)
                txt = self._text_features(text_source, caption_ids)
            keys = pairs.groups[idx] if keys_from_groups else caption_ids
            return clip_loss(F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1),
                             self.model.logit_scale.float(), keys.to(self.device))
        return batch_loss

    def _classification_objective(self, data: LabelledImages, augment):
        """Cross-entropy of ``head(image embeddings)`` against the labels."""
        if self.head is None:
            raise ConfigError("training on labelled images needs a classification head "
                              "(Trainer(..., head=...)); turn them into pairs for contrastive "
                              "training")
        labels = data.labels.to(self.device)

        def batch_loss(idx: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
            with self._autocast():
                pixels = self._pixels(data.images[idx], augment, rng)
                logits = self.head(self.model.encode_image(pixels, normalize=False))
            return F.cross_entropy(logits.float(), labels[idx.to(self.device)])
        return batch_loss

    def _text_features(self, source, caption_ids: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings of the captions ``caption_ids`` for this step, from the
        cached features of a locked tower or by running the tower on the cached tokens."""
        if isinstance(source, torch.Tensor):
            return self.model.project_text(source[caption_ids.to(self.device)])
        ids, mask = source["input_ids"][caption_ids], source["attention_mask"][caption_ids]
        if self.model.kind != "siglip":  # SigLIP expects its fixed max-length padding
            width = int(mask.sum(1).max())
            ids, mask = ids[:, :width], mask[:, :width]
        return self.model.encode_text(ids.to(self.device), mask.to(self.device), normalize=False)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, optimizer, scheduler, sample_rng: torch.Generator, epoch: int,
                        pos: int) -> Path:
        """``checkpoints/step-N/{model/, trainer_state.pt}``, written to a temp name, renamed."""
        state = {"step": self.step, "epoch": epoch, "pos": pos,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "sample_rng": sample_rng.get_state(), "torch_rng": torch.get_rng_state(),
                 "config": asdict(self.config)}

        def write(folder: Path) -> None:
            if self.save_model is not None:
                self.save_model(folder)
            else:
                self.model.save(folder / MODEL_DIR)
            torch.save(state, folder / STATE_FILE)

        return self.run_dir.atomic_checkpoint(self.step, write)

    def _load_state(self, resume, optimizer, scheduler, sample_rng) -> tuple[int, int]:
        folder = self.run_dir.latest_checkpoint() if resume == "latest" and self.run_dir \
            else Path(resume)
        if folder is None or not (folder / STATE_FILE).is_file():
            raise ConfigError(f"cannot resume: {resume} holds no {STATE_FILE}")
        if self.save_model is not None or self.head is not None:
            raise ConfigError("resume is only supported for plain model training (no head, "
                              "no custom checkpoint writer)")
        # weights_only: the state holds tensors, numbers and plain dicts, nothing to unpickle.
        state = torch.load(folder / STATE_FILE, weights_only=True)
        loaded = DualEncoder.load(folder / MODEL_DIR, device=self.device)
        self.model.model.load_state_dict(loaded.model.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sample_rng.set_state(state["sample_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        return state["epoch"], state["pos"]
