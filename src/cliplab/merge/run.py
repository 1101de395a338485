"""`cliplab merge`: read model folders (a run or checkpoint folder: its newest model), check
they share architecture and pretrained origin, merge them with one method, write a normal
model folder plus ``merge.json``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cliplab.config import validate
from cliplab.errors import ConfigError, ModelError
from cliplab.evaluate.metrics import COUNT_KEYS
from cliplab.evaluate.suite import report_skips, run_task, task_spec
from cliplab.evaluate.tasks import TaskContext
from cliplab.merge.checkpoints import (Ingredient, check_architecture, check_origin,
                                       ingredient_folder, load_ingredient, save_merged)
from cliplab.merge.config import MergeConfig
from cliplab.merge.dtypes import dtype_record, merged_dtype
from cliplab.merge.heads import HEAD_FILE, soup_heads, split_head, with_head
from cliplab.merge.methods import MERGE_METHODS, MergeInputs, method_keys
from cliplab.merge.state import StateDict
from cliplab.merge.streamed import STREAMED, linear_merge, skeleton
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.spec import ModelSpec
from cliplab.output_folder import MODEL_FOLDER, check_out, check_writable_beside

# what --overwrite may replace: a previous merge output (a model folder with its merge.json)
# a model folder, merge.json, and a soup's averaged head when its models carried one
MERGE_OUTPUT = dataclasses.replace(MODEL_FOLDER.plus("merge.json"),
                                   names=MODEL_FOLDER.names | {HEAD_FILE})


def folder_spec(spec: ModelSpec, option: str) -> ModelSpec:
    """``spec`` naming the model folder it resolves to (unchanged when it is one)."""
    folder = ingredient_folder(spec.name, option)
    return spec if folder == Path(spec.name).expanduser() else ModelSpec(name=str(folder))


def checked_config(cfg: MergeConfig | dict, where: str = "the merge config",
                   overwrite: bool = False) -> MergeConfig:
    """The validated config with its inputs resolved to model folders (run and checkpoint
    folders: the newest checkpoint's), and an output folder `check_out` accepts (not a file, not
    an input, new or empty, or with ``overwrite`` a previous merge output)."""
    if not isinstance(cfg, MergeConfig):
        cfg = validate(MergeConfig, cfg, where)
    given = [m.name for m in cfg.models + ([cfg.base] if cfg.base else [])]
    # before any (slow) loading: every input resolved to its model folder
    cfg = cfg.model_copy(update={
        "models": [folder_spec(m, "--models") for m in cfg.models],
        "base": folder_spec(cfg.base, "--base") if cfg.base else None})
    if cfg.heldout is not None:
        task_spec(cfg.heldout, f"{where}: heldout")  # a bad task key fails before any work
    folders = [Path(m.name).resolve() for m in cfg.models]
    twice = next((f for i, f in enumerate(folders) if f in folders[:i]), None)
    if twice is not None:
        raise ConfigError(f"--models lists {twice} twice (it would count double); give each "
                          "model once, and weights=[...] to weight one more (uniform)")
    # Model Stock's ratio comes from the angles between task vectors: the base's own (zero)
    # counts as orthogonal to every other and halved it (a soup may hold the base, and to task
    # arithmetic and TIES a zero vector adds nothing)
    if cfg.method == "model-stock" and Path(cfg.base.name).resolve() in folders:
        raise ConfigError(f"--models lists the base {Path(cfg.base.name).resolve()} among the "
                          "fine-tunes: its task vector is zero, which would count as orthogonal "
                          "to the others and shrink Model Stock's ratio; give the fine-tunes only")
    # the run/checkpoint folders given and the model folders they stand for: none is --out,
    # holds it or lies inside it
    inputs = given + [m.name for m in cfg.models + ([cfg.base] if cfg.base else [])]
    check_out(cfg.out, "merge", inputs, overwrite, MERGE_OUTPUT)
    check_writable_beside(cfg.out)  # built beside it: refused before loading any model
    return cfg


def heldout_evaluator(template: DualEncoder, task: dict, metric: str,
                      progress: bool = False, where: str = "the merge config",
                      dtype: torch.dtype = torch.float32,
                      classnames: list[str] | None = None) -> Callable[[StateDict], float]:
    """A function scoring weights on the held-out eval ``task`` (an eval-suite task spec) by
    ``metric``, with the weights loaded into ``template`` rounded to ``dtype`` (what the merged
    folder is saved in) — and a head riding in them (`split_head`, of ``classnames``) as the
    classifier, as `cliplab eval` scores a folder with its head; a metric the task does not
    give is an error naming the config ``where`` it was set (known only once the task has
    run)."""
    spec = task_spec(task, "heldout")
    # its files decoded to the model's input once, for every weights scored
    context = TaskContext(progress=progress, model_input=template.preprocess_config)
    report_skips("heldout", spec, context)  # told once, before any scoring

    def evaluate(state: StateDict) -> float:
        weights, head = split_head(as_saved(state, dtype), classnames)
        template.model.load_state_dict(weights, strict=True)
        scoring = context.for_new_weights()
        if head is not None:
            scoring = dataclasses.replace(scoring, classifier=head)
        metrics = run_task(template, spec, scoring)
        scores = sorted(k for k in metrics if k not in COUNT_KEYS)
        if metric not in scores:
            raise ConfigError(f"{where}: metric: the held-out task gives "
                              f"{', '.join(scores)}; not {metric!r}"
                              + (" (a count of what it is over)" if metric in metrics else ""))
        return float(metrics[metric])
    return evaluate


def as_saved(state: StateDict, dtype: torch.dtype) -> StateDict:
    """``state``'s float tensors rounded to ``dtype`` (kept float32), as a folder saved in it
    loads back."""
    if dtype == torch.float32:
        return state
    return {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in state.items()}


def run_merge(cfg: MergeConfig | dict, progress: bool = True,
              where: str = "the merge config", overwrite: bool = False) -> dict:
    """Merge as ``cfg`` says (see `MergeConfig`); returns the ``merge.json`` record.
    ``overwrite`` replaces a non-empty output folder (only once the merge is written)."""
    start = time.time()
    cfg = checked_config(cfg, where, overwrite)
    # recorded absolute, as every model a cliplab file names (it holds from any folder)
    method, paths = cfg.method, [str(Path(m.name).resolve()) for m in cfg.models]
    heads = soup_heads(method, paths)  # averaged with the towers, or warned of
    classnames = heads[0].classnames if heads else None

    def load(path: str, i: int | None) -> Ingredient:
        """Model ``i``'s folder with its head riding in its weights; the base (``i`` None,
        given to a soup for its origin only) gets the first's, so the tensors it is checked
        against match (a soup never mixes the base in)."""
        ingredient = load_ingredient(path)
        if heads:
            ingredient.state = with_head(ingredient.state, heads[i if i is not None else 0])
        return ingredient

    base_path = str(Path(cfg.base.name).resolve()) if cfg.base else None
    # a merge linear in the models is summed as each loads: all of them are never held
    streamed = method in STREAMED
    base = load(base_path, None) if base_path and streamed else None
    summed = linear_merge(method, len(paths), cfg.weights, cfg.scale,
                          base.state if base else None) if streamed else None
    loaded = []
    for i, path in enumerate(tqdm(paths + ([base_path] if base_path and not streamed else []),
                                  desc="load models", disable=not progress, leave=False)):
        ingredient = load(path, i if i < len(paths) else None)
        if summed is not None:
            # against the first model (the first against the base), as with all loaded
            check_architecture([loaded[0], ingredient] if loaded else
                               [ingredient, base] if base else [ingredient])
            summed.add(ingredient.state, ingredient.name)
            ingredient.state = skeleton(ingredient.state)  # its weights are in the sum
        loaded.append(ingredient)
    loaded += [base] if streamed and base else []
    models, base = loaded[:len(paths)], (loaded[-1] if base_path else None)
    check_architecture(loaded)
    origin = check_origin(models, base)
    if cfg.require_origin and origin["unrecorded"]:
        raise ModelError(f"{origin['unrecorded'][0]} records no pretrained origin ('base' in "
                         "cliplab.json) and require_origin is set")
    states, names = [m.state for m in models], [m.name for m in models]
    dtype = merged_dtype([m.dtype for m in loaded])

    evaluate = None
    if cfg.heldout:
        template = DualEncoder.load(paths[0], cfg.device)
        evaluate = heldout_evaluator(template, cfg.heldout, cfg.metric, where=where,
                                     dtype=dtype, classnames=classnames)
    record: dict = {"method": method, "models": paths, "base": base_path,
                    "origin": origin, "heldout": None,
                    **dtype_record([m.name for m in loaded], [m.dtype for m in loaded])}
    scores: dict[str, float] = {}
    if evaluate is not None:
        for m in tqdm(loaded, desc="score models", disable=not progress, leave=False):
            # a summed model's weights are read again (the base's were kept)
            state = load(m.name, paths.index(m.name)).state if streamed and m is not base \
                else m.state
            if m is base:  # its head only matched the keys: the base is scored zero-shot
                state = split_head(state, None)[0]
            scores[m.name] = evaluate(state)

    inputs = MergeInputs(states, names, base.state if base else None, scores, evaluate,
                         progress, **{key: getattr(cfg, key) for key in method_keys()})
    if summed is not None:
        record.update({key: getattr(cfg, key) for key in MERGE_METHODS[method].keys})
        merged = summed.result()
    else:
        merged = MERGE_METHODS[method](inputs, record)
    if evaluate is not None:
        merged_score = record.get("greedy", {}).get("score")
        record["heldout"] = {"task": cfg.heldout, "metric": cfg.metric, "scores": scores,
                             "merged": merged_score if merged_score is not None
                             else evaluate(merged)}
    merged, head = split_head(merged, classnames)
    if head is not None:
        record["head"] = head_note(record)
    record["wall_time_s"] = round(time.time() - start, 1)
    save_merged(paths[0], merged, cfg.out, origin, record, dtype, head)
    record["out"] = str(cfg.out)
    return record


def head_note(record: dict) -> str:
    """What merge.json says the merged head is: the mean of every model's, or of the models a
    greedy soup kept (one kept: its head as it was)."""
    kept = record.get("greedy", {}).get("kept")
    if kept is None:
        return f"the mean of the models' {HEAD_FILE} (the same weights as the towers)"
    if len(kept) == 1:
        return f"the {HEAD_FILE} of {kept[0]}, the one model the greedy soup kept"
    return (f"the mean of the {HEAD_FILE} of the {len(kept)} models the greedy soup kept "
            f"({', '.join(kept)})")
