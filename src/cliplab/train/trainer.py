"""One `Trainer` for every stage that updates a dual encoder's weights.

What differs between pretraining, LiT, fine-tuning and later adapters is the data, which
parameters train, the objective and the schedule; the loop, logging, checkpoints and resume
are shared here. The objective follows the data: image-text pairs train contrastively,
labelled images train a classification ``head`` (image embeddings -> logits) with cross-entropy.
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
from cliplab.models.dual_encoder import DualEncoder, evaluating
from cliplab.models.preprocess import AugmentConfig
from cliplab.train import distributed, fsdp
from cliplab.train.step_inputs import MemoryInputs, StreamInputs
from cliplab.train.stream_batches import StreamBatches
from cliplab.train.grad_cache import grad_cache_backward
from cliplab.train.contrastive import contrastive_loss
from cliplab.runs import RunDir
from cliplab.train.schedule import build_scheduler

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
    # leave the last k transformer blocks of a locked tower trainable (0: fully locked)
    lock_text_except_last: int = 0
    lock_image_except_last: int = 0
    augment: bool | dict = True  # or overrides of AugmentConfig, e.g. {hflip: false}
    multi_positive: bool = True  # pairs sharing a group/caption are positives of each other
    # learning-rate multipliers by parameter-name substring, e.g. {text_projection: 0.1}
    lr_scale: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"  # or "bf16" (autocast on CPU and CUDA)
    loss: str = "clip"  # or "siglip" (sigmoid loss; needs a model with a logit bias)
    # compute the loss in loss_tile x loss_tile blocks: same loss and gradients, memory linear
    # in the batch instead of quadratic (for global batches whose B x B logits do not fit)
    loss_tile: int | None = None
    # GradCache: embed the batch this many pairs at a time (same update as the whole batch)
    micro_batch_size: int | None = None
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # a fully locked tower's features are computed once per dataset (images: only without
    # augmentation); false recomputes them every step (e.g. when they do not fit in memory)
    cache_frozen_features: bool = True
    # under torchrun: shard the towers' blocks (weights, gradients, optimizer state) over the
    # ranks with FSDP2; a single process ignores it
    fsdp: bool = False
    dist_timeout_s: float = 600.0  # under torchrun: how long a rank waits for a silent peer
    eval_every: int = 0  # run the evaluation callback every N steps (0: never during training)
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
        if cfg.loss not in ("clip", "siglip"):
            raise ConfigError(f"train.loss must be 'clip' or 'siglip', not {cfg.loss!r}")
        if cfg.loss_tile is not None and (isinstance(cfg.loss_tile, bool)
                                          or not isinstance(cfg.loss_tile, int)
                                          or cfg.loss_tile < 1):
            raise ConfigError(f"train.loss_tile must be a positive integer or null, "
                              f"not {cfg.loss_tile!r}")
        if cfg.micro_batch_size is not None and cfg.micro_batch_size < 1:
            raise ConfigError("train.micro_batch_size must be a positive number of pairs")
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

    ``head`` (optional) maps unnormalised image embeddings to class logits; its parameters train
    with the model's. ``save_model(folder)`` (optional) replaces ``model.save(folder / "model")``
    when a checkpoint is written (e.g. to save only a LoRA adapter, or the head beside the
    model); resuming needs the default.

    Under ``torchrun`` every rank embeds its part of the global batch (a slice of the batch
    every rank draws alike from an in-memory set, or its own local batch streamed from shards)
    and the loss sees the features of all ranks (gathered with gradients); each rank's loss is
    its share of the global-batch loss and gradients are averaged across ranks before each
    optimizer step, so N ranks take the step one process would take on the whole batch.
    ``train.fsdp`` shards the towers' blocks (see fsdp.py).
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
            model.freeze_tower("text", except_last=config.lock_text_except_last)
        if config.lock_image:
            model.freeze_tower("image", except_last=config.lock_image_except_last)
        if config.loss == "siglip" and model.logit_bias is None:
            raise ConfigError("train.loss=siglip needs a model with a logit bias (a SigLIP "
                              "model, e.g. the tiny-siglip preset)")
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.sharded = config.fsdp and self.world > 1
        if self.sharded:
            if head is not None or save_model is not None:
                raise ConfigError("train.fsdp shards the towers of plain model training; it "
                                  "does not take a classification head or a custom writer")
            fsdp.shard_blocks(model)
        self.params = [p for _, p in self._named_parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("nothing to train: every parameter is frozen")
        if config.batch_size % self.world:
            raise ConfigError(f"train.batch_size={config.batch_size} must divide evenly over "
                              f"{self.world} ranks")
        self.step = 0
        self.last_checkpoint: Path | None = None

    def _named_parameters(self):
        yield from self.model.named_parameters()
        if self.head is not None:
            for name, p in self.head.named_parameters():
                yield f"head.{name}", p

    def _autocast(self):
        """bf16 autocast when ``train.precision`` asks for it. On CPU it also switches the towers
        to HF's eager attention (matmuls + fp32 softmax): PyTorch's CPU flash-attention backward
        in bf16 is slow at CLIP's short sequences (a quarter of the step in the throughput
        benchmark's profile); on CUDA the model keeps its SDPA kernels."""
        if self.config.precision != "bf16":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        if self.device.type == "cpu":
            stack.enter_context(self.model.attention_implementation("eager"))
        return stack

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

    def fit(self, pairs: ImageTextPairs | LabelledImages | StreamBatches,
            resume: str | Path | None = None, *,
            replay: ImageTextPairs | None = None, replay_ratio: float = 0.0,
            evaluate: Callable[[DualEncoder], dict] | None = None) -> dict:
        """Train on ``pairs``; returns the last logged metrics.

        ``pairs``: image-text pairs (contrastive), labelled images (cross-entropy through the
        head) or a `StreamBatches` over WebDataset shards (contrastive, each rank its own
        shards). ``resume``: a checkpoint folder (or ``"latest"`` for this run's newest) to
        continue from exactly. ``replay``/``replay_ratio``: mix that fraction of each batch
        from an older data set (continued pretraining without forgetting). ``evaluate``: called
        with the model every ``eval_every`` steps and at the end; its metrics go to
        ``metrics.jsonl``.
        """
        cfg = self.config
        if isinstance(pairs, StreamBatches):
            if replay is not None:
                raise ConfigError("replay mixes in-memory sets; it is not available with "
                                  "streamed shards")
            inputs = StreamInputs(self, pairs)
        else:
            inputs = MemoryInputs(self, pairs, replay, replay_ratio)
        total = cfg.steps or max(1, round(cfg.epochs * inputs.per_epoch))
        warmup = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
        optimizer = self._optimizer()
        scheduler = build_scheduler(optimizer, total, warmup, cfg.min_lr_ratio)
        self._augment = self._augment_config()
        # streamed ranks hold different images: their augmentations need not be correlated
        sample_rng = torch.Generator().manual_seed(
            cfg.seed + (1_000_003 * self.rank if isinstance(inputs, StreamInputs) else 0))
        if resume is not None:
            self._load_state(resume, optimizer, scheduler, sample_rng, inputs)

        self.model.train()
        if self.head is not None:
            self.head.train()
        for tower in ("text", "image"):  # no dropout in a frozen tower
            if self.model.tower_is_frozen(tower):
                self.model.tower(tower).eval()
        bar = tqdm(total=total, initial=self.step, desc="train",
                   disable=not cfg.progress or self.rank > 0, dynamic_ncols=True)
        last: dict = {}
        start, seen = time.time(), 0
        while self.step < total:
            optimizer.zero_grad(set_to_none=True)
            with distributed.collective_errors(f"training step {self.step + 1}"):
                loss = inputs.backward(sample_rng)
                # sharded blocks' gradients arrive reduced (FSDP's reduce-scatter)
                distributed.average_gradients([p for p in self.params
                                               if not fsdp.is_sharded(p)])
            grad_norm = torch.tensor(0.0)
            if cfg.grad_clip > 0:
                clip = fsdp.clip_grad_norm if self.sharded else torch.nn.utils.clip_grad_norm_
                grad_norm = clip(self.params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # CLIP clamps the temperature at 100
                self.model.logit_scale.clamp_(0, 4.6052)
            self.step += 1
            seen += cfg.batch_size
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == total:
                # each rank holds its share of the global-batch loss; their mean is that loss
                last = {"step": self.step, "epoch": inputs.epoch,
                        "loss": distributed.mean_over_ranks(loss).item(),
                        "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                        "logit_scale": self.model.logit_scale.exp().item(),
                        "images_per_s": seen / max(time.time() - start, 1e-9),
                        "time_s": round(time.time() - start, 4)}
                bar.set_postfix(loss=f"{last['loss']:.3f}")
                self._log(last)
            if evaluate and (self.step == total or cfg.eval_every and
                             self.step % cfg.eval_every == 0):
                self._log({"step": self.step, **self._evaluate(evaluate)})
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < total:
                self.save_checkpoint(optimizer, scheduler, sample_rng, inputs)
        bar.close()
        self.last_checkpoint = self.save_checkpoint(optimizer, scheduler, sample_rng, inputs)
        self.model.eval()
        if self.head is not None:
            self.head.eval()
        return last

    def _augment_config(self) -> AugmentConfig | None:
        if not isinstance(self.config.augment, dict):
            return None
        base = asdict(self.model.preprocess_config.augment)
        base.update({k: tuple(v) if isinstance(v, list) else v
                     for k, v in self.config.augment.items()})
        return AugmentConfig(**base)

    def pixels(self, images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Model inputs of uint8 ``images``, randomly augmented when ``train.augment`` is on."""
        with self._autocast():  # as the recipes' numbers were measured
            return self.model.preprocess(images, train=bool(self.config.augment),
                                         generator=rng, augment=self._augment)

    def _embed(self, pixels: torch.Tensor, text_source, caption_ids: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised image and text embeddings of one (micro-)batch; ``pixels`` are model
        inputs ``[b, C, H, W]`` or a locked image tower's cached features ``[b, D]``."""
        with self._autocast():
            img = self._image_embeddings(pixels)
            txt = self._text_features(text_source, caption_ids)
        return img, txt

    def _image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings of model inputs ``[b, C, H, W]``, or of a locked
        tower's cached features ``[b, D]`` (only the projection runs)."""
        if pixels.dim() == 2:
            return self.model.project_image(pixels.to(self.device))
        return self.model.encode_image(pixels.to(self.device), normalize=False)

    def _loss(self, img: torch.Tensor, txt: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The configured loss of this rank's embeddings against the global batch (under
        torchrun, this rank's share of it: features of all ranks are gathered inside)."""
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        return contrastive_loss(img, txt, self.model.logit_scale, self.model.logit_bias,
                                kind=self.config.loss, keys=keys, tile=self.config.loss_tile)

    def _backward(self, pixels: torch.Tensor, caption_ids: torch.Tensor, text_source,
                  keys: torch.Tensor) -> torch.Tensor:
        """Loss of the step, with its gradients accumulated into the parameters."""
        chunk = self.config.micro_batch_size
        if not chunk or chunk >= len(pixels):
            loss = self._loss(*self._embed(pixels, text_source, caption_ids), keys)
            loss.backward()
            return loss.detach()
        return grad_cache_backward(
            lambda rows: self._embed(pixels[rows], text_source, caption_ids[rows]),
            len(pixels), chunk, lambda img, txt: self._loss(img, txt, keys))

    def _classification_backward(self, pixels: torch.Tensor, labels: torch.Tensor
                                 ) -> torch.Tensor:
        """Cross-entropy of ``head(image embeddings)``, back-propagated ``micro_batch_size``
        images at a time (a per-sample loss: plain accumulation gives the whole-batch update)."""
        labels = labels.to(self.device)
        chunk = self.config.micro_batch_size or len(pixels)
        total = torch.zeros((), device=self.device)
        for start in range(0, len(pixels), chunk):
            rows = slice(start, start + chunk)
            with self._autocast():
                emb = self._image_embeddings(pixels[rows])
                logits = self.head(emb)
            loss = F.cross_entropy(logits.float(), labels[rows], reduction="sum") / len(pixels)
            loss.backward()
            total += loss.detach()
        return total

    def _evaluate(self, evaluate: Callable[[DualEncoder], dict]) -> dict:
        """Metrics of ``evaluate`` in eval mode; under torchrun only rank 0 evaluates (the
        others go on and wait for it at the next collective) unless the blocks are sharded:
        then every rank runs the towers (each forward gathers the shards) and rank 0 logs."""
        if self.rank > 0 and not self.sharded:
            return {}
        with evaluating(self.model):
            return evaluate(self.model)

    def _log(self, record: dict) -> None:
        if self.run_dir and self.rank == 0:
            self.run_dir.log(record)

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
    def save_checkpoint(self, optimizer, scheduler, sample_rng: torch.Generator,
                        inputs: MemoryInputs | StreamInputs) -> Path | None:
        """``checkpoints/step-N/{model/, trainer_state.pt}``, written to a temp name, renamed
        (by rank 0; the others wait for it)."""
        weights = fsdp.full_model_state(self.model) if self.sharded else None
        state = {"step": self.step, "batches": inputs.state_dict(),
                 "optimizer": fsdp.full_optimizer_state(self.model, optimizer)
                 if self.sharded else optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(),
                 "sample_rng": sample_rng.get_state(), "torch_rng": torch.get_rng_state(),
                 "config": asdict(self.config)}

        def write(folder: Path) -> None:
            if self.save_model is not None:
                self.save_model(folder)
            else:
                self.model.save(folder / MODEL_DIR, state_dict=weights)
            torch.save(state, folder / STATE_FILE)

        path = self.run_dir.atomic_checkpoint(self.step, write) \
            if self.run_dir and self.rank == 0 else None
        distributed.barrier()
        return path if self.run_dir is None or self.rank == 0 \
            else self.run_dir.checkpoint_dir(self.step)

    def _load_state(self, resume, optimizer, scheduler, sample_rng, inputs) -> None:
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
        if self.sharded:
            fsdp.load_full_state(self.model, loaded.model.state_dict(), optimizer,
                                 state["optimizer"])
        else:
            self.model.model.load_state_dict(loaded.model.state_dict())
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sample_rng.set_state(state["sample_rng"])
        torch.set_rng_state(state["torch_rng"])
        inputs.load_state_dict(state.get("batches"),
                               {"epoch": state.get("epoch", 0), "pos": state.get("pos", 0)})
        self.step = state["step"]
