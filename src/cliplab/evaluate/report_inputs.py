"""Inputs of `cliplab report`: results JSON files (`cliplab eval --out`) and run folders
(results.json, metrics.jsonl), read into one shape: a label and metric sections.

Every problem is a one-line ``DataError`` naming the file (and line for metrics.jsonl).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cliplab.errors import DataError

RUN_FILES = ("results.json", "metrics.jsonl")
MERGE_RECORD = "merge.json"  # what `cliplab merge` writes beside the merged model
_SECTION_KEYS = ("results", "evals")  # eval results / pretrain run results
# mappings in results files that are not metrics: adapt's hyper-parameters, a skip record
# (its total is reported as a number of the run)
NOT_METRICS = ("options", "skipped", "origin")
SCALARS = "run"  # the section of a results file's top-level numbers


def measured(metrics: dict) -> dict:
    """A section's entries without the records beside its measurements (a task's skip record:
    its table shows them, its plot does not)."""
    return {k: v for k, v in metrics.items() if k not in NOT_METRICS}


@dataclass
class ReportSource:
    """One model or run: ``sections`` maps a task (or part of a run) to its metrics dict;
    ``history`` holds the metrics.jsonl records of a run."""

    label: str
    path: Path
    sections: dict[str, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a DataError naming the file and the problem (and what
    the file should be: a merge's record or a results JSON)."""
    expected = ("the merge.json `cliplab merge` writes" if path.name == MERGE_RECORD else
                "the results JSON of `cliplab eval --out` or a run's results.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; expected {expected}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err.msg} at line {err.lineno}); expected "
                        f"{expected}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object of results, got {type(data).__name__}")
    return data


