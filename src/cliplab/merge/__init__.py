"""Weight-space operations over checkpoints of one architecture and pretrained origin:
uniform and greedy soups, Model Stock, task arithmetic and TIES merging.

Every operation takes state dicts (``{name: tensor}``) and returns a new one; floating-point
tensors are combined, everything else (integer buffers such as position ids) is copied.
`cliplab.merge.run.run_merge` is the `cliplab merge` command: it reads model folders, checks
them, merges and writes a normal model folder plus ``merge.json``.
"""

from cliplab.merge.model_stock import model_stock, model_stock_ratio
from cliplab.merge.soup import GreedySoup, greedy_soup, uniform_soup
from cliplab.merge.task_arithmetic import apply_task_vector, combine_task_vectors, task_vector
from cliplab.merge.ties import disjoint_mean, elect_sign, ties_merge, trim_top_fraction

__all__ = ["GreedySoup", "apply_task_vector", "combine_task_vectors", "disjoint_mean",
           "elect_sign", "greedy_soup", "model_stock", "model_stock_ratio", "task_vector",
           "ties_merge", "trim_top_fraction", "uniform_soup"]
