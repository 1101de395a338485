"""The merge methods of `cliplab merge`: one function per method over state dicts, one
registry (``MERGE_METHODS``). Adding a method is one function here (or a module with its
operation) and one registry line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

# each method imports its operation (and torch) when it runs: the CLI's parser lists
# MERGE_METHODS and should not wait for torch
if TYPE_CHECKING:
    from cliplab.merge.state import StateDict


@dataclass
class MergeInputs:
    """What a merge method gets: the ingredients' weights and names, the base's weights, the
    held-out scores (if any), the scoring function (greedy) and the config's settings."""

    states: list[StateDict]
    names: list[str]
    base: StateDict | None
    scores: dict[str, float]
    evaluate: Callable[[StateDict], float] | None
    progress: bool
    weights: list[float] | None = None
    scale: float | list[float] = 1.0
    density: float = 0.2


def merge_uniform(x: MergeInputs, record: dict) -> dict:
    from cliplab.merge.soup import uniform_soup

    record["weights"] = x.weights
    return uniform_soup(x.states, x.weights, x.names)


def merge_greedy(x: MergeInputs, record: dict) -> dict:
    from cliplab.merge.soup import greedy_soup

    soup = greedy_soup(x.states, x.evaluate, x.names, [x.scores[n] for n in x.names],
                       x.progress)
    record["greedy"] = {"kept": [x.names[i] for i in soup.kept], "score": soup.score,
                        "steps": soup.steps}
    return soup.state


def merge_model_stock(x: MergeInputs, record: dict) -> dict:
    from cliplab.merge.stock import model_stock, ratio_summary

    merged, ratios = model_stock(x.base, x.states, x.names)
    record["model_stock"] = ratio_summary(ratios, x.base, x.states)
    return merged


def merge_task_arithmetic(x: MergeInputs, record: dict) -> dict:
    from cliplab.merge.task_arithmetic import apply_task_vector, combine_task_vectors, task_vector

    record["scale"] = x.scale
    vectors = [task_vector(s, x.base) for s in x.states]
    return apply_task_vector(x.base, combine_task_vectors(vectors, x.scale))


def merge_ties(x: MergeInputs, record: dict) -> dict:
    from cliplab.merge.ties import ties_merge

    record.update(scale=x.scale, density=x.density)
    return ties_merge(x.base, x.states, float(x.density), float(x.scale), x.names)


# the one registry of `cliplab merge --method`: name -> function(inputs, record) -> weights;
# method-specific settings and results go into ``record`` (merge.json)
MERGE_METHODS: dict[str, Callable[[MergeInputs, dict], dict]] = {
    "uniform": merge_uniform,
    "greedy": merge_greedy,
    "model-stock": merge_model_stock,
    "task-arithmetic": merge_task_arithmetic,
    "ties": merge_ties,
}
