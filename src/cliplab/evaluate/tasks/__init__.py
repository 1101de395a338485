"""Evaluation tasks: one module per task, each with a ``Spec`` schema and one
``run(model, spec, context) -> metrics``; this registry makes them known to every stage.

Adding a task: write ``tasks/<name>.py`` and add it to the tuple below (or, from outside the
package, call `register_task(Spec, run)`).
"""

from cliplab.evaluate.tasks import (compositional, few_shot, linear_probe, long_tail,
                                    multilabel_zeroshot, retrieval, zeroshot)
from cliplab.evaluate.tasks.base import (Classifier, DataSpec, LinearHead, ProbePlan,
                                         TaskContext, TaskSpecBase, data_key, task_error)
from cliplab.evaluate.tasks.registry import TASKS, Task, TaskSpec, register_task, spec_class

for _module in (zeroshot, linear_probe, few_shot, retrieval, compositional,
                multilabel_zeroshot, long_tail):
    register_task(_module.Spec, _module.run)

__all__ = ["TASKS", "Classifier", "DataSpec", "LinearHead", "ProbePlan", "Task", "TaskContext",
           "TaskSpec", "TaskSpecBase", "data_key", "register_task", "spec_class", "task_error"]
