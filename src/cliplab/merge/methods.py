"""The merge methods of `cliplab merge`: one function per method over state dicts, and one
registry (``MERGE_METHODS``) holding each method's function and facts (`MergeMethod`: its own
config keys, whether it needs the base, how many models, ...), which the config checks, the
run and ``--help`` read. Adding a method is one function here (or a module with its operation)
and one registry entry; a setting of its own is also a field of `MergeInputs` and of
`cliplab.merge.config.MergeConfig` (same name, listed in the entry's ``keys``)."""

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
    drop_rate: float = 0.9
    seed: int = 0


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


def merge_dare(x: MergeInputs, record: dict) -> dict:
    from cliplab.merge.dare import dare_merge

    record.update(scale=x.scale, drop_rate=x.drop_rate, seed=x.seed)
    return dare_merge(x.base, x.states, x.drop_rate, x.scale, x.seed, x.names)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function and every fact the config checks, the run and
    ``--help`` need about it.

    ``summary``: its line in ``cliplab merge --help``; ``keys``: the config keys of its own it
    reads (another method's key given with it is refused); ``needs_base``: it combines task
    vectors from ``base``; ``min_models`` (with ``why``); ``per_model_scales``: ``scale`` may
    be a list, one per model; ``needs_heldout``: it scores candidates; ``streamed``: linear in
    the models, summed as each loads (`cliplab.merge.streamed`); ``soup``: it averages whole
    models, classifier heads included (`cliplab.merge.heads`)."""

    merge: Callable[[MergeInputs, dict], dict]
    summary: str
    keys: tuple[str, ...] = ()
    needs_base: bool = False
    min_models: int = 1
    why: str = ""
    per_model_scales: bool = False
    needs_heldout: bool = False
    streamed: bool = False
    soup: bool = False

    def __call__(self, inputs: MergeInputs, record: dict) -> dict:
        return self.merge(inputs, record)


_COPY = "one model merged alone is a copy of it"

# the one registry of `cliplab merge --method`: name -> method (a function(inputs, record) ->
# weights, and its facts); method-specific settings and results go into ``record`` (merge.json)
MERGE_METHODS: dict[str, MergeMethod] = {
    "uniform": MergeMethod(merge_uniform, "mean (weights: a weighted one)", ("weights",),
                           min_models=2, why=_COPY, streamed=True, soup=True),
    "greedy": MergeMethod(merge_greedy, "add ingredients by held-out score while it does not "
                          "drop (config 'heldout')", min_models=2, why=_COPY,
                          needs_heldout=True, soup=True),
    "model-stock": MergeMethod(merge_model_stock, "layer-wise interpolation toward --base",
                               needs_base=True, min_models=2,
                               why="its ratio toward the base comes from the angle between "
                               "fine-tunes"),
    "task-arithmetic": MergeMethod(merge_task_arithmetic, "--base + scale x (model - base) "
                                   "summed (scale=-1 negates)", ("scale",), needs_base=True,
                                   per_model_scales=True, streamed=True),
    "ties": MergeMethod(merge_ties, "trim to 'density', elect signs, disjoint mean, x scale",
                        ("scale", "density"), needs_base=True),
    # not streamed (it could be, drawing each model's masks as it loads): it holds every model
    "dare": MergeMethod(merge_dare, "drop each task-vector entry with probability 'drop_rate' "
                        "(seeded by 'seed'), rescale the rest by 1/(1-drop_rate), then as "
                        "task-arithmetic", ("scale", "drop_rate", "seed"), needs_base=True,
                        per_model_scales=True),
}


def methods_with(fact: str) -> tuple[str, ...]:
    """The names of the registered methods whose ``fact`` (a `MergeMethod` field) is true."""
    return tuple(name for name, m in MERGE_METHODS.items() if getattr(m, fact))


def methods_reading(key: str) -> tuple[str, ...]:
    """The names of the registered methods whose own config keys hold ``key``."""
    return tuple(name for name, m in MERGE_METHODS.items() if key in m.keys)


def method_keys() -> tuple[str, ...]:
    """Every method-specific config key, in registry order."""
    return tuple(dict.fromkeys(k for m in MERGE_METHODS.values() for k in m.keys))
