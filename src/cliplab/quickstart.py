"""`cliplab quickstart`: LiT pretraining on Fashion-MNIST with three classes never seen in
training, then zero-shot transfer to them and a linear probe — a small real pipeline, end to end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from cliplab.config import OutFolder, Section, deep_merge, refuse_unused, validate
from cliplab.data.fashion_mnist import (CLASSNAMES, PROMPT_NAMES, canonical_name, default_dir,
                                        load_fashion_mnist)
from cliplab.data.pairs import class_indices, labelled_to_pairs, split_classes
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError
from cliplab.evaluate.suite import SuiteSpec, run_suite, suite_spec
from cliplab.evaluate.tasks import TaskContext
from cliplab.evaluate.tasks.base import ProbeKind
from cliplab.models.precision import resolve_precision
from cliplab.models.resolve import load_model
from cliplab.models.spec import ModelField
from cliplab.provenance import stamp
from cliplab.runs import RunDir, check_run_out, default_run_dir, removed_if_unstarted
from cliplab.train.config import train_over_defaults
from cliplab.train.trainer import TrainConfig, Trainer

DEFAULT_MODEL = {"name": "lit-minilm",
                 "options": {"image_size": 28, "patch_size": 7, "width": 192, "layers": 4,
                             "heads": 3}}
# 1360 steps = 5 epochs of the 34 893 seen-class pairs that validation mode trains on (272 full
# batches of 128 an epoch): the length the recipe was chosen at (5 epochs of the full 42 000
# would train 20% longer)
DEFAULT_TRAIN = {"steps": 1360, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.05,
                 "warmup": 0.05, "lock_text": True, "augment": False,
                 "multi_positive": True, "precision": "auto",
                 "lr_scale": {"text_projection": 0.1}}


class QuickstartData(Section):
    """Fashion-MNIST: where the IDX files are, which classes training never sees, limits."""

    data_dir: str | None = None
    # at least two: the zero-shot transfer is measured among them (one alone scores 1.0 whatever
    # the model), and at most 8: two at least are learnt
    heldout: list[str] = Field(["Shirt", "Sneaker", "Bag"])
    train_limit: int | None = Field(None, gt=0)
    test_limit: int | None = Field(None, gt=0)
    descriptions: bool = True
    # the last N training images become the evaluation set and the test split is not read:
    # for choosing a recipe without looking at the numbers it reports
    validation: int | None = Field(None, gt=0)

    @field_validator("heldout")
    @classmethod
    def _distinct_classes_one_left(cls, names: list[str]) -> list[str]:
        """Fashion-MNIST classes (official or prompt names, any case), each once, not all."""
        given: dict[str, str] = {}
        for name in names:
            prompt = canonical_name(name)
            if prompt not in PROMPT_NAMES:
                raise ValueError(f"unknown class {name!r}; classes are: {', '.join(CLASSNAMES)}")
            if prompt in given:
                raise ValueError(f"{given[prompt]!r} and {name!r} are the same class ({prompt}); "
                                 "give each class once")
            given[prompt] = name
        if len(given) < 2:
            raise ValueError(f"holds {len(given)} class{'es' * (len(given) != 1)}: the zero-shot "
                             "transfer is scored among the held-out classes, and one alone "
                             "scores 1.0 whatever the model; hold out two at least")
        if len(given) > len(PROMPT_NAMES) - 2:
            raise ValueError(f"holds {len(given)} of the {len(PROMPT_NAMES)} classes, leaving "
                             f"fewer than two to train on; hold out at most "
                             f"{len(PROMPT_NAMES) - 2}")
        return names

    @model_validator(mode="after")
    def _test_limit_only_with_the_test_split(self) -> QuickstartData:
        if self.validation is not None:
            refuse_unused(self, ["test_limit"], "with validation (the test split is not read)")
        return self


class QuickstartEval(Section):
    """The linear probe of the report (zero-shot needs no settings)."""

    probe_train_size: int = Field(30000, gt=0)  # at most: all training images when fewer
    probe_l2: float | None = Field(0.003, gt=0)  # null: chosen on a validation split
    probe_features: ProbeKind = "tokens"
    probe_layers: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _layers_only_for_layers(self) -> QuickstartEval:
        if self.probe_features != "layers":
            refuse_unused(self, ["probe_layers"], "unless probe_features is layers")
        return self


class QuickstartConfig(Section):
    """`cliplab quickstart`'s config (configs/quickstart.yaml holds these defaults). A
    ``model`` mapping without ``name`` and the ``train`` mapping update the defaults."""

    model: ModelField = DEFAULT_MODEL
    data: QuickstartData = QuickstartData()
    train: TrainConfig = TrainConfig(**DEFAULT_TRAIN)
    eval: QuickstartEval = QuickstartEval()
    out: OutFolder | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _model_over_default(cls, value: Any) -> Any:
        if isinstance(value, dict) and "name" not in value:
            return deep_merge(DEFAULT_MODEL, value)
        return value

    @field_validator("train", mode="before")
    @classmethod
    def _train_over_default(cls, value: Any) -> Any:
        return train_over_defaults(DEFAULT_TRAIN, value) if isinstance(value, dict) else value




def quickstart_config(user: QuickstartConfig | dict | None = None,
                      where: str = "the quickstart config") -> QuickstartConfig:
    """The defaults updated with ``user``; unknown keys and wrong types name the key path."""
    if isinstance(user, QuickstartConfig):
        return user
    return validate(QuickstartConfig, user or {}, where)


def run_quickstart(config: QuickstartConfig | dict | None = None, progress: bool = True) -> dict:
    """Pretrain, evaluate and write the run folder; returns the results dict."""
    start = time.monotonic()
    cfg = quickstart_config(config)
    data = cfg.data
    if cfg.out:  # before any slow loading
        check_run_out(cfg.out, [data.data_dir or str(default_dir())])
    train_all, test = load_splits(data)
    held_names = [canonical_name(n) for n in data.heldout]
    heldout = class_indices(train_all.classnames, held_names)  # names checked by the config
    seen_train, _ = split_classes(train_all, held_names)
    suite = transfer_suite(train_all, test, heldout, cfg.eval)  # its errors before training

    # the run folder is made only once the inputs are known to be good
    out = cfg.out or default_run_dir("quickstart")
    existed = Path(out).exists()
    run = RunDir(out)
    cfg = cfg.model_copy(update={"out": str(run.path)})
    run.write_config(cfg.to_dict())

    # refused before its first step (a batch larger than the data, ...): no folder is left
    with removed_if_unstarted(run.path, existed):
        model = load_model(cfg.model)
        TaskContext(progress=False).preload(suite.tasks, "the quickstart's eval: tasks",
                                            model=model)  # e.g. probe_layers > its blocks
        train_cfg = cfg.train.model_copy(update={"progress": progress})
        trainer = Trainer(model, train_cfg, run)
        started_training = time.monotonic()
        trainer.fit(labelled_to_pairs(seen_train))
        trained = time.monotonic()
    final = trainer.last_checkpoint / "model"

    results = evaluate_transfer(model, train_all, test, heldout, cfg.eval, progress, suite)
    # where the time went (README quotes it): set-up and data, training, evaluation
    end = time.monotonic()  # one reading: the parts add up to the whole
    seconds = {"setup": started_training - start, "train": trained - started_training,
               "evaluate": end - trained}
    results.update({"evaluated_on": "test" if data.validation is None
                    else f"validation (the last {data.validation} training images)",
                    "heldout_classes": [train_all.classnames[i] for i in heldout],
                    "train_pairs": len(seen_train), "steps": trainer.step,
                    # training's precision; the scores beside it ran in the suite's
                    "model_dir": str(Path(final).resolve()), "precision": trainer.precision,
                    "eval_precision": resolve_precision(suite.precision, model.device),
                    "train_images_per_s": round(trainer.step * train_cfg.batch_size
                                                / seconds["train"], 1),
                    "seconds": {k: round(v, 1) for k, v in seconds.items()},
                    "wall_time_s": round(end - start, 1)})
    run.write_json("results.json", stamp(results))
    return results


def load_splits(data: QuickstartData) -> tuple[LabelledImages, LabelledImages]:
    """(training images, evaluation images): the train and test splits, or with
    ``validation: N`` the first and the last N images of the train split."""
    train_all = load_fashion_mnist("train", data.data_dir, data.train_limit, data.descriptions)
    if data.validation is None:
        return train_all, load_fashion_mnist("test", data.data_dir, data.test_limit,
                                             data.descriptions)
    n = len(train_all)
    if data.validation >= n:
        raise ConfigError(f"data.validation: {data.validation} is not below the {n} training "
                          "images")
    cut = n - data.validation
    return train_all.subset(torch.arange(cut)), train_all.subset(torch.arange(cut, n))


def transfer_suite(train_all: LabelledImages, test: LabelledImages, heldout: list[int],
                   settings: QuickstartEval) -> SuiteSpec:
    """The report's tasks: zero-shot on all classes (with per-class accuracy) and on the
    held-out ones, and a linear probe on a seeded random subset of the training images."""
    n_probe = min(settings.probe_train_size, len(train_all))
    pick = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(0))[:n_probe]
    return suite_spec([
        {"name": "zeroshot_all", "task": "zeroshot", "data": test, "per_class": True},
        {"name": "zeroshot_heldout", "task": "zeroshot", "data": test, "classes": heldout},
        {"name": "linear_probe", "task": "linear_probe", "train": train_all.subset(pick),
         "test": test, "l2": settings.probe_l2, "features": settings.probe_features,
         "layers": settings.probe_layers}], "the quickstart's eval")


def evaluate_transfer(model, train_all: LabelledImages, test: LabelledImages,
                      heldout: list[int], settings: QuickstartEval | dict | None = None,
                      progress: bool = True, suite: SuiteSpec | None = None) -> dict:
    """Zero-shot over all classes and over the held-out ones, and a linear probe on all,
    run as eval tasks; the keys of results.json (the README's numbers come from them).
    ``suite``: `transfer_suite` of these arguments, when already built (and checked)."""
    if suite is None:
        if not isinstance(settings, QuickstartEval):
            settings = validate(QuickstartEval, settings or {}, "the quickstart config: eval")
        suite = transfer_suite(train_all, test, heldout, settings)
    out = run_suite(model, suite, TaskContext(progress=progress))
    per_class = out["zeroshot_all"].pop("per_class_acc1")
    return {"zeroshot_heldout_acc1": out["zeroshot_heldout"]["acc1"],
            "zeroshot_all_acc1": out["zeroshot_all"]["acc1"],
            "linear_probe_acc1": out["linear_probe"]["acc1"],
            "zeroshot_all": out["zeroshot_all"], "zeroshot_heldout": out["zeroshot_heldout"],
            "linear_probe": out["linear_probe"], "zeroshot_per_class_acc1": per_class}


def format_results(results: dict) -> str:
    """A short plain-text table of the headline numbers."""
    held = ", ".join(results.get("heldout_classes", []))
    rows = [("zero-shot top-1, held-out classes (" + held + ")", results["zeroshot_heldout_acc1"]),
            ("zero-shot top-1, all 10 classes", results["zeroshot_all_acc1"]),
            ("linear probe top-1, all 10 classes", results["linear_probe_acc1"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{name:<{width}}  {value:6.1%}" for name, value in rows]
    parts = results.get("seconds")  # results.json of older runs lack it
    where = (" (" + ", ".join(f"{name} {sec:.0f} s" for name, sec in parts.items()) + ")"
             if parts else "")
    lines.append(f"{'wall time':<{width}}  {results['wall_time_s']:.0f} s{where}")
    return "\n".join(lines)
