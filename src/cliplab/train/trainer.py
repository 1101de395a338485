"""One `Trainer` for every stage that updates a dual encoder's weights.

What differs between pretraining, LiT, fine-tuning and later adapters is the data, which
parameters train, the objective and the schedule; the loop, logging, checkpoints and resume
are shared here. The pieces, one module each: inputs yield `StepBatch`es (step_inputs.py), an
objective back-propagates a batch's loss (objectives/), `Embedder` runs the towers under the
run's precision (embed.py), checkpoints are written and read by checkpoint.py.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from cliplab.data.types import ImageTextPairs, LabelledImages
from cliplab.errors import ConfigError, InputError, RunComplete, TrainingDiverged, warn
from cliplab.models.device import resolve_device, seeded
from cliplab.models.dual_encoder import DualEncoder, evaluating
from cliplab.models.finite import all_finite
from cliplab.models.precision import resolve_precision
from cliplab.runs import (CHECKPOINTS, TENSORBOARD_ENV, RunDir, tensorboard_available,
                          tensorboard_turned_off)
from cliplab.train import checkpoint, distributed, fsdp
from cliplab.train.batches import check_batch_over_ranks
from cliplab.train.checkpoint import MODEL_DIR, STATE_FILE, TrainingState
from cliplab.train.config import TrainConfig
from cliplab.train.embed import Embedder
from cliplab.train.objectives import ClassificationObjective, ContrastiveObjective, Objective
from cliplab.train.schedule import build_scheduler, multiplier, warmup_warning
from cliplab.train.step_inputs import build_inputs
from cliplab.train.stream_batches import StreamBatches

# TrainConfig, MODEL_DIR and STATE_FILE are imported from here by other stages
__all__ = ["Trainer", "TrainConfig", "MODEL_DIR", "STATE_FILE"]


def gradients_on(what: str) -> contextlib.AbstractContextManager:
    """Gradients on for a block that trains, called inside the user's ``torch.no_grad()`` as
    well (as LBFGS's step does); inside ``torch.inference_mode()`` one `InputError`: tensors
    made there cannot be trained through."""
    if torch.is_inference_mode_enabled():
        raise InputError(f"{what} trains weights: call it outside torch.inference_mode() "
                         "(tensors made there cannot be trained through)")
    return torch.enable_grad()


class Trainer:
    """Training of a `DualEncoder`, with checkpoints and resume.

    The objective is chosen here: without ``head``, contrastive (``train.loss``) on image-text
    pairs; with ``head`` (maps unnormalised image embeddings to class logits; its parameters
    train with the model's), cross-entropy on labelled images. ``save_model(folder)``
    (optional) replaces ``model.save(folder / "model")`` when a checkpoint is written (e.g. to
    save only a LoRA adapter, or the head beside the model); resuming needs the default.

    Under ``torchrun`` every rank embeds its part of the global batch (a slice of the batch
    every rank draws alike from an in-memory set, or its own local batch streamed from shards)
    and the loss sees the features of all ranks (gathered with gradients); each rank's loss is
    its share of the global-batch loss and gradients are averaged across ranks before each
    optimizer step, so N ranks take the step one process would take on the whole batch.
    ``train.fsdp`` shards the towers' blocks (see fsdp.py).
    """

    def __init__(self, model: DualEncoder, config: TrainConfig | dict,
                 run_dir: RunDir | str | Path | None = None, head: nn.Module | None = None,
                 save_model: Callable[[Path], None] | None = None, settings: str = "train"):
        """``config`` may be a dict of train keys and ``run_dir`` a path (made a `RunDir`);
        ``settings``: where the user writes ``config``'s keys, as messages name them (``train``
        in pretrain, ``options.train`` in adapt)."""
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        elif not isinstance(config, TrainConfig):
            raise ConfigError(f"Trainer config must be a TrainConfig or a dict of train keys, "
                              f"not {type(config).__name__}")
        if isinstance(run_dir, (str, Path)):
            run_dir = RunDir(run_dir)
        self.model = model
        self.config = config
        self.settings = settings
        self.run_dir = run_dir
        self.head = head
        self.save_model = save_model
        self.device = resolve_device(config.device)
        self.model.to(self.device)
        if head is not None:
            head.to(self.device)
        # a lock holds while this trainer trains (`fit`): the flags are as they were outside it
        # (by name: FSDP replaces the parameters it shards)
        self._flags_before = {name: p.requires_grad for name, p in model.named_parameters()}
        self._lock_towers()
        try:
            self._prepare(model, head, save_model)
        finally:
            self._restore_flags()
        check_batch_over_ranks(config.batch_size, self.world)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.resumed_from: dict | None = None  # the checkpoint a resume started from
        # train.hard_negatives' caption counts (NegativeTable.record), once fit built its table
        self.hard_negatives: dict[str, int] | None = None

    def _prepare(self, model: DualEncoder, head: nn.Module | None,
                 save_model: Callable[[Path], None] | None) -> None:
        """The rest of the set-up, the towers locked: precision, objective, sharding and the
        parameters to train."""
        config = self.config
        self.precision = resolve_precision(config.precision, self.device)
        # CLIP's loss clamps the temperature at 100; SigLIP's sigmoid loss leaves it free (a
        # released SigLIP has exp(4.72) = 112), and a head's loss does not train it: clamping
        # there would change the saved model's temperature without any step moving it
        self.clamps_temperature = head is None and config.loss == "clip"
        self.embed = Embedder(model, self.device, self.precision, config.augment)
        self.objective: Objective = ContrastiveObjective(
            self.embed, config.loss, config.loss_tile, config.micro_batch_size) \
            if head is None else \
            ClassificationObjective(self.embed, head, config.micro_batch_size)
        if config.hard_negatives is not None:
            _check_hard_negatives(config, head, distributed.world_size())
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.world, self.rank = distributed.world_size(), distributed.rank()
        distributed.broadcast_weights(model.model, head)  # before sharding: one model
        self.sharded = config.fsdp and self.world > 1
        if config.fsdp and self.world == 1:  # a recipe tried out before a torchrun launch
            warn(f"train: {self.settings}.fsdp shards the towers over torchrun's ranks; in one "
                 "process the model trains whole")
        bias = model.logit_bias
        if head is None and config.loss == "clip" and bias is not None and bias.requires_grad \
                and self.rank == 0:  # a frozen bias (LoRA) no loss would train
            warn(f"train: {self.settings}.loss=clip does not train this model's logit bias "
                 f"(it stays {bias.item():.2f}), which its sigmoid probabilities (zero-shot, "
                 f"cliplab serve) add to every score: {self.settings}.loss=siglip trains it")
        share = config.batch_size // self.world
        if config.micro_batch_size and config.micro_batch_size >= share and self.rank == 0 \
                and self.world > 1:  # in one process the config refuses it
            warn(f"train: {self.settings}.micro_batch_size={config.micro_batch_size} is not "
                 f"below a rank's share of the batch ({share} = {config.batch_size} over "
                 f"{self.world} ranks): nothing is split, each step only embeds twice")
        if self.sharded:
            if head is not None or save_model is not None:
                raise ConfigError(f"{self.settings}.fsdp shards the towers of plain model "
                                  "training; it does not take a classification head or a "
                                  "custom writer")
            fsdp.shard_blocks(model)
        self.params = [p for _, p in self._named_parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("nothing to train: every parameter is frozen")
        # sharded blocks' gradients arrive reduced (FSDP's reduce-scatter); the rest is averaged
        self.replicated_params = [p for p in self.params if not fsdp.is_sharded(p)]

    def _restore_flags(self) -> None:
        """The model's ``requires_grad`` flags as they were before this trainer."""
        for name, param in self.model.named_parameters():
            if name in self._flags_before:
                param.requires_grad_(self._flags_before[name])

    def _lock_towers(self) -> None:
        """Freeze the towers ``lock_text`` / ``lock_image`` name."""
        cfg = self.config
        if cfg.lock_text:
            self.model.freeze_tower("text", except_last=cfg.lock_text_except_last)
        if cfg.lock_image:
            self.model.freeze_tower("image", except_last=cfg.lock_image_except_last)

    def fit(self, data: ImageTextPairs | LabelledImages | StreamBatches,
            resume: str | Path | None = None, *,
            replay: ImageTextPairs | None = None, replay_ratio: float = 0.0,
            evaluate: Callable[[DualEncoder], dict] | None = None,
            on_start: Callable[[], None] | None = None,
            on_trained: Callable[[], None] | None = None,
            unfinished: bool = False) -> dict:
        """Train on ``data``; returns the last logged metrics. The towers ``lock_text`` /
        ``lock_image`` name are frozen while it trains; the model's ``requires_grad`` flags are
        as they were before this trainer after it. Dropout draws from ``train.seed`` (each
        rank its own stream), and the caller's torch generator is as it was after it.

        ``data``: image-text pairs or a `StreamBatches` over WebDataset shards (each rank its
        own shards) for the contrastive objective; labelled images for a head. ``resume``: a
        checkpoint folder (or ``"latest"`` for this run's newest) to continue from exactly.
        ``replay``/``replay_ratio``: mix that fraction of each batch from an older set of
        pairs (continued pretraining without forgetting). ``evaluate``: called with the model
        every ``eval_every`` steps and at the end (after the last checkpoint is written, so an
        evaluation that fails loses no training); its metrics go to ``metrics.jsonl``.
        ``on_start``: called once the run is accepted (a resume's checkpoint checked and
        restored), before its first step, e.g. to write the run's config. ``on_trained``:
        called on every rank after the last step's checkpoint, before the final evaluation (the
        last point where the ranks meet without one waiting out rank 0's evaluation: a place
        for a collective). ``unfinished``: the run never wrote its results, so a resume from
        its own checkpoint at the final step runs only the final evaluation (a run stopped
        during it) instead of being refused.
        """
        self._lock_towers()
        dropout_seed = self.config.seed + 1_000_003 * self.rank  # a resume restores its state
        try:
            with gradients_on("Trainer.fit"), seeded(dropout_seed, self.device):
                return self._fit(data, resume, replay=replay, replay_ratio=replay_ratio,
                                 evaluate=evaluate, on_start=on_start,
                                 on_trained=on_trained, unfinished=unfinished)
        finally:
            self._restore_flags()
            if self.run_dir is not None:  # its TensorBoard writer's thread ends with the fit
                self.run_dir.close()

    def _fit(self, data: ImageTextPairs | LabelledImages | StreamBatches,
             resume: str | Path | None, *, replay: ImageTextPairs | None, replay_ratio: float,
             evaluate: Callable[[DualEncoder], dict] | None,
             on_start: Callable[[], None] | None, on_trained: Callable[[], None] | None,
             unfinished: bool) -> dict:
        cfg = self.config
        inputs = build_inputs(data, labelled=self.objective.labelled, config=cfg,
                              model=self.model, pixels=self.embed.pixels, rank=self.rank,
                              world=self.world, device=self.device, replay=replay,
                              replay_ratio=replay_ratio)
        table = getattr(inputs, "negatives", None)
        if table is not None:
            self.hard_negatives = table.record()
            note = table.note(self.settings)
            if note and self.rank == 0:
                print(note, file=sys.stderr)
        total = cfg.steps or max(1, round((cfg.epochs or 1.0) * inputs.per_epoch))
        warmup = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
        optimizer = self._optimizer()
        scheduler = build_scheduler(optimizer, total, warmup, cfg.min_lr_ratio)
        # ranks that hold different images need not draw correlated augmentations
        sample_rng = torch.Generator().manual_seed(
            cfg.seed + (0 if inputs.ranks_draw_alike else 1_000_003 * self.rank))
        state = TrainingState(self.model, optimizer, scheduler, sample_rng, inputs,
                              self.sharded, self.precision)
        folder = self._resume(resume, state, total, unfinished) if resume is not None else None
        if on_start is not None:
            on_start()
        if self.step >= total:  # only the final evaluation was left to do
            return self._finish(folder, total, evaluate, on_trained)
        warning = warmup_warning(warmup, total, self.settings)
        if warning and self.rank == 0:
            warn(warning)
        if self.rank == 0 and _lacks_tensorboard(self.run_dir):
            warn(f"train: no TensorBoard event files in {self.run_dir.path}: the tensorboard "
                 "package is not installed (pip install 'cliplab[tensorboard]'; metrics.jsonl "
                 f"holds every record); {TENSORBOARD_ENV}=0 turns them off without this note")

        self._train_mode()
        bar = tqdm(total=total, initial=self.step, desc="train",
                   disable=not cfg.progress or self.rank > 0, dynamic_ncols=True)
        last: dict = {}
        clock = _Clock(state.time_s)
        # set by a NaN/inf loss or gradient norm, read only where a step syncs anyway (a
        # log, checkpoint or evaluation step): no per-step device sync
        diverged = torch.zeros((), dtype=torch.bool, device=self.device)
        checked = self.step
        while self.step < total:
            optimizer.zero_grad(set_to_none=True)
            with distributed.collective_errors(f"training step {self.step + 1}"):
                batch = inputs.next(sample_rng)
                loss = self.objective.backward(batch)  # embed, loss, backward
                distributed.average_gradients(self.replicated_params)
            grad_norm = self._clip_gradients()
            diverged |= ~torch.isfinite(loss.detach()).all()
            diverged |= ~torch.isfinite(grad_norm).to(diverged.device)
            # the rate this step used (step() moves to the next), of parameters without an
            # lr_scale: the first group's rate is a scaled one when its parameters have one
            lr = cfg.lr * multiplier(scheduler)
            self._optimizer_step(optimizer)
            scheduler.step()
            if self.clamps_temperature:
                with torch.no_grad():
                    self.model.logit_scale.clamp_(0, 4.6052)
            self.step += 1
            clock.images += cfg.batch_size
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == total or any(
                    every and self.step % every == 0 for every in (cfg.save_every,
                                                                    cfg.eval_every)):
                # the step's update too: the last step's is saved without another forward
                diverged |= ~self._weights_finite()
                self._refuse_diverged(diverged, checked)  # before anything is logged or saved
                checked = self.step
            if self.step % cfg.log_every == 0 or self.step == total:
                # each rank holds its share of the global-batch loss; their mean is that loss
                last = {"step": self.step, "epoch": inputs.epoch,
                        "loss": distributed.mean_over_ranks(loss).item(),
                        "lr": lr, "grad_norm": float(grad_norm),
                        "logit_scale": self.model.logit_scale.exp().item(),
                        "images_per_s": clock.rate(), "time_s": round(clock.elapsed(), 4)}
                bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
                self._log(last)
            if self.step == total:  # before the last evaluation: one that fails loses nothing
                self.last_checkpoint = self._save(state, clock)
                if on_trained is not None:
                    on_trained()
            if evaluate and (self.step == total or cfg.eval_every and
                             self.step % cfg.eval_every == 0):
                self._log({"step": self.step, **self._evaluate(evaluate)})
            # mid-run, after the evaluation: a resume continues from the RNG state it left
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < total:
                self._save(state, clock)
        bar.close()
        self._eval_mode()
        return last

    def _optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        try:
            optimizer.step()
        except RuntimeError as err:  # AdamW's lr / bias correction, past float32's range
            if "overflow" not in str(err):
                raise
            why = (f"{self.settings}.lr {self.config.lr:g} overflows the optimizer's "
                   f"arithmetic at step {self.step + 1}")
            self._record_divergence(self.step + 1, why)
            raise TrainingDiverged(f"train: {why} (float32 reaches 3.4e38); lower "
                                   f"{self.settings}.lr") from None

    def _weights_finite(self) -> torch.Tensor:
        """Whether every trained weight (this rank's shards) is finite: one bool tensor."""
        return all_finite(p.to_local() if fsdp.is_sharded(p) else p
                          for p in self.params).to(self.device)

    def _refuse_diverged(self, diverged: torch.Tensor, checked: int) -> None:
        """Stop the run (every rank alike) if a step since step ``checked`` had a NaN or
        infinite loss or gradient norm, or left a NaN or infinite weight."""
        if distributed.mean_over_ranks(diverged.float()).item() == 0:
            return
        when = f"at step {self.step}" if checked + 1 == self.step else \
            f"between steps {checked + 1} and {self.step}"
        clip = "" if self.config.grad_clip > 0 else f" or set {self.settings}.grad_clip"
        # a decoupled decay of lr·wd ≥ 1 flips or zeroes every weight each step
        decay = f" or {self.settings}.weight_decay" \
            if self.config.lr * self.config.weight_decay >= 1 else ""
        why = (f"the loss, the gradients or the weights became NaN or infinite {when} "
               f"({self.settings}.lr {self.config.lr:g})")
        self._record_divergence(self.step, why)
        raise TrainingDiverged(
            f"train: {why}, so the run stopped; nothing after step {checked} was logged or "
            f"saved. Lower {self.settings}.lr{decay}, lengthen {self.settings}.warmup{clip}")

    def _record_divergence(self, step: int, why: str) -> None:
        """End metrics.jsonl with ``{"step": step, "diverged": why}``, so the run folder says
        why the run stopped (`cliplab report` reads it). ``step`` is past every checkpoint, so
        a resume drops the record with the steps it redoes. A run that has logged and saved
        nothing gets none: its folder is removed as one that never started."""
        run = self.run_dir
        if run is None or self.rank > 0 or not (run.metrics_file.is_file()
                                                or run.latest_checkpoint() is not None):
            return
        with contextlib.suppress(OSError):  # a full disk must not hide the divergence
            run.log({"step": step, "diverged": why})

    # -- parts of the step ----------------------------------------------------------------------
    def _named_parameters(self):
        yield from self.model.named_parameters()
        if self.head is not None:
            for name, p in self.head.named_parameters():
                yield f"head.{name}", p

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW with one group per (weight decay, lr scale). No decay on gains, biases,
        the temperature or anything under an ``embeddings`` module (token, patch, position and
        class embeddings; open_clip decays the token and patch ones, timm the patch one);
        ``lr_scale`` multiplies the rate of
        parameters whose name contains a given substring (the longest such substring's
        scale wins; one in no trainable parameter's name is a one-line error)."""
        groups: dict[tuple[float, float], list] = {}
        by_length = sorted(self.config.lr_scale.items(), key=lambda kv: -len(kv[0]))
        used: set[str] = set()
        for name, p in self._named_parameters():
            if not p.requires_grad:
                continue
            flat = p.ndim < 2 or "logit_" in name or "embeddings" in name
            key = next((k for k, _ in by_length if k in name), None)  # the most specific
            used.update(k for k in self.config.lr_scale if k in name)
            scale = self.config.lr_scale[key] if key is not None else 1.0
            wd = 0.0 if flat else self.config.weight_decay
            groups.setdefault((wd, float(scale)), []).append(p)
        unmatched = sorted(set(self.config.lr_scale) - used)
        if unmatched:
            raise ConfigError(f"{self.settings}.lr_scale: {unmatched[0]!r} is in the name of no "
                              "trainable parameter (a typo, or a frozen tower's?); parameter "
                              "names look "
                              f"like {next(n for n, p in self._named_parameters())!r}")
        return torch.optim.AdamW(
            [{"params": ps, "weight_decay": wd, "lr": self.config.lr * scale}
             for (wd, scale), ps in groups.items()], lr=self.config.lr)

    def _clip_gradients(self) -> torch.Tensor:
        """The gradients' global norm (logged, and checked for NaN), clipped to
        ``train.grad_clip`` (0: not clipped; it logged a norm of 0 then)."""
        clip = fsdp.clip_grad_norm if self.sharded else torch.nn.utils.clip_grad_norm_
        return clip(self.params, self.config.grad_clip if self.config.grad_clip > 0 else math.inf)

    def _train_mode(self) -> None:
        self.model.train()
        if self.head is not None:
            self.head.train()
        for tower in ("text", "image"):  # no dropout in a frozen tower
            if self.model.tower_is_frozen(tower):
                self.model.tower(tower).eval()

    def _eval_mode(self) -> None:
        self.model.eval()
        if self.head is not None:
            self.head.eval()

    def _evaluate(self, evaluate: Callable[[DualEncoder], dict]) -> dict:
        """Metrics of ``evaluate`` in eval mode; under torchrun only rank 0 evaluates (the
        others go on and wait for it at the next collective) unless the blocks are sharded:
        then every rank runs the towers (each forward gathers the shards) and rank 0 logs, and
        the model's ``state_dict()`` holds whole weights (the evaluation caches fingerprint
        them; every rank gathers them alike)."""
        if self.rank > 0 and not self.sharded:
            return {}
        whole = fsdp.full_state_dicts(self.model) if self.sharded else contextlib.nullcontext()
        with evaluating(self.model), whole:
            return evaluate(self.model)

    def _log(self, record: dict) -> None:
        if self.run_dir and self.rank == 0:
            self.run_dir.log(record)

    # -- checkpoints ----------------------------------------------------------------------------
    def _save(self, state: TrainingState, clock: _Clock) -> Path | None:
        state.time_s = clock.elapsed()  # a resume's time_s continues from it
        return checkpoint.save_checkpoint(self.run_dir, self.step, state, self.config.to_dict(),
                                          self.save_model)

    def _resume(self, resume: str | Path, state: TrainingState, total: int,
                unfinished: bool = False) -> Path:
        """Restore checkpoint ``resume`` into ``state`` (refused when there is nothing left to
        do); returns its folder. At the final step of an ``unfinished`` run of this run folder,
        only its final evaluation is left to do."""
        folder = checkpoint.resume_folder(resume, self.run_dir)
        if self.save_model is not None or self.head is not None:
            raise ConfigError("resume is only supported for plain model training (no head, "
                              "no custom checkpoint writer)")
        self.step, ran_in = checkpoint.load_checkpoint(folder, state, self.device,
                                                       self.config.to_dict())
        if state.time_s is None:  # a checkpoint of an older version: its run's log says
            state.time_s = self._logged_time(folder)
        if ran_in is not None and ran_in != self.precision and self.step < total \
                and self.rank == 0:
            warn(f"the steps up to {self.step} ran in {ran_in}, the rest runs in "
                 f"{self.precision} ({self.settings}.precision {self.config.precision} on "
                 f"{self.device.type}); results.json says both")
        if self.step == total and ran_in is not None:
            self.precision = ran_in  # no step runs: every one ran in the checkpoint's
        if self.step > total:  # steps shortened below the checkpoint
            raise ConfigError(f"nothing to resume: {folder} is at step {self.step}, past the "
                              f"run's length of {total} step(s) now; a resume continues or "
                              "extends a run, it cannot shorten one below its checkpoint")
        if self.step == total and not (unfinished and self._own(folder)):
            # training on would write its results anew from nothing
            raise RunComplete(f"nothing to resume: {folder} is at step {self.step} of "
                              f"{total}, the run is complete; a longer {self.settings}.steps "
                              f"or {self.settings}.epochs extends it")
        if self.run_dir and self.rank == 0:
            # set aside first: a kill between the two leaves this checkpoint the latest, and
            # --resume latest drops the records itself (dropped first, they were lost with
            # the later checkpoints still calling the run complete)
            moved = self.run_dir.set_aside_checkpoints_after(self.step)
            if self.step < total:  # trains again: the run before's results no longer hold
                moved += filter(None, [self.run_dir.set_aside_results()])
            self.run_dir.drop_records_after(self.step)  # logged past the checkpoint, redone
            if moved:
                print(f"cliplab: resumed from step {self.step}: what the run before wrote "
                      f"past it ({', '.join(p.name for p in moved)}) is moved to "
                      f"{moved[0].parent}", file=sys.stderr)
        if self.step < total:  # training goes on (at the final step only the evaluation is left)
            self.resumed_from = {"checkpoint": str(folder.resolve()), "step": self.step,
                                 "precision": ran_in}  # of the steps before it
        return folder

    def _logged_time(self, folder: Path) -> float:
        """The ``time_s`` this run folder logged last up to the step of its checkpoint
        ``folder`` (0 for another run's checkpoint, or none logged)."""
        if not self._own(folder):
            return 0.0
        times = [r["time_s"] for r in self.run_dir.records() if isinstance(r.get("step"), int)
                 and r["step"] <= self.step and isinstance(r.get("time_s"), (int, float))]
        return float(times[-1]) if times else 0.0

    def _own(self, folder: Path) -> bool:
        """Whether checkpoint ``folder`` is one of this run folder's."""
        return self.run_dir is not None and \
            folder.resolve().parent == (self.run_dir.path / CHECKPOINTS).resolve()

    def _finish(self, folder: Path, total: int, evaluate: Callable[[DualEncoder], dict] | None,
                on_trained: Callable[[], None] | None = None) -> dict:
        """The end of a run whose final checkpoint ``folder`` was written but whose final
        evaluation never finished: that evaluation, logged (in place of any earlier record of
        it), and the run's last training record (as metrics.jsonl holds it) returned."""
        if self.rank == 0:
            print(f"train: {folder} is the run's final step ({total}) and the run never "
                  "finished: running only its final evaluation", file=sys.stderr)
        self.last_checkpoint = folder
        records = self.run_dir.records() if self.run_dir else []
        last = next((r for r in reversed(records) if r.get("step") == total and "loss" in r),
                    {"step": total})
        if on_trained is not None:
            on_trained()
        if evaluate:
            if self.run_dir and self.rank == 0:
                self.run_dir.drop_records_at(total, keep=lambda record: "loss" in record)
            self._log({"step": total, **self._evaluate(evaluate)})
        self._eval_mode()
        return last


def _lacks_tensorboard(run_dir: RunDir | None) -> bool:
    """Whether ``run_dir`` writes no TensorBoard events only because the package is missing
    (they were not turned off with ``CLIPLAB_TENSORBOARD=0``, read as `runs` reads it)."""
    return run_dir is not None and not run_dir.tensorboard and not tensorboard_turned_off() \
        and not tensorboard_available()


class _Clock:
    """A run's wall time, ``time_s`` (continued from ``before``, the time at the checkpoint a
    resume started from), and the images per second between two logs."""

    def __init__(self, before: float | None):
        self.start = self.last = time.time()
        self.before = before or 0.0
        self.images = 0  # trained on since the last log (or this process's start)

    def elapsed(self) -> float:
        return self.before + time.time() - self.start

    def rate(self) -> float:
        """Images per second since the last call (or the start); starts a new window."""
        now = time.time()
        rate = self.images / max(now - self.last, 1e-9)
        self.last, self.images = now, 0
        return rate


def _check_hard_negatives(config: TrainConfig, head: nn.Module | None, world: int) -> None:
    """Hard negatives are implemented for the plain CLIP loss in one process; say so
    instead of silently training without them."""
    if head is not None:
        raise ConfigError("train.hard_negatives adds negative captions to the contrastive "
                          "loss; it does not apply to a classification head")
    unsupported = [name for name, on in (("train.loss=siglip", config.loss == "siglip"),
                                         ("train.loss_tile", config.loss_tile is not None),
                                         ("train.micro_batch_size",
                                          config.micro_batch_size is not None),
                                         ("torchrun (several ranks)", world > 1)) if on]
    if unsupported:
        raise ConfigError(f"train.hard_negatives works with the plain CLIP loss in one "
                          f"process; not with {', '.join(unsupported)}")
