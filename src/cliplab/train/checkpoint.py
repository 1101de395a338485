"""Training checkpoints: ``checkpoints/step-N/{model/, trainer_state.pt}`` of a run folder,
written to a temp name and renamed (so a killed run never leaves half a checkpoint), and read
back so a resumed run continues exactly where the checkpoint left it.

``trainer_state.pt`` holds the step, the data position, the optimizer, scheduler and RNG states
and the run's config: tensors, numbers and plain dicts, read with ``weights_only=True``.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from cliplab.errors import ConfigError
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.folder import write_trained_by
from cliplab.train import distributed, fsdp
from cliplab.train.mps_rng import mps_rng_state, set_mps_rng_state
from cliplab.runs import RunDir, checkpoint_step

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
_STATE_KEYS = ("step", "batches", "optimizer", "scheduler", "sample_rng", "torch_rng")
# train keys a resume may change: how the run is shown, saved and placed, how the same
# numbers are computed, and its length (a run extended: the schedule follows the new length
# from the step reached); any other change would make the resumed run another run
RESUME_MAY_CHANGE = {"progress", "log_every", "save_every", "keep_checkpoints", "eval_every",
                     "device", "dist_timeout_s", "cache_frozen_features",
                     "gradient_checkpointing", "loss_tile", "micro_batch_size", "epochs", "steps"}


class DataPosition(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainingState:
    """What a checkpoint saves and a resume restores, besides the step."""

    model: DualEncoder
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler
    sample_rng: torch.Generator
    inputs: DataPosition
    sharded: bool  # FSDP: weights and optimizer state are gathered whole / put back on shards
    precision: str = "fp32"  # what the steps run in (train.precision resolved on this device)
    # the run's wall time in seconds up to the step (metrics' time_s); None: a checkpoint of an
    # older version, which did not save it
    time_s: float | None = 0.0


def save_checkpoint(run_dir: RunDir | None, step: int, state: TrainingState, config: dict,
                    save_model: Callable[[Path], None] | None = None) -> Path | None:
    """Write ``checkpoints/step-N`` (every rank calls it: gathering sharded weights and the
    data positions are collectives; rank 0 writes, the others wait). ``save_model(folder)``
    replaces ``model.save(folder / "model")`` (e.g. a LoRA adapter; such a checkpoint is not
    resumable). Returns the folder (None without a run folder)."""
    weights = fsdp.full_model_state(state.model) if state.sharded else None
    rngs = {"sample_rng": state.sample_rng.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": _cuda_rng_state(),
            "mps_rng": mps_rng_state()}
    saved = {"step": step, "batches": state.inputs.state_dict(),
             "optimizer": fsdp.full_optimizer_state(state.model, state.optimizer)
             if state.sharded else state.optimizer.state_dict(),
             "scheduler": state.scheduler.state_dict(),
             **rngs,
             # each rank's own: ranks that draw their own samples (streams) and augmentations
             # hold different generator states, and a resume must give each its own back
             "rank_rngs": distributed.gather_objects(rngs),
             "config": config, "precision": state.precision, "time_s": state.time_s}

    def write(folder: Path) -> None:
        if save_model is not None:
            save_model(folder)
        else:
            state.model.save(folder / MODEL_DIR, state_dict=weights)
            # a model folder copied out of the run still names the run (config, data) and step
            write_trained_by(folder / MODEL_DIR, run_dir.path, step)
        save_state(saved, folder / STATE_FILE)

    rank0 = distributed.rank() == 0
    path = run_dir.atomic_checkpoint(step, write) if run_dir and rank0 else None
    if path is not None and config.get("keep_checkpoints"):  # older ones go once this is whole
        run_dir.keep_newest_checkpoints(int(config["keep_checkpoints"]), step)
    distributed.barrier()
    return path if run_dir is None or rank0 else run_dir.checkpoint_dir(step)


def save_state(state: dict, path: Path) -> None:
    """``torch.save(state, path)``, a refused write (a full disk, a file-size limit) raised as
    the `OSError` naming ``path``: torch's writer reports it as a RuntimeError (``[enforce
    fail at inline_container.cc] unexpected pos``), which reached the user as a traceback. The
    file is written through Python so that the system's error is known, not guessed from
    torch's text; any other RuntimeError is a real one and raised as it is."""
    try:
        with open(path, "wb") as file:
            torch.save(state, file)
    except RuntimeError as err:
        cause = err.__context__  # what Python's write raised inside torch's writer
        if not isinstance(cause, OSError) or cause.errno is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from err
    except OSError as err:  # the last buffer's write, at close
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


def resume_folder(resume: str | Path, run_dir: RunDir | None) -> Path:
    """The checkpoint folder ``resume`` names (``"latest"``: the newest of the run folder
    ``run_dir``, which it needs)."""
    if resume == "latest":
        if run_dir is None:
            raise ConfigError("resume 'latest' continues the newest checkpoint of a run "
                              "folder: give the Trainer its run_dir (on the command line: "
                              "--out RUN)")
        folder = run_dir.latest_checkpoint()
        if folder is None:
            raise ConfigError(f"--resume latest: {run_dir.path} holds no checkpoint to continue")
    else:
        folder = Path(resume)
    if not folder.exists():
        raise ConfigError(f"cannot resume: {resume} does not exist; give a checkpoint folder "
                          "(RUN/checkpoints/step-N) or --resume latest with --out RUN")
    if not (folder / STATE_FILE).is_file():
        raise ConfigError(f"cannot resume: {resume} holds no {STATE_FILE}")
    return folder


