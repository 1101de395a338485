"""Evaluation tasks: one module per task, each with a ``Spec`` schema and one
``run(model, spec, context) -> metrics``; this registry makes them known to every stage.

Adding a task: write ``tasks/<name>.py`` and add its name to ``BUILT_IN`` below (or, from
outside the package, call `register_task(Spec, run)`); `cliplab eval --help` lists the names
too (it starts without torch, so it cannot import them: a test keeps the two equal).
"""

import importlib

from cliplab.evaluate.tasks.base import (Classifier, DataSpec, LinearHead, ProbePlan,
                                         TaskContext, TaskSpecBase, data_key, task_error)
from cliplab.evaluate.tasks.registry import TASKS, Task, TaskSpec, register_task, spec_class

# the modules of the built-in tasks, each named as its task, in the registry's order
BUILT_IN = ("zeroshot", "linear_probe", "few_shot", "retrieval", "compositional",
            "multilabel_zeroshot", "long_tail")
for _name in BUILT_IN:
    _module = importlib.import_module(f"{__name__}.{_name}")
    register_task(_module.Spec, _module.run)

__all__ = ["TASKS", "Classifier", "DataSpec", "LinearHead", "ProbePlan", "Task", "TaskContext",
           "TaskSpec", "TaskSpecBase", "data_key", "register_task", "spec_class", "task_error"]
