"""The task registry and the `TaskSpec` field type: a mapping with ``task: NAME`` validated by
that task's own ``Spec`` (a union discriminated on ``task``, looked up in the registry when a
config is validated, so a task registered later is accepted too)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, get_args

from pydantic import SerializeAsAny, WrapValidator

from cliplab.evaluate.tasks.base import TaskContext, TaskSpecBase
from cliplab.models.dual_encoder import DualEncoder

TaskRunner = Callable[[DualEncoder, Any, TaskContext], dict]


@dataclass(frozen=True)
class Task:
    """A registered task: its spec schema and its runner."""

    spec: type[TaskSpecBase]
    run: TaskRunner


TASKS: dict[str, Task] = {}


def register_task(spec: type[TaskSpecBase], run: TaskRunner) -> None:
    """Make ``spec``'s task (the value of its ``task: Literal[...]`` field) known to every
    config that takes a task: suites, pretraining's eval, merge's heldout, adapt's test."""
    names = get_args(spec.model_fields["task"].annotation)
    if len(names) != 1 or not isinstance(names[0], str):
        raise TypeError(f"{spec.__name__}.task must be declared as Literal['<task name>']")
    TASKS[names[0]] = Task(spec, run)


def spec_class(data: Any) -> type[TaskSpecBase]:
    """The registered ``Spec`` for a raw task mapping (ValueError naming the choices)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a task must be a mapping with 'task' (one of: {', '.join(TASKS)})")
    kind = data.get("task")
    if kind not in TASKS:
        what = f"unknown task {kind!r}" if "task" in data else "'task' is required"
        raise ValueError(f"{what}; choose one of: {', '.join(TASKS)}")
    return TASKS[kind].spec


def _dispatch(value: Any, handler) -> TaskSpecBase:
    if isinstance(value, TaskSpecBase):
        return value
    return spec_class(value).model_validate(value)


# the field type of a single task in any schema (merge's `heldout: TaskSpec`, ...)
TaskSpec = Annotated[SerializeAsAny[TaskSpecBase], WrapValidator(_dispatch)]