def read_state(folder: Path) -> dict:
    """``folder/trainer_state.pt`` (tensors and plain values only), or a one-line error naming
    the file and the run's earlier checkpoints to resume from instead."""
    path = folder / STATE_FILE
    try:
        saved = torch.load(path, weights_only=True)
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError,
            zipfile.BadZipFile, IndexError, KeyError, TypeError, AttributeError) as err:
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:120]
        why = type(err).__name__ + (f": {first}" if first else "")
        raise ConfigError(f"cannot resume: {path} is unreadable ({why}); "
                          f"{_earlier_checkpoints(folder)}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"cannot resume: {path} is not a trainer state (it holds a "
                          f"{type(saved).__name__}); {_earlier_checkpoints(folder)}")
    return saved


def _earlier_checkpoints(folder: Path) -> str:
    """What to resume from instead of the checkpoint ``folder``: its run's earlier ones."""
    step = checkpoint_step(folder)
    earlier = sorted((n, p) for p in folder.parent.iterdir()
                     if (n := checkpoint_step(p)) is not None and (step is None or n < step)) \
        if folder.parent.is_dir() else []
    if not earlier:
        return "the run has no earlier checkpoint: start it again in a new --out"
    names = ", ".join(p.name for _, p in earlier)
    return (f"resume from an earlier checkpoint with --resume {earlier[-1][1]} "
            f"(this run has {names})")


def config_changes(saved: dict, now: dict) -> list[str]:
    """``train.KEY (checkpoint A, now B)`` for each train key whose value differs, except
    those in `RESUME_MAY_CHANGE`."""
    return [f"train.{key} (checkpoint {saved.get(key)!r}, now {now.get(key)!r})"
            for key in sorted(saved.keys() | now.keys())
            if key not in RESUME_MAY_CHANGE and saved.get(key) != now.get(key)]


def resume_refused(where: str | Path, changed: list[str]) -> ConfigError:
    """The error for a resume whose config differs from the run's in ``changed``."""
    return ConfigError(f"cannot resume {where}: a resume continues the run as it was "
                       f"configured, and {'; '.join(changed)} changed; drop the change, or "
                       "start a new --out with the run's checkpoint as its model")


def run_config_changes(saved: dict, now: dict) -> list[str]:
    """`config_changes` of a whole run config (``config.yaml``): its ``model`` and ``data``
    must be the same too."""
    changed = [f"{key} ({saved.get(key)!r} in the run, now {now.get(key)!r})"
               for key in ("model", "data") if saved.get(key) != now.get(key)]
    return changed + config_changes(saved.get("train") or {}, now.get("train") or {})


def _cuda_rng_state() -> torch.Tensor | None:
    """The current GPU's generator state (what dropout on it draws from), None without CUDA
    in use (augmentation and sampling draw from CPU generators)."""
    return torch.cuda.get_rng_state() if torch.cuda.is_available() and \
        torch.cuda.is_initialized() else None


def load_checkpoint(folder: Path, state: TrainingState, device: torch.device,
                    config: dict | None = None) -> tuple[int, str | None]:
    """Restore ``state`` (weights, optimizer, scheduler, RNGs, data position) from checkpoint
    ``folder``; returns its step and the precision its steps ran in (None in a checkpoint of
    an older version). ``config`` (the train config now) must be the checkpoint's but for
    `RESUME_MAY_CHANGE` keys: a resume continues the run as it was configured."""
    saved = read_state(folder)
    missing = [k for k in _STATE_KEYS if k not in saved]
    if missing:
        raise ConfigError(f"cannot resume: {folder / STATE_FILE} lacks {', '.join(missing)} "
                          f"(not a checkpoint of this cliplab version)")
    changed = config_changes(saved.get("config") or {}, config) if config is not None else []
    if changed:
        raise resume_refused(folder, changed)
    loaded = DualEncoder.load(folder / MODEL_DIR, device=device)
    try:
        if state.sharded:
            fsdp.load_full_state(state.model, loaded.model.state_dict(), state.optimizer,
                                 saved["optimizer"])
        else:
            state.model.model.load_state_dict(loaded.model.state_dict())
            state.optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:  # another model or trainable set
        first = str(err).strip().splitlines()
        raise ConfigError(f"cannot resume {folder}: its weights or optimizer do not fit this "
                          f"run's model ({first[-1].strip() if first else type(err).__name__}); "
                          "resume with the model the run started with (a run with "
                          "lock_*_except_last saved before cliplab trained the final norm with "
                          "the last blocks cannot resume: start it again)") from None
    state.scheduler.load_state_dict(saved["scheduler"])
    # the optimizer came back with the saved run's rates; a run extended since (more steps)
    # follows its new schedule from this step on, the first step too
    for group, base, rate in zip(state.optimizer.param_groups, state.scheduler.base_lrs,
                                 state.scheduler.lr_lambdas):
        group["lr"] = base * rate(state.scheduler.last_epoch)
    rngs = saved.get("rank_rngs")
    # a checkpoint of another number of ranks (or of an older version) has no state of this
    # rank's: rank 0's is the right one where ranks draw alike (in-memory data)
    mine = rngs[distributed.rank()] if isinstance(rngs, list) and \
        len(rngs) == distributed.world_size() else saved
    state.sample_rng.set_state(mine["sample_rng"])
    torch.set_rng_state(mine["torch_rng"])
    if mine.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda_rng"])  # this rank's GPU's (dropout on a GPU)
    set_mps_rng_state(mine.get("mps_rng"))  # Apple's GPU's
    state.inputs.load_state_dict(saved["batches"])
    time_s = saved.get("time_s")
    state.time_s = float(time_s) if isinstance(time_s, (int, float)) else None
    return int(saved["step"]), saved.get("precision")
