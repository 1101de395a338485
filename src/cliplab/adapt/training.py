"""The small supervised loop the few-shot adapters share: minibatches of sample indices,
SGD or AdamW, warm-up + cosine schedule (the Trainer's), a progress bar.

The `Trainer` runs the contrastive objective on image-text pairs; these methods minimise a
classification loss over a few hundred cached features and a handful of parameters, which
needs none of its checkpointing or data machinery.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from cliplab.config import validate
from cliplab.errors import ConfigError, TrainingDiverged, warn
from cliplab.models.finite import all_finite
from cliplab.train.schedule import build_scheduler
from cliplab.train.config import train_over_defaults
from cliplab.train.trainer import TrainConfig, gradients_on


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float,
                   weight_decay: float = 0.0, momentum: float = 0.9,
                   eps: float = 1e-8) -> torch.optim.Optimizer:
    """``sgd`` (with momentum, as CoOp) or ``adamw`` (as Tip-Adapter-F, CLIP-Adapter)."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps)
    raise ConfigError(f"optimizer must be 'sgd' or 'adamw', not {name!r}")


def train_steps(params: list[torch.nn.Parameter], loss_fn: Callable[[torch.Tensor], torch.Tensor],
                n: int, epochs: int, batch_size: int, lr: float, optimizer: str = "adamw",
                weight_decay: float = 0.0, warmup: int = 0, eps: float = 1e-8, seed: int = 0,
                progress: bool = True, desc: str = "adapt") -> list[float]:
    """Minimise ``loss_fn(batch_indices)`` over ``epochs`` passes of shuffled minibatches of
    ``range(n)``; returns the mean loss of each epoch."""
    if epochs < 1 or batch_size < 1 or n < 1:
        raise ConfigError(f"{desc}: epochs, batch_size and the number of training samples must "
                          f"be positive (got {epochs}, {batch_size}, {n})")
    opt = make_optimizer(params, optimizer, lr, weight_decay, eps=eps)
    per_epoch = -(-n // batch_size)
    total = epochs * per_epoch
    if warmup > total:  # as the Trainer warns of one
        warn(f"{desc}: options.warmup={warmup} steps is longer than the run ({total} steps: "
             f"epochs x batches of the training set), so it is shortened to {total - 1}")
    sched = build_scheduler(opt, total, min(warmup, total - 1))
    g = torch.Generator().manual_seed(seed)
    history, step = [], 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    with gradients_on(desc):  # inside a caller's torch.no_grad() too
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            losses = []
            for i in range(0, n, batch_size):
                loss = loss_fn(order[i:i + batch_size])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                step += 1
                bar.update(1)
                _refuse_diverged(losses[-1], params, desc, step, lr, weight_decay)
            history.append(sum(losses) / len(losses))
            bar.set_postfix(loss=f"{history[-1]:.3f}", refresh=False)
    bar.close()
    return history


def check_batch_fits_images(batch_size: int, n: int) -> None:
    """A one-line error naming ``options.train.batch_size`` when a method that trains with the
    `Trainer` (which drops an epoch's last incomplete batch) has fewer training images than one
    batch, before the model is touched."""
    if batch_size > n:
        raise ConfigError(f"options.train.batch_size: a batch of {batch_size} is larger than the "
                          f"{n} training images (shots x classes, or train_size); lower "
                          "options.train.batch_size or train on more images")


def trainer_config(defaults: dict, given: dict, where: str = "options.train",
                   device: torch.device | None = None, seed: int | None = None,
                   **fixed) -> TrainConfig:
    """The `Trainer`'s settings of a method that trains weights: the method's ``defaults``
    (and ``device``, the model's: it trains where it was loaded; ``seed``, the run's) updated
    by the config's ``options.train`` section, then the ``fixed`` settings the method needs
    (e.g. ``lock_text=True``); bad keys are one-line `ConfigError`s naming ``where``."""
    if device is not None:
        defaults = {**defaults, "device": str(device)}
    if seed is not None:  # the run's seed, unless options.train gives one of its own
        defaults = {**defaults, "seed": seed}
    return validate(TrainConfig, {**train_over_defaults(defaults, given), **fixed}, where)


def settings_that_ran(config: TrainConfig, precision: str) -> dict:
    """A method's `Trainer` settings as results.json records them: ``config`` with the
    precision the steps ran in (``auto`` resolved, as the device already is)."""
    return {**config.to_dict(), "precision": precision}


def _refuse_diverged(loss: float, params: list[torch.nn.Parameter], desc: str, step: int,
                     lr: float, weight_decay: float) -> None:
    """Stop (one line naming the options) once a step's loss or the weights it left are NaN or
    infinite: the adapter would be saved and scored as class 0 everywhere."""
    if math.isfinite(loss) and bool(all_finite(params)):  # one sync, not one per parameter
        return
    # a decoupled decay of lr·wd ≥ 1 flips or zeroes every weight each step
    decay = f", options.weight_decay {weight_decay:g}" if lr * weight_decay >= 1 else ""
    raise TrainingDiverged(f"{desc}: the loss or the learned weights became NaN or infinite at "
                           f"step {step} (options.lr {lr:g}{decay}), so nothing was saved; "
                           "lower options.lr" + (" or options.weight_decay" if decay else ""))
