"""Weight-space operations over checkpoints of one architecture and pretrained origin:
uniform and greedy soups, Model Stock, task arithmetic, TIES and DARE merging.

Every operation takes state dicts (``{name: tensor}``) and returns a new one (`model_stock`
with its per-tensor ratios, `greedy_soup` as a `GreedySoup` whose ``.state`` it is);
floating-point tensors are combined, everything else (integer buffers such as position ids) is
copied.
`cliplab.merge.run.run_merge` is the `cliplab merge` command: it reads model folders, checks
them, merges and writes a normal model folder plus ``merge.json``.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module; imported on first use, so the CLI's parser (which lists the merge methods)
# starts without torch. No module here is named like a function exported here: importing it
# would bind the package's attribute of that name to the module.
_EXPORTS = {
    **dict.fromkeys(("model_stock", "model_stock_ratio"), "cliplab.merge.stock"),
    **dict.fromkeys(("GreedySoup", "greedy_soup", "uniform_soup"), "cliplab.merge.soup"),
    **dict.fromkeys(("apply_task_vector", "combine_task_vectors", "task_vector"),
                    "cliplab.merge.task_arithmetic"),
    **dict.fromkeys(("dare_merge", "drop_and_rescale"), "cliplab.merge.dare"),
    **dict.fromkeys(("disjoint_mean", "elect_sign", "ties_merge", "trim_top_fraction"),
                    "cliplab.merge.ties"),
}

__all__ = sorted(_EXPORTS)


def __dir__() -> list[str]:
    """The module's names with those imported on first use (``dir()`` and completion show them)."""
    return sorted({*globals(), *_EXPORTS})


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
