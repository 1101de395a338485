"""`cliplab eval`: a suite of registered tasks run on one model, all reading image and text
features from one cache.

The suite is validated whole (every task's keys, against its own schema) before any task
runs. Then it plans which probe features (``tokens`` / ``layers``) each dataset will need, so
the first task that touches a dataset encodes everything every later task reads from it in one
pass over the images.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError, model_validator
from pydantic_core import InitErrorDetails

from cliplab.config import Section, validate
from cliplab.errors import CliplabError, CliplabWarning, ConfigError, ModelError
from cliplab.evaluate.tasks import (TASKS, ProbePlan, TaskContext, TaskSpec, TaskSpecBase,
                                    data_key, spec_class)
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.precision import Precision, resolve_precision


def task_label(i: int, task: Any) -> str:
    """``tasks[1] (name 'zs')``: how errors and results point at a suite's task."""
    name = task.get("name") if isinstance(task, Mapping) else getattr(task, "name", None)
    return f"tasks[{i}]" + (f" (name {name!r})" if name else "")


class _Placeholder(TaskSpecBase):
    task: str = "placeholder"


_PLACEHOLDER = _Placeholder()


class SuiteSpec(Section):
    """``{tasks: [task specs], precision: fp32|bf16|auto}``: the schema of `cliplab eval
    --config`, of pretraining's ``eval:`` and of the quickstart's report (``auto``: bf16 where
    the device computes it natively, as training's ``auto``)."""

    tasks: list[TaskSpec]
    precision: Precision = "fp32"

    @model_validator(mode="before")
    @classmethod
    def _validate_every_task(cls, data: Any) -> Any:
        """Validate each task by its own schema, reporting every bad task at once with its
        index and name (``tasks[1] (name 'zs').data: ...``)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("tasks"), list):
            return data
        errors: list[InitErrorDetails] = []
        if not data["tasks"]:
            errors.append(InitErrorDetails(type="value_error", loc=("tasks",), input=[], ctx={
                "error": ValueError("needs a non-empty list of tasks")}))
        tasks = []
        for i, raw in enumerate(data["tasks"]):
            label = task_label(i, raw)
            try:
                tasks.append(raw if isinstance(raw, TaskSpecBase)
                             else spec_class(raw).model_validate(raw))
            except ValidationError as err:
                valid = sorted(spec_class(raw).model_fields)  # an unknown key lists these
                errors += [InitErrorDetails(type=e["type"], loc=(label, *e["loc"]),
                                            input=e.get("input"), ctx=e.get("ctx") or (
                                                {"valid": valid} if len(e["loc"]) == 1 else {}))
                           for e in err.errors()]
            except ValueError as err:
                errors.append(InitErrorDetails(type="value_error", loc=(label, "task"),
                                               input=raw, ctx={"error": err}))
        errors += _doubled_names(data["tasks"])
        if errors:  # with the other keys' errors, so one run reports every problem
            try:
                cls.model_validate({**data, "tasks": [_PLACEHOLDER]})  # tasks: checked above
            except ValidationError as err:
                errors += [InitErrorDetails(type=e["type"], loc=e["loc"], input=e.get("input"),
                                            ctx=e.get("ctx", {})) for e in err.errors()]
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return {**data, "tasks": tasks}

    def task_names(self) -> list[str]:
        """The results key of every task: its ``name``, or ``<task>-<index>``."""
        return [t.name or f"{t.task}-{i}" for i, t in enumerate(self.tasks)]


def _doubled_names(tasks: list) -> list[InitErrorDetails]:
    """An error for each task whose results key (its ``name``, else ``<task>-<index>``, as
    `SuiteSpec.task_names` gives it) an earlier task already has: ``run_suite`` would keep
    only the last one's results."""
    errors, first = [], {}
    for i, raw in enumerate(tasks):
        get = raw.get if isinstance(raw, Mapping) else lambda key: getattr(raw, key, None)
        name = get("name") or f"{get('task')}-{i}"
        if name in first:
            what = f"the name {name!r}" if get("name") else f"its results name {name!r}"
            fix = "names must be unique" if get("name") else "give it a `name:`"
            errors.append(InitErrorDetails(type="value_error", loc=(task_label(i, raw),),
                                           input=raw, ctx={"error": ValueError(
                f"{what} is already used by tasks[{first[name]}]; {fix}")}))
        first.setdefault(name, i)
    return errors


def suite_spec(suite: SuiteSpec | Mapping | list, where: str = "the eval suite") -> SuiteSpec:
    """A validated suite from a spec, a mapping ``{tasks, precision}``, or a list of tasks."""
    if isinstance(suite, SuiteSpec):
        return suite
    if isinstance(suite, list):
        suite = {"tasks": suite}
    return validate(SuiteSpec, suite, where)


def task_spec(task: TaskSpecBase | Mapping, where: str = "the task") -> TaskSpecBase:
    """A validated task spec from a mapping with ``task: NAME`` (or a spec)."""
    if isinstance(task, TaskSpecBase):
        return task
    try:
        schema = spec_class(task)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return validate(schema, task, where)


def plan_probes(tasks: list[TaskSpecBase]) -> ProbePlan:
    """``{data key: (probe kind, layers)}`` for every dataset a task reads with extra
    features (the first task's choice wins where two ask for different ones)."""
    plan: ProbePlan = {}
    for task in tasks:
        for spec, kind, layers in task.probes():
            plan.setdefault(data_key(spec), (kind, layers))
    return plan