def read_history(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (blank lines ignored)."""
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; expected a run's metrics.jsonl") from None
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                # a run killed while logging leaves its last line cut off: the rest still stands
                print(f"report: {path}:line {number} is cut off (the run stopped while writing "
                      "it); left out", file=sys.stderr)
                break
            raise DataError(f"{path}:line {number}: invalid JSON ({err.msg}); one JSON object "
                            "per line expected") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:line {number}: expected a JSON object, "
                            f"got {type(record).__name__}")
        records.append(record)
    return records


def result_sections(data: dict) -> dict[str, dict]:
    """Metric sections of a results object: its ``results``/``evals`` mapping if it has one,
    every other mapping under its own key (not adapt's ``options``), an α sweep (wise-ft's
    ``sweep``) as ``{"α 0.5": {set: acc1}}``, and numbers (top-level or directly under
    ``results``, and the number of skipped samples) under ``run``."""
    sections: dict[str, dict] = {}
    scalars = {}
    for key in _SECTION_KEYS:
        if isinstance(data.get(key), dict):
            sections.update({k: v for k, v in data[key].items() if isinstance(v, dict)})
            scalars.update({k: v for k, v in data[key].items() if _is_number(v)})
    for key, value in data.items():
        if key in _SECTION_KEYS and isinstance(value, dict):
            continue
        if key in NOT_METRICS:
            if isinstance(value, dict) and isinstance(value.get("total"), int):
                scalars[key] = value["total"]
            continue
        heldout = merge_heldout(value) if key == "heldout" else None
        if heldout is not None:
            sections.setdefault(heldout[0], heldout[1])
            continue
        sweep = alpha_sweep(value)
        if sweep:
            sections.setdefault(key, sweep)
        elif isinstance(value, dict):
            sections.setdefault(key, value)
        elif _is_number(value):
            scalars[key] = value
    if scalars:  # beside a task named "run", under another name
        sections[SCALARS if SCALARS not in sections else f"{SCALARS} (numbers)"] = scalars
    return sections


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def merge_heldout(value: object) -> tuple[str, dict] | None:
    """A merge's held-out record (``{"task", "metric", "scores": {model: score}, "merged"}``)
    as the section ``("heldout METRIC", {model label: score, "merged": score})``; None for
    anything else."""
    if not isinstance(value, dict) or not isinstance(value.get("scores"), dict):
        return None
    scores = {_model_label(str(name)): score for name, score in value["scores"].items()}
    if isinstance(value.get("merged"), (int, float)):
        scores["merged"] = value["merged"]
    return f"heldout {value.get('metric', '')}".strip(), scores


def alpha_sweep(rows: object) -> dict[str, dict] | None:
    """``{"α 0.5": {set name: acc1}}`` of a list of sweep rows (``{"alpha": 0.5, "test":
    {"acc1": ...}, ...}``, as wise-ft writes them); None for anything else."""
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and isinstance(r.get("alpha"), (int, float)) for r in rows):
        return None
    return {f"α {r['alpha']:g}": {name: m["acc1"] for name, m in r.items()
                                  if isinstance(m, dict) and "acc1" in m} for r in rows}


def _model_label(model: str) -> str:
    """A short name for a model path or preset: drop checkpoint plumbing, keep the last two."""
    parts = [p for p in Path(model).parts if p not in ("model", "checkpoints", "/", ".")]
    return "/".join(parts[-2:]) or model


def _file_label(path: Path) -> str:
    """A results file's name, or its folder's where the name says nothing (``results.json``
    as ``cliplab eval --out DIR`` writes it: every such input would be "results")."""
    return path.parent.resolve().name if path.stem == "results" else path.stem


def read_input(path: str | Path) -> ReportSource:
    """Read one report input: a results JSON file or a run folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"report input {path} does not exist; give results JSON files "
                        "(cliplab eval --out) or run folders")
    if path.is_file():
        data = read_json(path)
        label = _model_label(str(data["model"])) if isinstance(data.get("model"), str) \
            else _file_label(path)
        if isinstance(data.get("method"), str):  # adapt: the method on its model; a merge
            label = f"{data['method']} ({label})" if isinstance(data.get("model"), str) \
                else f"{data['method']} merge"
        if data.get("precision") not in (None, "fp32"):  # e.g. the same model's bf16 run
            label += f" [{data['precision']}]"
        source = ReportSource(label, path, result_sections(data))
        if not source.sections:
            raise DataError(f"{path}: no metrics found (expected numbers under 'results' or "
                            "top-level keys)")
        return source
    present = [name for name in RUN_FILES if (path / name).is_file()]
    if not {"results.json", "metrics.jsonl"} & set(present):
        if (path / MERGE_RECORD).is_file():  # a merged model's folder: its held-out scores
            return read_input(path / MERGE_RECORD)
        raise DataError(f"folder {path} has neither results.json nor metrics.jsonl (a run "
                        f"folder) nor {MERGE_RECORD} (a merge's output)")
    source = ReportSource(path.name or str(path), path)
    if "results.json" in present:
        results = read_json(path / "results.json")
        if "metrics.jsonl" in present:  # its `train` is the last logged record, shown there
            results.pop("train", None)
        source.sections = result_sections(results)
    if "metrics.jsonl" in present:
        source.history = read_history(path / "metrics.jsonl")
    return source


def read_inputs(paths: list[str | Path], names: list[str] | None = None) -> list[ReportSource]:
    """Every input read; labels made unique (``name``, ``name#2``, …) or taken from ``names``."""
    if not paths:
        raise DataError("cliplab report needs at least one results file or run folder")
    sources = [read_input(p) for p in paths]
    if names is not None:
        if len(names) != len(sources):
            raise DataError(f"{len(names)} names for {len(sources)} report inputs")
        for source, name in zip(sources, names):
            source.label = str(name)
    taken: set[str] = set()
    for source in sources:  # the first free of name, name#2, name#3, ...
        label, number = source.label, 1
        while label in taken:
            number += 1
            label = f"{source.label}#{number}"
        taken.add(label)
        source.label = label
    return sources
