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
from cliplab.evaluate.metrics import COUNT_KEYS
from cliplab.evaluate.report_per_class import is_per_class
from cliplab.report_text import printable, unique_labels

RUN_FILES = ("results.json", "metrics.jsonl")
MERGE_RECORD = "merge.json"  # what `cliplab merge` writes beside the merged model
_SECTION_KEYS = ("results", "evals")  # eval results / pretrain run results
# mappings in results files that are not metrics: adapt's hyper-parameters, a skip record
# (its total is reported as a number of the run)
# settings and provenance, not scores (adapt's train_settings, a preset's model_options, a
# resumed run's resumed_from, eval's embedding_identity)
NOT_METRICS = ("options", "skipped", "origin", "train_settings", "model_options",
               "resumed_from", "embedding_identity")
SCALARS = "run"  # the section of a results file's top-level numbers
RESULTS_KINDS = ("the results JSON of `cliplab eval --out`, a run's results.json (pretrain, "
                 "adapt, quickstart), a merge.json or a benchmark's results")
# keys of cliplab's results files that say what they are, so a single number beside them is
# a result (a merge without held-out scores: its wall time)
RESULT_MARKERS = (*_SECTION_KEYS, "model", "method", "benchmark")
# keys every index.json of `cliplab index` holds (those of an older cliplab too): a record of
# an index's size and settings, no scores
INDEX_RECORD_KEYS = ("complete", "backend", "count", "fingerprint")
# keys of a model folder's own JSON files (config.json, preprocessor_config.json, ...)
MODEL_FILE_KEYS = ("model_type", "architectures", "transformers_version",
                   "image_processor_type", "processor_class", "tokenizer_class")


def measured(metrics: dict) -> dict:
    """A section's entries without the records beside its measurements (a task's skip record,
    the counts of what it is over: its table shows them, its plot does not)."""
    return {k: v for k, v in metrics.items() if k not in NOT_METRICS and k not in COUNT_KEYS}


