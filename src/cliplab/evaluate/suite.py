"""`cliplab eval`: run a suite of tasks (zero-shot, linear probe, few-shot, retrieval,
compositional) on one model, all reading image and text features from one cache.

Before the tasks run, the suite plans which probe features (``tokens`` / ``layers``) each
dataset will need, so the first task that touches a dataset encodes everything every later task
reads from it in one pass over the images.
"""

from __future__ import annotations

import json

from cliplab.config import check_keys
from cliplab.data.pairs import class_indices
from cliplab.data.sources import as_labelled, as_pairs, load_source
from cliplab.errors import ConfigError
from cliplab.data.shapes import load_shapes_with_scenes
from cliplab.evaluate.compositional import compositional
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.features import EXTRA_PROBES, PROBE_FEATURES
from cliplab.evaluate.few_shot import METHODS, few_shot
from cliplab.evaluate.linear_probe import linear_probe
from cliplab.evaluate import long_tail, multilabel
from cliplab.evaluate.precision import PRECISIONS
from cliplab.evaluate.retrieval import retrieval
from cliplab.evaluate.zeroshot import zeroshot_classifier, zeroshot_metrics
from cliplab.models.dual_encoder import DualEncoder

TASK_KEYS = {"zeroshot": {"name", "task", "data", "classes"},
             "linear_probe": {"name", "task", "train", "test", "l2", "features", "layers"},
             "retrieval": {"name", "task", "data", "ks"},
             "compositional": {"name", "task", "data", "seed"},
             "few_shot": {"name", "task", "train", "test", "shots", "seeds", "methods", "l2",
                          "features", "layers"},
             "multilabel_zeroshot": multilabel.TASK_KEYS,
             "long_tail": long_tail.TASK_KEYS}
# tasks whose runner lives in its own module:
# (model, task, name, cache, progress, precision) -> metrics
TASK_RUNNERS = {"multilabel_zeroshot": multilabel.run_multilabel_task,
                "long_tail": long_tail.run_long_tail_task}


ProbePlan = dict[str, tuple[str, int]]


def _data_key(spec) -> str:
    return json.dumps(spec, sort_keys=True, default=str)


def plan_probes(tasks: list) -> ProbePlan:
    """``{data spec: (probe kind, layers)}`` for every dataset a probe task reads with extra
    features (the first task's choice wins where two ask for different ones)."""
    plan: ProbePlan = {}
    for task in tasks:
        if not isinstance(task, dict) or task.get("task") not in ("linear_probe", "few_shot"):
            continue
        which = task.get("features", "tokens" if task["task"] == "linear_probe" else "embeddings")
        if which in EXTRA_PROBES:
            for part in ("train", "test"):
                if isinstance(task.get(part), dict):
                    plan.setdefault(_data_key(task[part]), (which, int(task.get("layers", 4))))
    return plan


def _labelled(spec, where: str):
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a data spec such as {{source: digits, split: test}}")
    return as_labelled(load_source(spec), where)


