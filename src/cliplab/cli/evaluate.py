"""`cliplab eval`: run a suite of evaluation tasks on a model."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cliplab.cli.arguments import (MODEL_SPECS, add_debug, add_device, config_where,
                                   naming_models)
from cliplab.errors import CliplabError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cliplab eval`, its arguments and its ``--help``, to ``sub``."""
    p = sub.add_parser("eval", help="evaluate a model on a suite of tasks",
                       description="Run the tasks of a suite YAML ({tasks: [...], precision}: "
                       "zeroshot, linear_probe, few_shot, retrieval, compositional, "
                       "multilabel_zeroshot, long_tail) on a model; print the results and write "
                       "OUT/results.json.")
    p.add_argument("--config", "--suite", dest="config", required=True, metavar="YAML",
                   help="suite of tasks (copy one from configs/eval/); --suite is an alias")
    p.add_argument("--model", required=True, help=MODEL_SPECS)
    p.add_argument("--out", metavar="DIR", help="new folder to write results.json into (not a "
                   "run folder)",
                   type=os.path.expanduser)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results.json of a previous eval --out")
    p.add_argument("--head", choices=("auto", "text"), default="auto",
                   help="auto (default): a model folder's fine-tuned head.safetensors scores "
                   "the zero-shot tasks over its own classes; text: the zero-shot text head "
                   "scores every task")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="keep image features here (safetensors), reused by later "
                   "runs of the same model, data and transform")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override suite keys, e.g. precision=bf16")
    add_device(p, in_config=False)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_debug(p)


def run(args: argparse.Namespace) -> int:
    """`cliplab eval`; 0 when it succeeds (bad input raises `CliplabError`)."""
    from cliplab.config import load_config
    from cliplab.evaluate.feature_cache import FeatureCache
    from cliplab.evaluate.suite import SuiteSpec, run_suite, suite_precision
    from cliplab.evaluate.tasks import TaskContext
    from cliplab.models.fingerprints import embedding_identity
    from cliplab.models.resolve import load_model, model_record
    from cliplab.output_folder import check_cache_dir, spec_paths, write_json
    from cliplab.provenance import stamp

    suite = load_config(SuiteSpec, args.config, args.overrides)
    inputs = [args.model, *spec_paths(*(spec for task in suite.tasks
                                         for spec in task.datasets()))]
    out = _results_folder(args.out, inputs, args.overwrite)
    check_cache_dir(args.cache_dir, inputs, CliplabError)
    _check_cache_apart_from_results(args.cache_dir, out)
    # one evaluation: a set is held from its first task to its last, not through the suite
    context = TaskContext(FeatureCache(args.cache_dir), progress=not args.no_progress,
                          where=f"{config_where(args)}: tasks", hold=False)
    # the model first: its input is what the images are decoded to (a set costs that per
    # image); run_suite then lists or reads every set, and checks every task, before any encodes
    with naming_models({args.model: "--model"}):
        model = load_model(args.model, args.device)
    head = _fine_tuned_head(args.model) if args.head == "auto" else None
    if head is not None:
        context.classifier = head
    # what run_suite runs in (it says why, when that is not what the suite asks)
    precision = suite_precision(suite, context, model, warn=False)
    # the suite is its file and these overrides of it (the file alone says other sizes)
    # the folder and weights behind --model (a run folder moves on as it trains), and all the
    # embeddings depend on: a config.json or preprocessing changed in place keeps the weights
    # the file may change later: the suite that ran (overrides applied, defaults filled in)
    results = {"model": args.model, **model_record(args.model, model),
               "embedding_identity": embedding_identity(model), "suite": args.config,
               "overrides": list(args.overrides or []), "suite_ran": suite.to_dict(),
               "precision": precision,
               "head": head.label if head is not None else None,
               "results": run_suite(model, suite, context)}
    if head is not None:
        _say_head_scored(head.label, results["results"])
    stamp(results)  # the version that scored it and when, as every record cliplab writes
    # printed first: a results.json the disk refuses (full, read-only) loses no scores of a
    # suite that ran for hours
    print(json.dumps(results, indent=2), flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", results)  # atomic, as every stage writes its results
        print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return 0


def _say_head_scored(label: str, results: dict) -> None:
    """One stderr line naming the tasks the fine-tuned head ``label`` scored, if any (a suite
    without a task over its classes was told of it all the same)."""
    tasks = [name for name, result in results.items()
             if isinstance(result, dict) and result.get("classifier") == label]
    if tasks:
        print(f"eval: {', '.join(tasks)} scored by the fine-tuned head {label} (over its "
              "classes; each says so under 'classifier'); --head text scores the text head",
              file=sys.stderr)


def _fine_tuned_head(model: str):
    """The `LinearHead` of the model folder ``model`` names, if it holds a head.safetensors."""
    from cliplab.adapt.head import saved_head_classifier

    if not Path(model).expanduser().is_dir():
        return None  # a preset, a Hub id or a checkpoint file: no saved head
    return saved_head_classifier(Path(model).expanduser())


EVAL_FILES = ("results.json",)  # what eval writes into its --out


def _results_folder(out: str | None, inputs: list[str | None],
                    overwrite: bool = False) -> Path | None:
    """``--out`` of eval: a folder (made if missing) that will hold results.json: new or empty,
    or with ``overwrite`` a previous eval output (a folder of its results.json only); never a
    file, a run folder, nor an input's folder (the model's, a data folder) or inside one."""
    from cliplab.output_folder import OutputFiles, check_out, is_run_folder

    if out is None:
        return None
    path = Path(out)
    if not path.exists() and path.suffix == ".json":
        raise CliplabError(f"--out {out} names a file; choose a folder (results go to "
                           f"{path.with_suffix('')}/results.json)")
    if not path.is_file() and is_run_folder(path):
        raise CliplabError(f"--out {out} is a run folder (its results.json is the run's); "
                           f"choose a new folder for the eval results, e.g. {path}-eval")
    # no marker: a folder holding only the results.json.tmp of a failed write is eval's too
    path = check_out(path, "eval", inputs, overwrite, OutputFiles((), frozenset(EVAL_FILES)),
                     error=CliplabError)
    previous = path / "results.json"
    if overwrite and previous.is_file() and not _is_eval_results(previous):
        raise CliplabError(f"--overwrite replaces only a previous eval output; {previous} is "
                           "not an eval's results (no model, suite and results keys); choose a "
                           "new folder")
    return path


def _is_eval_results(path: Path) -> bool:
    """Whether ``path`` reads as a results.json eval wrote."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(results, dict) and {"model", "suite", "results"} <= results.keys()


def _check_cache_apart_from_results(cache_dir: str | None, out: Path | None) -> None:
    """A feature cache in (or as) eval's --out would make that folder more than its
    results.json: a later --overwrite would refuse it, and the cache would go with it."""
    if cache_dir is None or out is None:
        return
    from cliplab.output_folder import lies_inside, same_folder

    cache, results = Path(cache_dir).expanduser().resolve(), out.expanduser().resolve()
    how = "is" if same_folder(cache, results) else \
        "lies inside" if lies_inside(cache, results) else None
    if how:
        raise CliplabError(f"--cache-dir {cache_dir} {how} --out {out}; keep the cache in a "
                           "folder of its own (--out holds results.json alone)")