def as_model(model: DualEncoder | str | Path | Mapping) -> DualEncoder:
    """A loaded model as it is; a model spec (preset, folder, run, Hub id, ...) loaded."""
    if isinstance(model, (str, Path, Mapping)):
        from cliplab.models.resolve import load_model

        return load_model(str(model) if isinstance(model, Path) else model)
    from cliplab.models.onnx_encoder import OnnxEncoder

    if not isinstance(model, (DualEncoder, OnnxEncoder)):
        raise ModelError(f"expected a loaded model (a DualEncoder or an ONNX export's "
                         f"OnnxEncoder) or a model spec (a preset, folder, run or Hub id), got "
                         f"{type(model).__name__}")
    return model


def _as_context(context: TaskContext | None) -> TaskContext:
    if context is not None and not isinstance(context, TaskContext):
        raise ConfigError(f"context: expected a TaskContext (cliplab.evaluate.tasks), got "
                          f"{type(context).__name__}")
    return context or TaskContext(hold=False)  # nobody else can use a context made here


def suite_precision(suite: SuiteSpec, context: TaskContext | None, model,
                    warn: bool = True) -> str:
    """What ``suite`` runs in on ``model``: its ``precision`` key when it has one, else the
    context's (``fp32`` unless set), resolved (``auto``: bf16 where the device has the units)."""
    wanted = suite.precision if "precision" in suite.model_fields_set or context is None \
        else context.precision
    return model_precision(model, wanted, warn)


def model_precision(model, precision: str, warn: bool = True) -> str:
    """``precision`` resolved on ``model``'s device; an ONNX export runs its fp32 graphs
    whatever is asked (a warning when bf16 was: only its projections would have followed)."""
    if not isinstance(model, DualEncoder):  # nothing of it runs in bf16: no word on bf16 units
        if warn and precision == "bf16":  # asked for, not auto's choice
            warnings.warn("an ONNX export runs in fp32 (its graphs are fp32): precision "
                          f"{precision} is not applied to it", CliplabWarning, stacklevel=2)
        return "fp32"
    return resolve_precision(precision, model.device)


def run_task(model: DualEncoder | str | Path | Mapping, spec: TaskSpecBase | Mapping,
             context: TaskContext | None = None) -> dict:
    """Metrics of one task (a spec or a mapping with ``task: NAME``) on ``model`` (a loaded
    model or any model spec)."""
    spec = task_spec(spec, f"task {spec.get('name') or spec.get('task')!r}"
                     if isinstance(spec, Mapping) else "the task")
    model = as_model(model)
    context = _as_context(context)
    ran_in = model_precision(model, context.precision)  # auto: what the device has
    if ran_in != context.precision:
        context = dataclasses.replace(context, precision=ran_in)
    try:
        context.check_task(spec, model)  # as `run_suite` checks every task before the first
    except CliplabError as err:
        raise type(err)(f"task {spec.name or spec.task!r}: {err}") from None
    return TASKS[spec.task].run(model, spec, context)


def run_suite(model: DualEncoder | str | Path | Mapping, suite: SuiteSpec | Mapping | list,
              context: TaskContext | None = None) -> dict:
    """``{task name: metrics}`` of every task of ``suite`` (validated whole, and its data read
    and every task checked against its data and ``model``, before any task runs: a bad class
    of the last task is not found after the first ones' encoding); the tasks
    share ``context``'s feature cache, so a dataset is encoded once however many tasks read
    it, and a text (prompt or caption) once however many tasks and images use it. A task
    whose data skipped samples (unreadable, missing, empty) gets them under ``skipped`` and
    one line on stderr."""
    suite = suite_spec(suite)
    model = as_model(model)
    context = dataclasses.replace(_as_context(context),
                                  precision=suite_precision(suite, context, model),
                                  probe_plan=plan_probes(suite.tasks))
    try:
        return _run_tasks(model, suite, context)
    finally:  # (the caller's context shares the copy's sets: a failed run leaves none streamed)
        context.drop_streamed()


def _run_tasks(model: DualEncoder, suite: SuiteSpec, context: TaskContext) -> dict:
    """`run_suite`'s work on its copy of the context."""
    # every set read, every task checked (against its data and the model) before the first
    # task encodes
    context.preload(suite.tasks, model=model)
    results = {}
    for i, (name, task) in enumerate(zip(suite.task_names(), suite.tasks)):
        if not context.hold:  # its sets decoded now, and checked again as read
            context.check_named(i, task, model)
        drawing = not context.hold and bool(task.drawn)  # its draws find unreadable files
        skipped = None if drawing else report_skips(name, task, context)
        with context.naming(i, task):
            results[name] = TASKS[task.task].run(model, task, context)
        if drawing:
            skipped = report_skips(name, task, context)
        if skipped:
            results[name] = {**results[name], "skipped": skipped}
        if not context.hold:
            context.release(suite.tasks[i + 1:])
    return results


def report_skips(name: str, task: TaskSpecBase, context: TaskContext) -> dict | None:
    """The samples ``task``'s datasets skipped (``SkipReport.to_dict()``, None if none), told
    once per context on stderr: ``zs: skipped 2 of 30 samples (missing_file=1,
    unreadable_image=1) in DATA``."""
    report, total, where = context.skipped(task)
    if not report.total:
        return None
    line = report.line(name, total - report.lost_samples, ", ".join(where))
    if line not in context.reported:
        context.reported.add(line)
        print(line, file=sys.stderr)
    return report.to_dict()