def run_task(model: DualEncoder, task: dict, progress: bool = True,
             cache: FeatureCache | None = None, precision: str = "fp32",
             probe_plan: ProbePlan | None = None) -> dict:
    """Run one task spec and return its metrics; image and text features come from ``cache``
    (``probe_plan``: the extra features to compute when a dataset is first encoded)."""
    cache = cache or FeatureCache()
    plan = dict(probe_plan or {})

    def image_features(images, spec, desc):
        probe, layers = plan.get(_data_key(spec), (None, 4))
        return cache.features(model, images, probe, layers, progress, desc, precision)

    kind = task.get("task")
    if kind not in TASK_KEYS:
        raise ConfigError(f"unknown task {kind!r}; choose one of: {', '.join(TASK_KEYS)}")
    name = task.get("name", kind)
    check_keys(task, TASK_KEYS[kind], f"task {name!r}")
    if kind in TASK_RUNNERS:
        return TASK_RUNNERS[kind](model, task, name, cache, progress, precision)
    if kind == "retrieval":
        spec = task.get("data")
        if not isinstance(spec, dict):
            raise ConfigError(f"task {name!r} needs data: a pair source such as "
                              "{source: shapes, n: 500}")
        pairs = as_pairs(load_source(spec))
        feats = image_features(pairs.images, spec, f"encode {name}")
        return retrieval(model, pairs, ks=tuple(task.get("ks", (1, 5, 10))), progress=progress,
                         image_features=feats, text_cache=cache.texts, precision=precision)
    if kind == "compositional":
        spec = dict(task.get("data") or {"source": "shapes"})
        if spec.pop("source", None) != "shapes":
            raise ConfigError(f"task {name!r}: compositional negatives are exact only on "
                              "`shapes`; use data: {source: shapes, n: 500}")
        spec.setdefault("kinds", ["relation"])
        try:
            pairs, scenes = load_shapes_with_scenes(**spec)
        except TypeError as err:
            raise ConfigError(f"task {name!r}: bad shapes option: {err}") from None
        feats = cache.features(model, pairs.images, progress=progress, desc=f"encode {name}",
                               precision=precision)
        try:
            return compositional(model, pairs.images, scenes, seed=int(task.get("seed", 0)),
                                 image_emb=feats.embeddings)
        except ValueError as err:
            raise ConfigError(f"task {name!r}: {err}") from None
    if kind == "zeroshot":
        data = _labelled(task.get("data"), f"task {name!r} data")
        feats = image_features(data.images, task.get("data"), f"encode {name}")
        classifier = zeroshot_classifier(model, data.prompt_names, data.templates, cache.texts,
                                         precision)
        classes = task.get("classes")
        if classes is not None:  # names (any case) or indices
            names = [c for c in classes if isinstance(c, str)]
            index = dict(zip(names, class_indices(data.classnames, names)))
            classes = [index[c] if isinstance(c, str) else int(c) for c in classes]
        return zeroshot_metrics(feats.embeddings, data.labels, classifier, classes)
    train = _labelled(task.get("train"), f"task {name!r} train")
    test = _labelled(task.get("test"), f"task {name!r} test")
    which = task.get("features", "tokens" if kind == "linear_probe" else "embeddings")
    if which not in PROBE_FEATURES:
        raise ConfigError(f"task {name!r}: features must be one of {PROBE_FEATURES}")
    if which in EXTRA_PROBES:
        own = (which, int(task.get("layers", 4)))
        plan.update({_data_key(task["train"]): own, _data_key(task["test"]): own})
    tr = image_features(train.images, task["train"], f"encode {name} train").get(which)
    te = image_features(test.images, task["test"], f"encode {name} test").get(which)
    if kind == "few_shot":
        try:
            return few_shot(tr, train.labels, te, test.labels,
                            shots=tuple(task.get("shots", (1, 2, 4, 8, 16))),
                            seeds=tuple(task.get("seeds", (0, 1, 2))),
                            methods=tuple(task.get("methods", METHODS)),
                            l2=float(task.get("l2", 1e-3)))
        except ValueError as err:
            raise ConfigError(f"task {name!r}: {err}") from None
    return linear_probe(tr, train.labels, te, test.labels, l2=task.get("l2"))


def run_suite(model: DualEncoder, suite: dict, progress: bool = True,
              cache: FeatureCache | None = None) -> dict:
    """``{tasks: [...], precision: fp32|bf16}`` → ``{task_name: metrics}``; every task shares
    one feature cache, so a dataset is encoded once however many tasks read it, and a text
    (prompt or caption) once however many tasks and images use it."""
    cache = cache or FeatureCache()
    check_keys(suite, {"tasks", "precision"}, "the eval suite")
    tasks = suite.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError("the eval suite needs a non-empty list 'tasks'")
    precision = suite.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ConfigError(f"the eval suite's precision must be one of {sorted(PRECISIONS)}, "
                          f"not {precision!r}")
    plan = plan_probes(tasks)
    results = {}
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise ConfigError(f"task #{i + 1} of the suite must be a mapping")
        name = task.get("name", f"{task.get('task')}-{i}")
        results[name] = run_task(model, task, progress, cache, precision, plan)
    return results
