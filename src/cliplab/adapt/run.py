"""`cliplab adapt`: pick k shots per class, fit one method, score it on the test set, write the
adapter and ``results.json``."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import torch

from cliplab.adapt import METHODS, WEIGHT_METHODS, AdaptContext, get_method
from cliplab.adapt.base import method_options
from cliplab.config import check_keys
from cliplab.data.sources import as_labelled, load_source
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError, DataError
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.few_shot import sample_k_shot
from cliplab.evaluate.metrics import classification_metrics
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.resolve import load_model
from cliplab.runs import RunDir, default_run_dir

DEFAULTS = {"method": None, "model": None, "train": None, "test": None, "shots": 16, "seed": 1,
            "val_shots": 0, "options": {}, "compare_zeroshot": True, "cache_dir": None,
            "out": None}


def adapt_config(cfg: dict) -> dict:
    """The defaults updated with ``cfg``, checked: unknown keys, method, data specs.

    The data sets go under ``data: {train, test}`` as in every other stage's config (or, as
    before, at the top level)."""
    check_keys(cfg, set(DEFAULTS) | {"data"}, "the adapt config")
    if "data" in cfg:
        data = cfg["data"]
        if not isinstance(data, dict):
            raise ConfigError("adapt config 'data' must be a mapping {train: ..., test: ...}")
        check_keys(data, {"train", "test"}, "section 'data'")
        both = sorted(k for k in data if cfg.get(k))
        if both:
            raise ConfigError(f"adapt config gives {both} both under 'data' and at the top "
                              "level; keep one")
        cfg = {**{k: v for k, v in cfg.items() if k != "data"}, **data}
    out = {**DEFAULTS, **cfg}
    if not out["method"]:
        raise ConfigError(f"the adapt config needs 'method' (or --method): one of "
                          f"{', '.join(METHODS)}")
    method = get_method(out["method"])  # one-line error naming the choices
    for key in ("model", "train", "test"):
        if not out[key]:
            raise ConfigError(f"the adapt config needs {key!r}"
                              + (" (or --model)" if key == "model" else
                                 ": a labelled data spec such as {source: digits, split: train}"))
    for key in ("shots", "seed", "val_shots"):
        value = out[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value < 0 or int(value) != value):
            raise ConfigError(f"adapt config {key!r} must be a whole number >= 0, not {value!r}")
    if out["options"] is not None and not isinstance(out["options"], dict):
        raise ConfigError("adapt config 'options' must be a mapping of method options")
    method_options(method.OPTIONS, out["options"], out["method"])  # fail before any work
    return out


def few_shot_split(train: LabelledImages, shots: int | None, val_shots: int, seed: int
                   ) -> tuple[LabelledImages, LabelledImages | None]:
    """``shots`` samples per class (all with 0/None) and, disjoint from them, ``val_shots`` per
    class for validation (None with 0)."""
    idx = sample_k_shot(train.labels, int(shots), seed) if shots else torch.arange(len(train))
    val = None
    if val_shots:
        rest = torch.ones(len(train), dtype=torch.bool)
        rest[idx] = False
        pool = rest.nonzero().flatten()
        if len(pool) == 0:
            raise DataError("no training samples are left for the validation split; "
                            "lower shots or set val_shots=0")
        val = train.subset(pool[sample_k_shot(train.labels[pool], int(val_shots), seed + 1)])
    return train.subset(idx), val


def evaluate_adapter(adapter, test: LabelledImages, cache: FeatureCache,
                     progress: bool = True) -> dict:
    """acc1 / acc5 / mean per-class recall of ``adapter`` on ``test``."""
    feats = cache.features(adapter.model, test.images, probe=adapter.probe, progress=progress,
                           desc="encode test")
    return classification_metrics(adapter.logits(feats), test.labels)


def run_adapt(cfg: dict, model: DualEncoder | None = None, progress: bool = True,
              cache: FeatureCache | None = None, write: bool = True) -> dict:
    """Fit ``cfg['method']`` on the k-shot training set and score it on the test set. With
    ``write`` the adapter, ``config.yaml`` and ``results.json`` go to ``cfg['out']``."""
    start = time.time()
    cfg = adapt_config(cfg)
    method = get_method(cfg["method"])
    train_all = as_labelled(load_source(cfg["train"]), "adapt train")
    test = as_labelled(load_source(cfg["test"]), "adapt test")
    if list(test.classnames) != list(train_all.classnames):
        raise DataError(f"train and test sets name different classes ({train_all.name}: "
                        f"{len(train_all.classnames)}, {test.name}: {len(test.classnames)})")
    seed = int(cfg["seed"])
    train, val = few_shot_split(train_all, cfg["shots"], int(cfg["val_shots"] or 0), seed)
    model = model or load_model(cfg["model"])
    cache = cache or FeatureCache(cfg["cache_dir"])
    run = None
    if write:
        run = RunDir(cfg["out"] or default_run_dir(f"adapt-{cfg['method']}"))
        cfg["out"] = str(run.path)
        run.write_config(cfg)

    torch.manual_seed(seed)
    ctx = AdaptContext(cache=cache, val=val, seed=seed, progress=progress)
    adapter = method.fit(model, train, cfg["options"], ctx)
    results = {"method": cfg["method"], "model": str(cfg["model"]), "shots": cfg["shots"],
               "seed": seed, "train_size": len(train), "val_size": len(val) if val else 0,
               "test_size": len(test), "options": adapter.options,
               "test": evaluate_adapter(adapter, test, cache, progress)}
    if cfg["compare_zeroshot"] and cfg["method"] != "zeroshot":
        zs = METHODS["zeroshot"].fit(model, train, {}, ctx)
        results["zeroshot"] = evaluate_adapter(zs, test, cache, progress)
    results["wall_time_s"] = round(time.time() - start, 1)
    if run is not None:
        adapter.save(run.path, extra={"model": str(cfg["model"]), "shots": cfg["shots"],
                                      "seed": seed})
        run.write_json("results.json", results)
        results["out"] = str(run.path)
    results["adapter"] = adapter
    return results


def run_weight_method(cfg: dict, progress: bool = True) -> dict:
    """Run a method of ``WEIGHT_METHODS`` (lora, finetune, wise-ft): ``cfg['model']`` is the
    base model folder, ``cfg['out']`` the run folder (default ``runs/adapt-<method>-<time>``);
    the rest is the method's config (``data``, ``train``, its own section)."""
    cfg = dict(cfg)
    name, model, out = cfg.get("method"), cfg.pop("model", None), cfg.pop("out", None)
    if cfg.pop("cache_dir", None):
        raise ConfigError(f"adapt --method {name} trains the towers: there are no fixed "
                          "features to cache; drop --cache-dir")
    if not model:
        raise ConfigError(f"adapt --method {name} needs --model (a model folder)")
    out = Path(out or default_run_dir(f"adapt-{name}"))
    results = importlib.import_module(WEIGHT_METHODS[name]).run(str(model), cfg, out, progress)
    return {**results, "out": str(out)}


