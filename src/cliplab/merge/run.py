"""`cliplab merge`: read model folders, check they share architecture and pretrained origin,
merge them with one method, write a normal model folder plus ``merge.json``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from cliplab.config import check_keys
from cliplab.errors import ConfigError, ModelError
from cliplab.evaluate.suite import run_task, task_spec
from cliplab.evaluate.tasks import TaskContext
from cliplab.merge.checkpoints import (Ingredient, check_architecture, check_origin,
                                       load_ingredient, save_merged)
from cliplab.merge.model_stock import model_stock
from cliplab.merge.soup import greedy_soup, uniform_soup
from cliplab.merge.state import StateDict
from cliplab.merge.task_arithmetic import apply_task_vector, combine_task_vectors, task_vector
from cliplab.merge.ties import ties_merge
from cliplab.models.dual_encoder import DualEncoder

METHODS = ("uniform", "greedy", "model-stock", "task-arithmetic", "ties")
NEEDS_BASE = ("model-stock", "task-arithmetic", "ties")
KEYS = {"method", "models", "base", "out", "weights", "scale", "density", "heldout", "metric",
        "require_origin"}
DEFAULTS = {"weights": None, "scale": 1.0, "density": 0.2, "heldout": None, "metric": "acc1",
            "require_origin": False}


def merge_config(cfg: dict) -> dict:
    """The merge settings with defaults, validated before any model is read."""
    check_keys(cfg, KEYS, "the merge config")
    cfg = {**DEFAULTS, **cfg}
    if cfg.get("method") not in METHODS:
        raise ConfigError(f"merge method {cfg.get('method')!r} is not one of {', '.join(METHODS)}")
    models = cfg.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError("merge needs the model folders to merge: --models A B ...")
    if cfg["method"] in NEEDS_BASE and not cfg.get("base"):
        raise ConfigError(f"merge method {cfg['method']!r} needs the pretrained model: --base P")
    if cfg["method"] == "model-stock" and len(models) < 2:
        raise ConfigError("model-stock needs at least 2 fine-tuned models")
    if cfg["method"] == "greedy" and not isinstance(cfg.get("heldout"), dict):
        raise ConfigError("greedy soup needs held-out data to score with: set 'heldout' to an "
                          "eval task, e.g. {task: zeroshot, data: {source: digits, split: test}}")
    if not cfg.get("out"):
        raise ConfigError("merge needs an output folder: --out DIR")
    out = Path(cfg["out"]).resolve()
    inputs = [Path(p).resolve() for p in models + ([cfg["base"]] if cfg.get("base") else [])]
    if out in inputs or (out.exists() and any(out.iterdir())):
        raise ConfigError(f"output folder {cfg['out']} exists and is not empty (or is an input); "
                          "give a new folder")
    if not isinstance(cfg["density"], (int, float)) or not 0 < cfg["density"] <= 1:
        raise ConfigError(f"merge density (TIES: fraction of entries kept) must be a number in "
                          f"(0, 1], not {cfg['density']!r}")
    scale = cfg["scale"]
    if not (isinstance(scale, (int, float)) or (isinstance(scale, list) and all(
            isinstance(s, (int, float)) for s in scale))):
        raise ConfigError(f"merge scale must be a number or a list of numbers, not {scale!r}")
    if isinstance(scale, list) and (cfg["method"] != "task-arithmetic"
                                    or len(scale) != len(models)):
        raise ConfigError(f"a list of scales is for task-arithmetic, one per model "
                          f"({len(models)}), got {scale}")
    return cfg


def heldout_evaluator(template: DualEncoder, task: dict, metric: str,
                      progress: bool = False) -> Callable[[StateDict], float]:
    """A function scoring weights on the held-out eval ``task`` (an eval-suite task spec) by
    ``metric``, with the weights loaded into ``template``."""
    spec, context = task_spec(task, "heldout"), TaskContext(progress=progress)

    def evaluate(state: StateDict) -> float:
        template.model.load_state_dict(state, strict=True)
        metrics = run_task(template, spec, context.for_new_weights())
        if metric not in metrics:
            raise ConfigError(f"held-out task gives {sorted(metrics)}, not metric {metric!r}")
        return float(metrics[metric])
    return evaluate


def run_merge(cfg: dict, progress: bool = True) -> dict:
    """Merge as ``cfg`` says (see `merge_config`); returns the ``merge.json`` record."""
    start = time.time()
    cfg = merge_config(cfg)
    method, paths = cfg["method"], [str(p) for p in cfg["models"]]
    bar = tqdm(paths + ([cfg["base"]] if cfg.get("base") else []), desc="load models",
               disable=not progress, leave=False)
    loaded = [load_ingredient(p) for p in bar]
    models, base = loaded[:len(paths)], (loaded[-1] if cfg.get("base") else None)
    check_architecture(loaded)
    origin = check_origin(models, base)
    if cfg["require_origin"] and origin["unrecorded"]:
        raise ModelError(f"{origin['unrecorded'][0]} records no pretrained origin ('base' in "
                         "cliplab.json) and require_origin is set")
    states, names = [m.state for m in models], [m.name for m in models]

    evaluate = None
    if cfg["heldout"]:
        evaluate = heldout_evaluator(DualEncoder.load(paths[0]), cfg["heldout"], cfg["metric"])
    record: dict = {"method": method, "models": paths, "base": cfg.get("base"),
                    "origin": origin, "heldout": None}
    scores: dict[str, float] = {}
    if evaluate is not None:
        for m in tqdm(loaded, desc="score models", disable=not progress, leave=False):
            scores[m.name] = evaluate(m.state)

    merged = _merge(method, cfg, states, names, base, scores, evaluate, record, progress)
    if evaluate is not None:
        merged_score = record.get("greedy", {}).get("score")
        record["heldout"] = {"task": cfg["heldout"], "metric": cfg["metric"], "scores": scores,
                             "merged": merged_score if merged_score is not None
                             else evaluate(merged)}
    record["wall_time_s"] = round(time.time() - start, 1)
    save_merged(paths[0], merged, cfg["out"], origin, record)
    record["out"] = str(cfg["out"])
    return record


def _merge(method: str, cfg: dict, states: list, names: list[str], base: Ingredient | None,
           scores: dict, evaluate, record: dict, progress: bool) -> dict:
    """Dispatch to one method; method-specific settings and results go into ``record``."""
    if method == "uniform":
        record["weights"] = cfg["weights"]
        return uniform_soup(states, cfg["weights"], names)
    if method == "greedy":
        soup = greedy_soup(states, evaluate, names, [scores[n] for n in names], progress)
        record["greedy"] = {"kept": [names[i] for i in soup.kept], "score": soup.score,
                            "steps": soup.steps}
        return soup.state
    if method == "model-stock":
        merged, ratios = model_stock(base.state, states, names)
        values = list(ratios.values())
        record["model_stock"] = {"mean_ratio": sum(values) / len(values),
                                 "min_ratio": min(values), "max_ratio": max(values),
                                 "ratios": ratios}
        return merged
    if method == "task-arithmetic":
        record["scale"] = cfg["scale"]
        vectors = [task_vector(s, base.state) for s in states]
        return apply_task_vector(base.state, combine_task_vectors(vectors, cfg["scale"]))
    record.update(scale=cfg["scale"], density=cfg["density"])
    return ties_merge(base.state, states, float(cfg["density"]), float(cfg["scale"]), names)
