"""`cliplab pretrain`: contrastive pretraining from a YAML recipe, with optional zero-shot
evaluation of the result."""

from __future__ import annotations

import time

from cliplab.config import check_keys
from cliplab.data.sources import as_labelled, as_pairs, load_source
from cliplab.errors import ConfigError
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.zeroshot import zeroshot_classifier, zeroshot_metrics
from cliplab.models.presets import build_model
from cliplab.train.run_dir import RunDir, default_run_dir
from cliplab.train.trainer import TrainConfig, Trainer

TOP_KEYS = {"model", "data", "train", "eval", "out"}


def model_from_config(spec: dict):
    """``{preset: NAME, options: {...}}`` or ``{path: FOLDER}``."""
    if not isinstance(spec, dict):
        raise ConfigError("config key 'model' must be a mapping with 'preset' or 'path'")
    check_keys(spec, {"preset", "options", "path"}, "section 'model'")
    if "path" in spec:
        return build_model(str(spec["path"]))
    if "preset" not in spec:
        raise ConfigError("section 'model' needs 'preset' (e.g. tiny-clip) or 'path'")
    return build_model(spec["preset"], **(spec.get("options") or {}))


def run_pretrain(cfg: dict, resume: str | None = None, progress: bool = True) -> dict:
    """Train the configured model on ``data.train``; evaluate ``eval`` tasks; write the run."""
    start = time.time()
    check_keys(cfg, TOP_KEYS, "the pretrain config")
    if not isinstance(cfg.get("data"), dict) or "train" not in cfg["data"]:
        raise ConfigError("the pretrain config needs data.train (e.g. {source: shapes, n: 4000})")
    train_cfg = TrainConfig.from_dict({**(cfg.get("train") or {}), "progress": progress})
    pairs = as_pairs(load_source(cfg["data"]["train"]))
    model = model_from_config(cfg.get("model") or {})
    # the run folder is made only once the inputs are known to be good
    run = RunDir(cfg.get("out") or default_run_dir("pretrain"))
    cfg = {**cfg, "out": str(run.path)}
    run.write_config(cfg)
    trainer = Trainer(model, train_cfg, run)
    last = trainer.fit(pairs, resume=resume)

    results: dict = {"train": last, "skipped": pairs.skipped.to_dict(), "evals": {}}
    for i, task in enumerate(cfg.get("eval") or []):
        task = dict(task)
        name = task.pop("name", f"eval{i}")
        data = as_labelled(load_source(task), f"eval task {name!r}")
        feats = encode_images(model, data.images, progress=progress, desc=f"encode {name}")
        classifier = zeroshot_classifier(model, data.prompt_names, data.templates)
        results["evals"][name] = zeroshot_metrics(feats.embeddings, data.labels, classifier)
    results["model_dir"] = str(trainer.last_checkpoint / "model")
    results["wall_time_s"] = round(time.time() - start, 1)
    run.write_json("results.json", results)
    return results
