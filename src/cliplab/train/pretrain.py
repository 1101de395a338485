"""`cliplab pretrain`: contrastive pretraining from a YAML recipe, with optional zero-shot
evaluation of the result."""

from __future__ import annotations

import time

from cliplab.config import check_keys
from cliplab.data.sources import as_labelled, as_pairs, load_source
from cliplab.data.types import ImageTextPairs, LabelledImages, SkipReport
from cliplab.errors import ConfigError
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.zeroshot import zeroshot_classifier, zeroshot_metrics
from cliplab.models.resolve import load_model
from cliplab.train import distributed
from cliplab.runs import RunDir, default_run_dir
from cliplab.train.stream_batches import StreamBatches
from cliplab.train.trainer import TrainConfig, Trainer

TOP_KEYS = {"model", "data", "train", "eval", "out"}


def model_from_config(spec: dict):
    """``{preset: NAME, options: {...}}`` or ``{path: FOLDER}`` (a model, checkpoint or run
    folder: continued pretraining starts from its weights with a fresh optimizer/schedule)."""
    if not isinstance(spec, dict):
        raise ConfigError("config key 'model' must be a mapping with 'preset' or 'path'")
    check_keys(spec, {"preset", "options", "path"}, "section 'model'")
    if "path" in spec:
        return load_model(spec["path"])
    if "preset" not in spec:
        raise ConfigError("section 'model' needs 'preset' (e.g. tiny-clip) or 'path'")
    return load_model({"name": spec["preset"], "options": spec.get("options") or {}})


def run_pretrain(cfg: dict, resume: str | None = None, progress: bool = True) -> dict:
    """Train the configured model on ``data.train``; evaluate ``eval`` tasks; write the run.

    Under ``torchrun`` each process joins the process group first (``train.dist_timeout_s``
    bounds how long a rank waits for a dead peer) and leaves it at the end; rank 0 writes."""
    start = time.time()
    check_keys(cfg, TOP_KEYS, "the pretrain config")
    if not isinstance(cfg.get("data"), dict) or "train" not in cfg["data"]:
        raise ConfigError("the pretrain config needs data.train (e.g. {source: shapes, n: 4000})")
    check_keys(cfg["data"], {"train", "replay"}, "section 'data'")
    train_cfg = TrainConfig.from_dict({**(cfg.get("train") or {}), "progress": progress})
    distributed.init_distributed(timeout_s=train_cfg.dist_timeout_s)
    try:
        spec = cfg["data"]["train"]
        if isinstance(spec, dict) and spec.get("stream"):
            if spec.get("source") != "shards":
                raise ConfigError("data.train.stream streams WebDataset shards: use "
                                  "{source: shards, path: DIR, stream: true}")
            pairs = StreamBatches.from_spec(spec, train_cfg.batch_size, train_cfg.seed)
        else:
            pairs = as_pairs(load_source(spec))
        replay, replay_ratio = _replay(cfg["data"].get("replay"))
        eval_sets = _eval_sets(cfg.get("eval") or [])
        model = model_from_config(cfg.get("model") or {})
        # the run folder is made only once the inputs are known to be good; its default name
        # holds a timestamp, so every rank takes rank 0's
        out = cfg.get("out") or distributed.broadcast_from_rank0(default_run_dir("pretrain"))
        run = RunDir(out)
        cfg = {**cfg, "out": str(run.path)}
        if distributed.rank() == 0:
            run.write_config(cfg)
        trainer = Trainer(model, train_cfg, run)
        evals: dict = {}

        def evaluate(m) -> dict:
            evals.update(zeroshot_evals(m, eval_sets, progress=False))
            return {f"eval/{name}/{k}": v for name, res in evals.items() for k, v in res.items()}

        last = trainer.fit(pairs, resume=resume, replay=replay, replay_ratio=replay_ratio,
                           evaluate=evaluate if eval_sets else None)
        skipped = pairs.skipped
        if isinstance(pairs, StreamBatches):
            # each rank skipped what its own shards held, once per epoch that read them
            skipped, seen = SkipReport(), set()
            for report in distributed.gather_objects(pairs.skipped.to_dict()):
                for reason, keys in report["keys"].items():
                    for key in keys:
                        if (reason, key) not in seen:
                            seen.add((reason, key))
                            skipped.add(reason, key)
    finally:
        distributed.shutdown()
    results: dict = {"train": last, "skipped": skipped.to_dict(), "evals": evals,
                     "model_dir": str(trainer.last_checkpoint / "model"),
                     "wall_time_s": round(time.time() - start, 1)}
    if trainer.rank == 0:
        run.write_json("results.json", results)
    return results


def _replay(spec: dict | None) -> tuple[ImageTextPairs | None, float]:
    """``data.replay: {ratio: 0.2, <source spec>}`` → (old pairs, fraction of each batch)."""
    if not spec:
        return None, 0.0
    if not isinstance(spec, dict) or "ratio" not in spec:
        raise ConfigError("data.replay needs 'ratio' (fraction of each batch, e.g. 0.2) and a "
                          "source spec, e.g. {ratio: 0.2, source: shapes, n: 4000}")
    spec = dict(spec)
    try:
        ratio = float(spec.pop("ratio"))
    except (TypeError, ValueError):
        raise ConfigError("data.replay.ratio must be a number in [0, 1)") from None
    return as_pairs(load_source(spec)), ratio


def _eval_sets(tasks: list) -> dict[str, LabelledImages]:
    """The labelled sets of the recipe's zero-shot eval tasks, loaded once."""
    sets = {}
    for i, task in enumerate(tasks):
        task = dict(task)
        name = task.pop("name", f"eval{i}")
        sets[name] = as_labelled(load_source(task), f"eval task {name!r}")
    return sets


def zeroshot_evals(model, sets: dict[str, LabelledImages], progress: bool = True) -> dict:
    """Zero-shot metrics of ``model`` on each named labelled set."""
    out = {}
    for name, data in sets.items():
        feats = encode_images(model, data.images, progress=progress, desc=f"encode {name}")
        classifier = zeroshot_classifier(model, data.prompt_names, data.templates)
        out[name] = zeroshot_metrics(feats.embeddings, data.labels, classifier)
    return out