@dataclass
class ReportSource:
    """One model or run: ``sections`` maps a task (or part of a run) to its metrics dict;
    ``history`` holds the metrics.jsonl records of a run; ``note`` says what it lacks."""

    label: str
    path: Path
    sections: dict[str, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    note: str = ""
    specs: dict[str, dict] = field(default_factory=dict)  # task name -> the spec it ran
    provenance: str = ""  # which cliplab wrote its record and when (`provenance_of`)


def provenance_of(data: dict) -> str:
    """``cliplab 0.1.0, created 2026-12-07T12:00:00Z`` from a record's ``cliplab_version`` and
    ``created`` (`cliplab.provenance.stamp`); empty for a record an older cliplab wrote."""
    parts = [f"{label}{data[key]}" for key, label in (("cliplab_version", "cliplab "),
                                                      ("created", "created "))
             if isinstance(data.get(key), str)]
    return ", ".join(parts)


def task_specs(data: dict) -> dict[str, dict]:
    """Each task's spec as an eval results file records it (``suite_ran``), by its name."""
    suite = data.get("suite_ran")
    tasks = suite.get("tasks") if isinstance(suite, dict) else None
    return {t["name"]: {k: v for k, v in t.items() if k != "name"}
            for t in tasks or [] if isinstance(t, dict) and isinstance(t.get("name"), str)}


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


def check_results(path: Path, data: dict, sections: dict[str, dict]) -> None:
    """A DataError naming ``path`` unless ``data`` (read into ``sections``) has the shape of a
    results file cliplab writes: a metrics table (a mapping holding numbers: a task's, a part
    of a benchmark's), several top-level numbers (a benchmark's row), or numbers beside a key
    of its results (`RESULT_MARKERS`). A model's config and a lone number are no results."""
    model_key = next((key for key in MODEL_FILE_KEYS if key in data), None)
    if model_key is not None:
        raise DataError(f"{path}: a model's config ({model_key}: {data[model_key]!r}), not "
                        f"results; expected {RESULTS_KINDS}")
    if all(key in data for key in INDEX_RECORD_KEYS):  # its model's settings read as metrics
        raise DataError(f"{path}: the record of a search index (`cliplab index`), not results; "
                        f"expected {RESULTS_KINDS}")
    if not sections:
        raise DataError(f"{path}: no metrics found (expected numbers under 'results' or "
                        "top-level keys)")
    scalars = [key for key, value in data.items() if _is_number(value)]
    tables = [key for key, value in data.items() if key not in NOT_METRICS
              and (isinstance(value, dict) and _holds_number(value) or alpha_sweep(value))]
    if tables or len(scalars) > 1 or (scalars and any(k in data for k in RESULT_MARKERS)):
        return
    found = ", ".join(sorted(data)[:5]) + (", ..." if len(data) > 5 else "")
    raise DataError(f"{path}: not a cliplab results file (no metrics table, only the keys "
                    f"{found}); expected {RESULTS_KINDS}")


def _holds_number(value: object) -> bool:
    """Whether a JSON value is a number or holds one (at any depth)."""
    if isinstance(value, dict):
        return any(_holds_number(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_number(v) for v in value)
    return _is_number(value)


def read_history(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (blank lines ignored); each a JSON object with a
    whole-number ``step``, as a run logs them."""
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
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            got = "no step" if "step" not in record else f"step {json.dumps(step)}"
            raise DataError(f"{path}:line {number}: {got}; a run's metrics.jsonl logs each "
                            "record with its step, a whole number from 0")
        records.append(record)
    return records


def result_sections(data: dict) -> dict[str, dict]:
    """Metric sections of a results object: its ``results``/``evals`` mapping if it has one,
    every other mapping under its own key (not adapt's ``options``), an α sweep (wise-ft's
    ``sweep``) as ``{"α 0.5": {set: acc1}}``, and numbers (top-level or directly under
    ``results``, and the number of skipped samples) and top-level per-class values (adapt's
    ``fewer_than_shots``) under ``run``."""
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
        if isinstance(value, dict) and is_per_class(key):  # after the results, cut as theirs
            scalars[key] = value
        elif sweep:
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
    as the section ``("heldout METRIC", {model label: score, "merged": score})``, two paths
    ending alike labelled apart; None for anything else."""
    if not isinstance(value, dict) or not isinstance(value.get("scores"), dict):
        return None
    labels = unique_labels([_model_label(str(name)) for name in value["scores"]], ("merged",))
    scores = dict(zip(labels, value["scores"].values()))
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


def _results_label(path: Path, data: dict) -> str:
    """A results file's column label: its model (an adapt result as ``METHOD (model)``, a
    merge as ``METHOD merge``), else its name (or its folder's); `` [bf16]`` when its scores
    ran in another precision than fp32."""
    label = _model_label(str(data["model"])) if isinstance(data.get("model"), str) \
        else _file_label(path)
    if isinstance(data.get("method"), str):  # adapt: the method on its model; a merge
        label = f"{data['method']} ({label})" if isinstance(data.get("model"), str) \
            else f"{data['method']} merge"
    # the precision its scores ran in: a training run's evals ran in their suite's
    scored_in = data["eval_precision"] if "eval_precision" in data else data.get("precision")
    if scored_in not in (None, "fp32"):  # e.g. the same model's bf16 run
        label += f" [{scored_in}]"
    return label


def read_input(path: str | Path) -> ReportSource:
    """Read one report input: a results JSON file or a run folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"report input {path} does not exist; give results JSON files "
                        "(cliplab eval --out), run folders or merge output folders (merge.json)")
    if path.is_file():
        data = read_json(path)
        source = ReportSource(_results_label(path, data), path, result_sections(data),
                              specs=task_specs(data), provenance=provenance_of(data))
        check_results(path, data, source.sections)
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
        # an eval's or adapt's --out folder is labelled as its results.json is (by model);
        # a training run, whose results name no model, by its folder
        source.label = _results_label(path / "results.json", results)
        source.provenance = provenance_of(results)
        if "metrics.jsonl" not in present:  # else the run's log is what it reports
            check_results(path / "results.json", results, result_sections(results))
        if "metrics.jsonl" in present:  # its `train` is the last logged record, shown there
            results.pop("train", None)
        source.sections, source.specs = result_sections(results), task_specs(results)
    if "metrics.jsonl" in present:
        source.history = read_history(path / "metrics.jsonl")
        if not source.history and not source.sections:  # as a results file without numbers
            raise DataError(f"{path / 'metrics.jsonl'}: no record yet (a run that has just "
                            "started) and no results.json beside it; nothing to report")
        diverged = _divergence(source.history)
        if "results.json" not in present and (diverged or (path / "config.yaml").is_file()):
            # a command's run (pretrain, adapt) writes results.json at its end; a bare
            # Trainer's folder never does. Its final evaluation is missing: said, not blank
            source.note = f"no results.json: {diverged or 'the run stopped or is still running'}" \
                ", so its last logged values only, no final evaluation"
            print(f"report: {path}: {source.note}", file=sys.stderr)
    return source


def _divergence(history: list[dict]) -> str:
    """``the run diverged at step N (why)`` when the last record is the one a run stopped by a
    NaN or infinite loss writes (``{"step": N, "diverged": why}``), else empty."""
    why = history[-1].get("diverged") if history else None
    return f"the run diverged at step {history[-1]['step']} ({why})" \
        if isinstance(why, str) else ""


def _reported_folder(path: Path) -> Path:
    """The folder whose report reads the results file ``path`` (its ``results.json``; its
    ``merge.json`` when it has no run files): giving both is one input twice. Any other path
    as it is."""
    if not path.is_file():
        return path
    if path.name == "results.json" or (path.name == MERGE_RECORD and not any(
            (path.parent / name).is_file() for name in RUN_FILES)):
        return path.parent
    return path


def read_inputs(paths: list[str | Path], names: list[str] | None = None) -> list[ReportSource]:
    """Every input read; labels made unique (``name``, ``name#2``, …) or taken from ``names``."""
    if not paths:
        raise DataError("cliplab report needs at least one results file, run folder or merge "
                        "output folder")
    seen: dict[Path, tuple[str, Path]] = {}  # what is reported -> (input as given, resolved)
    for path in paths:  # two identical columns would read as two runs that agree
        resolved = Path(path).expanduser().resolve()
        reported = _reported_folder(resolved)
        if reported in seen:
            given, earlier = seen[reported]
            same = "" if earlier == resolved else ", one folder's results"
            raise DataError(f"report input {path} is given twice (as {given} too{same}); give "
                            "each results file or run folder once")
        seen[reported] = str(path), resolved
    sources = [read_input(p) for p in paths]
    if names is not None:
        if len(names) != len(sources):
            raise DataError(f"{len(names)} names for {len(sources)} report inputs")
        for source, name in zip(sources, names):
            source.label = str(name)
    # a label from a name that is not UTF-8 is shown with its bytes escaped (it reaches
    # matplotlib and the UTF-8 report files)
    for source, label in zip(sources, unique_labels([printable(s.label) for s in sources])):
        source.label = label
    return sources
