"""`cliplab pretrain`: contrastive pretraining from a YAML recipe, with an evaluation suite
(the `cliplab eval` schema) run every ``train.eval_every`` steps and at the end."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from cliplab.config import OutFolder, Section, changed_key_paths, load_yaml, validate, value_at
from cliplab.data.folder_files import with_folder_captions
from cliplab.data.sources import DataSpecField, as_pairs, checked_spec, load_source
from cliplab.data.types import ImageTextPairs, SkipReport
from cliplab.errors import ConfigError, DataError, errors_naming, warn
from cliplab.evaluate.suite import SuiteSpec, run_suite, suite_precision
from cliplab.evaluate.tasks import TaskContext
from cliplab.models.device import resolve_device
from cliplab.models.folder import model_fingerprint
from cliplab.models.preprocess import PreprocessConfig
from cliplab.models.resolve import load_model, model_record
from cliplab.models.spec import ModelField, model_spec
from cliplab.provenance import stamp
from cliplab.train import checkpoint, distributed
from cliplab.output_folder import spec_paths
from cliplab.runs import (RESULTS_FILE, START_MODEL_FILE, RunDir, check_run_out,
                          default_run_dir, removed_if_unstarted)
from cliplab.train.stream_batches import StreamBatches, checked_stream_spec
from cliplab.train.batches import check_batch_over_ranks
from cliplab.train.config import TrainConfig
from cliplab.train.trainer import Trainer


class PretrainData(Section):
    """``train``: the pairs to learn from (a data spec); ``replay``: ``{ratio, <data spec>}``,
    old pairs mixed into every batch (continued pretraining)."""

    train: DataSpecField
    replay: dict[str, Any] | None = None

    @field_validator("train", mode="before")
    @classmethod
    def _streamed_shards(cls, spec: Any) -> Any:
        # errors keep their keys: data.train.shuffle_buffer: ...
        return checked_stream_spec(spec) if isinstance(spec, dict) and "stream" in spec \
            else spec

    @field_validator("replay")
    @classmethod
    def _ratio_and_source(cls, spec: dict[str, Any] | None) -> dict[str, Any] | None:
        if not spec:
            return None
        if "ratio" not in spec:
            raise ValueError("needs 'ratio' (the fraction of each batch, e.g. 0.2) and a source "
                             "spec, e.g. {ratio: 0.2, source: shapes, n: 4000}")
        ratio = _ReplayRatio.model_validate({"ratio": spec["ratio"]}).ratio  # keeps its key
        if ratio == 0:  # recorded as replayed, yet every batch would be the new data alone
            raise ValueError("ratio 0 replays nothing; give a fraction above 0 (e.g. 0.2) or "
                             "leave data.replay out")
        return {"ratio": ratio, **checked_spec({k: v for k, v in spec.items() if k != "ratio"})}


class _ReplayRatio(Section):
    ratio: float = Field(ge=0, lt=1)


class PretrainConfig(Section):
    """A pretraining recipe (configs/pretrain/*.yaml)."""

    model: ModelField
    data: PretrainData
    train: TrainConfig = TrainConfig()
    eval: SuiteSpec | None = None
    out: OutFolder | None = None

    @field_validator("eval", mode="before")
    @classmethod
    def _eval_is_a_suite(cls, value: Any) -> Any:
        if isinstance(value, list):
            raise ValueError("eval is a suite in the `cliplab eval` schema now: use eval.tasks, "
                             "e.g. {tasks: [{name: colour, task: zeroshot, data: {source: "
                             "shapes, attribute: color}}]}")
        return value


def run_pretrain(cfg: PretrainConfig | dict, resume: str | None = None,
                 progress: bool = True, where: str = "the pretrain config") -> dict:
    """Train the configured model on ``data.train``; run the ``eval`` suite every
    ``train.eval_every`` steps and at the end; write the run. ``where`` names the config in
    errors found once its data loads (the CLI gives its file).

    Under ``torchrun`` each process joins the process group first (``train.dist_timeout_s``
    bounds how long a rank waits for a dead peer) and leaves it at the end; rank 0 writes."""
    start = time.time()
    if not isinstance(cfg, PretrainConfig):
        cfg = validate(PretrainConfig, cfg, where)
    if resume == "latest" and not cfg.out:  # a new default folder holds no checkpoint
        raise ConfigError("--resume latest continues the newest checkpoint of a run folder: "
                          "give the run folder as --out RUN")
    if cfg.out:  # before any slow loading
        check_run_out(cfg.out, [cfg.model.name, *spec_paths(cfg.data.train, cfg.data.replay)],
                      resume, resumable=True)
        if resume is not None:
            _check_resumed_config(Path(cfg.out), cfg)
    if resume not in (None, "latest"):
        _check_checkpoints_run(Path(resume), cfg)
    backend = distributed.backend_for(resolve_device(cfg.train.device))  # train.device=cpu: gloo
    distributed.init_distributed(backend, timeout_s=cfg.train.dist_timeout_s)
    try:
        check_ranks_agree(cfg, resume)
    except ConfigError:
        distributed.shutdown()
        raise
    progress = progress and distributed.rank() == 0  # one set of bars, not one per rank
    train_cfg = cfg.train.model_copy(update={"progress": progress})
    if cfg.train.eval_every and not cfg.eval and distributed.rank() == 0:  # ranks known now
        warn(f"pretrain: train.eval_every={cfg.train.eval_every} has no eval: suite to run, so "
             "nothing is evaluated during training")
    try:
        trained = _train(cfg, train_cfg, resume, progress, where)  # the model is let go of here
    finally:
        distributed.shutdown()
    # what ran, where the config says auto, and where a resumed run's steps before began
    results: dict = {"train": trained.last, "skipped": trained.skipped.to_dict(),
                     "evals": trained.evals,
                     "model_dir": str(Path(trained.model_dir).resolve()),  # from any folder
                     # training's precision; the evals beside it ran in the suite's
                     "precision": trained.precision, "device": trained.device,
                     "eval_precision": trained.eval_precision,
                     "resumed_from": trained.resumed_from,
                     "wall_time_s": round(time.time() - start, 1)}
    if trained.hard_negatives is not None:  # how many captions trained without a negative
        results["hard_negatives"] = trained.hard_negatives
    if trained.rank == 0:
        trained.run.write_json(RESULTS_FILE, stamp(results))
        if trained.skipped.total:  # told, not only written down
            print(f"data.train: {trained.skipped.summary()}; each is listed under 'skipped' in "
                  f"{trained.run.path / RESULTS_FILE}", file=sys.stderr)
    return results


@dataclass
class _Trained:
    """What a run keeps of its training once the model is gone."""

    last: dict
    skipped: SkipReport
    evals: dict
    model_dir: Path
    run: RunDir
    rank: int
    precision: str
    device: str
    resumed_from: dict | None
    eval_precision: str | None  # what the eval: suite ran in (None: no suite)
    hard_negatives: dict | None  # train.hard_negatives' caption counts (None: off)


def _train(cfg: PretrainConfig, train_cfg: TrainConfig, resume: str | None,
           progress: bool, where: str) -> _Trained:
    """Load the data and model, train and evaluate; every rank calls it. The model lives only
    here, so that leaving the process group afterwards can end the group (see
    ``distributed.shutdown``)."""
    check_batch_over_ranks(train_cfg.batch_size, distributed.world_size())  # before loading
    # the model before the data: its input is what image files are decoded to
    model = load_model(cfg.model)
    spec = cfg.data.train
    if resume is not None and cfg.out:
        model = _start_model_kept(cfg, train_cfg, model, streamed=bool(spec.get("stream")))
    model_input = model.preprocess_config
    with errors_naming(where):  # a data error names its key (data.train), this its file
        if spec.get("stream"):  # validated with the config (stream: false is dropped there)
            pairs = StreamBatches.from_spec(spec, train_cfg.batch_size, train_cfg.seed,
                                            model_input)
        else:
            pairs = _pairs(spec, progress, "data.train", model_input)
        replay, replay_ratio = _replay(cfg.data.replay, progress, model_input)
    context = TaskContext(progress=False)
    # the weights as loaded, before any step (a resume keeps the record of the run's start)
    start_model = start_model_record(cfg, model) \
        if resume is None and distributed.rank() == 0 else None
    if cfg.eval:  # a bad eval source, or a task the model cannot serve, fails before training
        context.preload(cfg.eval.tasks, f"{where}: eval.tasks", model=model)
    # the run folder is made only once the inputs are known to be good; its default name
    # holds a timestamp, so every rank takes rank 0's
    out = cfg.out or distributed.broadcast_from_rank0(default_run_dir("pretrain"))
    existed = Path(out).exists()
    run = RunDir(out)
    cfg = cfg.model_copy(update={"out": str(run.path)})
    evals: dict = {}

    def evaluate(m) -> dict:
        evals.update(run_suite(m, cfg.eval, context.for_new_weights()))
        return scalar_metrics(evals, "eval")

    def write_config() -> None:  # once a resume is accepted: a refused one changes nothing
        if distributed.rank() == 0:
            run.write_config(cfg.to_dict())
            if start_model is not None:
                run.write_json(START_MODEL_FILE, start_model)

    skipped = pairs.skipped

    def gather_skips() -> None:
        """Each rank skipped what its own shards held, once per epoch that read them: gathered
        before the final evaluation (after it, the other ranks would wait it out)."""
        nonlocal skipped
        if isinstance(pairs, StreamBatches):
            skipped = SkipReport.merged([SkipReport.from_dict(report) for report in
                                         distributed.gather_objects(pairs.skipped.to_dict())])

    with removed_if_unstarted(run.path, existed):
        trainer = Trainer(model, train_cfg, run)
        last = trainer.fit(pairs, resume=resume, replay=replay, replay_ratio=replay_ratio,
                           evaluate=evaluate if cfg.eval else None, on_start=write_config,
                           on_trained=gather_skips,
                           unfinished=not (run.path / RESULTS_FILE).exists())
    return _Trained(last, skipped, evals, trainer.last_checkpoint / "model", run, trainer.rank,
                    trainer.precision, str(trainer.device), trainer.resumed_from,
                    suite_precision(cfg.eval, context, model) if cfg.eval else None,
                    trainer.hard_negatives)


def check_ranks_agree(cfg: PretrainConfig, resume: str | None) -> None:
    """Under torchrun, refuse (on every rank alike) a rank whose config or ``--resume``
    differs from rank 0's, naming the keys: such a rank would draw other batches or take other
    steps while config.yaml records rank 0's, or abort in a mismatched collective."""
    mine = {**cfg.to_dict(), "--resume": resume}
    every = distributed.gather_objects(mine)
    for rank, theirs in enumerate(every[1:], start=1):
        changed = changed_key_paths(every[0], theirs, skip=("progress",))
        if changed:
            shown = "; ".join(f"{path}: {value_at(theirs, path)!r} (rank 0: "
                              f"{value_at(every[0], path)!r})"
                              for path in changed[:3])
            raise ConfigError(f"rank {rank} was given another config than rank 0 ({shown}"
                              f"{'; ...' if len(changed) > 3 else ''}): every rank must run the "
                              "same recipe, command line and files")


def start_model_record(cfg: PretrainConfig, model: Any) -> dict:
    """What a run's ``start_model.json`` holds: the ``model`` spec as config.yaml has it, the
    folder it resolved to (None for a preset) and the fingerprint of ``model``'s weights
    (`model_record`)."""
    return {"model": cfg.to_dict()["model"], **model_record(cfg.model, model)}


def _start_model_kept(cfg: PretrainConfig, train_cfg: TrainConfig, model: Any,
                      streamed: bool) -> Any:
    """The model to resume with. A run that computes inputs from its start model once (a
    locked tower's cached features, mined hard-negative neighbours) needs the weights it
    started from, not what its `model:` holds now (a run folder moves on): when they differ,
    the folder ``start_model.json`` recorded is loaded if it still holds them, else the resume
    is refused (the steps after the checkpoint would train against another model's features)."""
    record_file = Path(cfg.out) / START_MODEL_FILE
    uses = [] if streamed else [what for what, used in (
        ("mines its hard-negative neighbours",
         train_cfg.hard_negatives is not None and train_cfg.hard_negatives.images == "neighbours"),
        ("caches its locked text tower's features", train_cfg.cache_frozen_features
         and train_cfg.lock_text and not train_cfg.lock_text_except_last),
        ("caches its locked image tower's features", train_cfg.cache_frozen_features
         and not train_cfg.augment and train_cfg.lock_image
         and not train_cfg.lock_image_except_last)) if used]
    if not uses or not record_file.is_file():
        return model
    start = json.loads(record_file.read_text(encoding="utf-8"))
    if model_fingerprint(model) == start["fingerprint"]:
        return model
    folder, name = start.get("model_folder"), model_spec(start["model"]).name
    if folder and Path(folder).is_dir():
        recorded = load_model(folder)
        if model_fingerprint(recorded) == start["fingerprint"]:
            if distributed.rank() == 0:
                print(f"cliplab: resuming with the model the run started from, {folder} "
                      f"(model {name} holds other weights now)", file=sys.stderr)
            return recorded
    where = f"{folder}, " if folder else ""
    raise ConfigError(f"--resume: model {name} holds other weights than the run "
                      f"started from ({where}fingerprint {start['fingerprint'][:12]}), and the "
                      f"run {' and '.join(uses)} from its start model: resumed, its next steps "
                      "would train against another model's; put those weights back, or start a "
                      "new run")


def _check_resumed_config(out: Path, cfg: PretrainConfig) -> None:
    """Refuse a resume whose model, data, train keys (but those a resume may change) or eval
    suite differ from the run's own ``config.yaml``, before config.yaml is rewritten (another
    suite would log other numbers under the same ``eval/<task>`` curve)."""
    saved = out / "config.yaml"
    if saved.is_file():
        run, now = load_yaml(saved) or {}, cfg.to_dict()
        changed = checkpoint.run_config_changes(run, now) + [
            f"{path} (the run's curve holds the old suite's numbers)"
            for path in changed_key_paths(run.get("eval"), now.get("eval"), prefix="eval.")]
        if changed:
            raise checkpoint.resume_refused(out, changed)


def _check_checkpoints_run(ckpt: Path, cfg: PretrainConfig) -> None:
    """Refuse to continue a checkpoint of another run (``RUN/checkpoints/step-N``) whose model,
    data or train keys differ from this config: the resumed run would mix two runs (its data
    position applied to other data). The same recipe in another folder continues it exactly."""
    run = next((p.parent for p in ckpt.resolve().parents if p.name == "checkpoints"), None)
    saved = run / "config.yaml" if run is not None else None
    if saved is None or not saved.is_file() or (
            cfg.out and run == Path(cfg.out).resolve()):  # its own run: checked against it
        return
    changed = checkpoint.run_config_changes(load_yaml(saved) or {}, cfg.to_dict())
    if changed:
        raise ConfigError(f"--resume {ckpt} is a checkpoint of the run {run}, whose "
                          f"config differs: {'; '.join(changed)}; resume with that run's "
                          "config, or start a new --out with the checkpoint as its model")


def _replay(spec: dict | None, progress: bool, model_input: PreprocessConfig | None = None
            ) -> tuple[ImageTextPairs | None, float]:
    """``data.replay: {ratio: 0.2, <source spec>}`` → (old pairs, fraction of each batch)."""
    if not spec:
        return None, 0.0
    spec = dict(spec)  # checked with the config (`PretrainData`)
    ratio = float(spec.pop("ratio"))
    return _pairs(spec, progress, "data.replay", model_input), ratio


def _pairs(spec: dict, progress: bool, where: str, model_input: PreprocessConfig | None = None
           ) -> ImageTextPairs:
    """The pairs a data spec loads (labelled images as captioned pairs; an image folder with
    ``NAME.txt`` captions as those, `with_folder_captions`), image files decoded to
    ``model_input`` (`load_source`); none is an error."""
    pairs = as_pairs(load_source(with_folder_captions(spec), progress, where, model_input), where)
    if not len(pairs):
        raise DataError(f"{where} holds no pairs (source {spec.get('source')!r} loaded none)")
    return pairs


def scalar_metrics(results: dict, prefix: str) -> dict[str, float]:
    """``{prefix/task/key[/sub]: number}``: the numbers of nested results, for metric logs."""
    out: dict[str, float] = {}
    for key, value in results.items():
        path = f"{prefix}/{key}"
        if key == "skipped":  # the data's skip record, the same at every evaluation
            continue
        if isinstance(value, dict):
            out.update(scalar_metrics(value, path))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[path] = value
    return out