def format_results(results: dict) -> str:
    """One line per scored head: method, acc1, acc5."""
    if results["method"] in WEIGHT_METHODS:
        return _format_weight_results(results)
    rows = [(results["method"], results["test"])]
    if "zeroshot" in results:
        rows.append(("zeroshot (hand-written prompts)", results["zeroshot"]))
    shots = results["shots"] or "all"
    lines = [f"{results['train_size']} training images ({shots} per class, seed "
             f"{results['seed']}), {results['test_size']} test images"]
    lines += [f"  {name:<32} acc1 {m['acc1']:6.1%}  acc5 {m['acc5']:6.1%}" for name, m in rows]
    return "\n".join(lines)


def _format_weight_results(results: dict) -> str:
    """acc1 of each scored model (zero-shot, fine-tuned, LoRA) or of the WiSE-FT sweep."""
    lines = [f"  {name:<12} acc1 {m['acc1']:6.1%}" for name, m in results.items()
             if isinstance(m, dict) and "acc1" in m]
    for row in results.get("sweep", []):
        lines.append("  alpha " + f"{row['alpha']:<6g}" + "  ".join(
            f"{k} acc1 {v['acc1']:6.1%}" for k, v in row.items() if isinstance(v, dict)))
    if "best_alpha" in results:
        lines.append(f"  best alpha {results['best_alpha']:g}")
    if "params" in results:
        lines.append(f"  trainable parameters {results['params']['trainable']:,}")
    return "\n".join(lines)
