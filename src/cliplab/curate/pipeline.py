"""`cliplab curate`: read a pool, run the configured steps in order, write the kept pool, the
table of every dropped item with its reason, ``summary.json`` and the report.

Work happens in ``OUT.partial/`` and is resumable:

- ``state.json``: the request (the config minus output-neutral keys such as ``workers``); a
  different request on an existing partial folder is refused (or cleared with ``overwrite``);
- ``cache/pool/N.json``: chunk ``N`` of the pool as read (records + the items dropped at
  ``read`` + a stamp of each source file its records were read from, checked on resuming),
  ``cache/pool/done.json`` once the whole source is read; ``cache/images/``: PNGs of an
  in-memory source's images;
- ``cache/steps/NN-name/N.npz``: the columns step ``NN`` mapped for chunk ``N``;
  ``cache/steps/NN-name/inputs.json``: a stamp of the files its spec names, taken as it started
  (a resume after one changed is refused);
- ``steps/NN-name/decision.json``: the step's finished decision; ``steps/NN-name/work/``: what
  the step built (its `StepContext.work`), kept in the output.

The run holds per item only its key, caption and source key (`PoolIndex`): a chunk's records
are loaded from ``cache/pool/N.json`` when a step maps it, the report shows one of its items or
the kept pool is written, and dropped rows are held as Arrow columns.

A killed run, re-run with the same config, maps only chunks without a columns file and decides
only steps without a decision. When everything is written the cache is removed and the folder
renamed to ``OUT``. Sources are only ever read.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from cliplab.config import changed_key_paths, validate, value_at
from cliplab.curate.config import CurateConfig, step_name
from cliplab.curate.engine import LazyChunks, load_columns, map_chunks
from cliplab.curate.inputs import changed_input, stamp_inputs
from cliplab.curate.ray_engine import check_cluster, ray_session
from cliplab.curate.outputs import ROWS_AT_ONCE, DroppedTable, write_kept
from cliplab.curate.pool import changed_source, read_item, stamp_sources
from cliplab.curate.pool_index import KeptRecords, Picked, PoolIndex, chunk_path, read_chunk
from cliplab.curate.report import StepShown, shown_step, write_report
from cliplab.curate.steps.base import Decision, PoolItems, StepContext, StepSpecBase
from cliplab.curate.steps.registry import make_step, step_spec
from cliplab.data.collection import check_collection_path, open_collection
from cliplab.data.sources import with_paths_resolved
from cliplab.errors import CliplabError, ConfigError, DataError, ModelError, warn
from cliplab.extras import installed
from cliplab.output_folder import (check_apart_from_inputs, check_writable_beside, hold,
                                   missing_out, partial_path, remove_own_work, spec_paths, swap_in,
                                   write_json, write_json_streamed)
from cliplab.output_lock import check_no_run_inside, is_left_lock
from cliplab.provenance import stamp

FORMAT = 1
READ_STEP = "read"
READ_MEMORY = 200_000  # images remembered as readable at once (some tens of MB of keys)
# keys that change how the run goes or what the report shows, not which items are kept
NEUTRAL_KEYS = ("out", "workers", "engine", "ray_address", "examples", "device")
INPUTS = "inputs.json"  # in a step's cache folder: the stamps of the files its spec names


def run_curation(config: CurateConfig | dict, out: str | os.PathLike | None = None,
                 progress: bool = True, overwrite: bool = False, where: str = "") -> dict:
    """Curate ``config.data`` into ``out`` (default ``config.out``); resume a killed run of the
    same config. Returns the summary (also written as ``OUT/summary.json``). ``config`` may be
    a plain dict (checked as a config file is). ``where`` names the config in errors about its
    keys found after loading (``cu.yaml``; empty: none)."""
    if not isinstance(config, CurateConfig):
        config = validate(CurateConfig, config, "the curate config")
    if out is None and not config.out:
        raise missing_out("the curated pool")
    out = Path(out if out is not None else config.out).expanduser().resolve()
    check_apart_from_inputs(out, spec_paths(config.data))  # sources are never written to
    _check_out(out, overwrite)
    check_collection_path(config.data)  # before OUT.partial is made
    _check_packages(config)  # before the models: resolving one may reach the Hub
    if config.engine == "ray":
        check_cluster(config.ray_address)  # a cluster nothing answers at, before any work
    step_models = _step_models(config, where)
    work = partial_path(out)
    request = {k: v for k, v in config.to_dict().items() if k not in NEUTRAL_KEYS}
    if _finished_request(work) == request:  # killed after finishing, before the rename
        return _move_into_place(work, out)
    _open_work(work, request, overwrite, step_models, config.steps)

    try:
        pool, dropped_read, read_seconds = _read_pool(config, work, progress)
    except CliplabError:  # a source that cannot be read
        if not chunk_path(work / "cache" / "pool", 0).is_file():
            shutil.rmtree(work, ignore_errors=True)  # nothing read: nothing to resume
        raise
    n_pool = len(pool) + len(dropped_read)
    summary_steps = [{"name": READ_STEP, "step": READ_STEP, "in": n_pool,
                      "kept": n_pool - len(dropped_read), "dropped": len(dropped_read),
                      "seconds": round(read_seconds, 3)}]
    dropped = DroppedTable()  # the rows of dropped.parquet, as Arrow columns
    dropped.add_rows(dropped_read)
    alive = [np.ones(n, dtype=bool) for n in pool.sizes]
    with ray_session(config.engine):  # a Ray it starts ends with the curation
        decisions = _run_steps(config, pool, alive, dropped, summary_steps, work, progress)

    kept = KeptRecords(pool, alive)  # loaded a chunk at a time as they are written
    if not len(kept):
        warn(nothing_kept_warning(summary_steps))
    source = with_paths_resolved(config.data)  # names it when read from elsewhere
    outputs = write_kept(kept, work, config.output, source, progress)
    dropped.write(work / "dropped.parquet")
    summary = {"format": FORMAT, "data": source, "pool": n_pool, "kept": len(kept),
               "dropped": dropped.count, "steps": summary_steps, "output": outputs}
    stamp(summary)
    write_report(work, summary, decisions, dropped_read=dropped_read,
                 examples=config.examples, out=out)
    (work / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False),
                                      encoding="utf-8")
    write_json(work / "summary.json", summary)  # a partial folder with it is complete
    return _move_into_place(work, out)


def _finished_request(work: Path) -> dict | None:
    """The request of the finished run in ``work`` (its summary written, not yet renamed to
    ``OUT``), None when ``work`` holds no finished run."""
    if not (work / "summary.json").is_file() or not (work / "config.yaml").is_file():
        return None
    saved = yaml.safe_load((work / "config.yaml").read_text(encoding="utf-8"))
    return _paths_resolved({k: v for k, v in saved.items() if k not in NEUTRAL_KEYS})


def _paths_resolved(request: dict) -> dict:
    """A saved request with its steps' paths resolved, as loading a config now resolves them
    (`resolved_path`): a run stopped before that, whose request kept ``entries.txt`` as
    written, is still the run of its unchanged config resumed from the same folder."""
    steps = request.get("steps")
    if not isinstance(steps, list):
        return request
    resolved = []
    for step in steps:
        try:
            resolved.append(step_spec(step, "").to_dict())
        except CliplabError:  # not this version's step: it differs from the config's anyway
            resolved.append(step)
    return {**request, "steps": resolved}


def _move_into_place(work: Path, out: Path) -> dict:
    """Drop a finished run's cache and resume record, rename it to ``out``; its summary.
    Every step is safe to repeat: a kill anywhere here is finished by the next run."""
    shutil.rmtree(work / "cache", ignore_errors=True)
    (work / "state.json").unlink(missing_ok=True)
    swap_in(work, out)
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def nothing_kept_warning(steps: list[dict]) -> str:
    """The line told when a run keeps no item, naming the step that dropped the last ones."""
    last = next(s for s in steps if s["kept"] == 0)
    return (f"curate: nothing was kept: {last['name']} dropped the last "
            f"{last['dropped']} item(s); the output holds 0 items")


def _check_packages(config: CurateConfig) -> None:
    """Every package the steps (`StepSpecBase.packages`) and the engine import is installed,
    before any work: a missing one surfaced only once the pool was read, leaving a partial
    folder behind."""
    needs = [(f"steps[{i}] ({step_name(spec)}): {what}", module, "curate")
             for i, spec in enumerate(config.steps) for module, what in spec.packages().items()]
    if config.engine == "ray":
        needs.append(("engine: ray", "ray", "ray"))
    for who, module, extra in needs:
        if not installed(module):
            raise ConfigError(f"{who} needs {module}, which is not installed: "
                              f"pip install 'cliplab[{extra}]'")


def _step_models(config: CurateConfig, where: str = "") -> dict[str, dict]:
    """Every step's model found before any work (a misspelt one surfaced only after the pool
    was read and the steps before it ran, leaving a partial folder of that config behind):
    ``{"steps[i]": {"path": folder it resolved to, "files": its files' stamp}}``, what a
    resumed run checks its steps' cached scores against (presets are built, not read).
    An unknown model is named by its config (``where``) and key, as other commands name it."""
    from cliplab.models.folder import files_stamp
    from cliplab.models.presets import PRESETS
    from cliplab.models.resolve import resolve_model_path
    from cliplab.models.spec import model_spec

    found = {}
    for index, spec in enumerate(config.steps):
        model = getattr(spec, "model", None)
        if model is None or model_spec(model).name in PRESETS:
            continue
        try:
            path = resolve_model_path(model).expanduser().resolve()
        except ModelError as err:
            key = f"steps[{index}].model ({step_name(spec)})"
            raise ConfigError(f"{where}: {key}: {err}" if where else f"{key}: {err}") from None
        found[f"steps[{index}]"] = {"path": str(path), "files": files_stamp(path)}
    return found


def _check_out(out: Path, overwrite: bool) -> None:
    check_writable_beside(out)  # OUT.partial is made beside it
    hold(out)
    if not out.exists():
        return
    if not overwrite:
        raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it, or "
                          "choose a new --out")
    check_no_run_inside(out)
    if out.is_dir() and not (out / "summary.json").is_file() and \
            any(not is_left_lock(p) for p in out.iterdir()):  # a killed run's lock: cliplab's
        raise ConfigError(f"--out {out} is a folder that is not a `cliplab curate` output; "
                          "--overwrite only replaces those, choose a new --out")
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder")


def _open_work(work: Path, request: dict, overwrite: bool, step_models: dict[str, dict],
               steps: Sequence[StepSpecBase] = ()) -> None:
    state = work / "state.json"
    finished = _finished_request(work) is not None
    if work.exists() and state.is_file() and not finished:
        recorded = json.loads(state.read_text(encoding="utf-8"))
        saved = _paths_resolved(recorded["request"])
        # its steps' cached scores came from the models as they were then
        changed = _model_changed(recorded.get("step_models", step_models), step_models)
        # and their decisions from the files their specs name
        stale = _input_changed(work, steps) if saved == request else None
        read = any((work / "cache" / "pool").glob("*.json"))
        if saved == request and changed is None and stale is None:
            if read:  # as pretrain says it resumed
                print(f"curate: resuming the stopped run in {work} (what it finished is kept)",
                      file=sys.stderr)
            return
        if saved == request and read and not overwrite and changed is not None:
            raise ConfigError(f"{work} is a stopped run whose {changed} since it stopped: its "
                              "scores would mix two models; pass --overwrite to start over")
        if saved == request and read and not overwrite:
            raise DataError(f"{work} is a stopped run whose {stale}: resumed, its decision "
                            "would rest on the file as it was; pass --overwrite to start over")
        # a run stopped before reading its first chunk (e.g. a bad source option) holds nothing
        if saved != request and read and not overwrite:
            raise ConfigError(f"{work} is a half-finished `cliplab curate` run of another config "
                              f"({_changes(saved, request)}); rerun that config to resume it, "
                              "or pass --overwrite to start over")
    if finished and not overwrite:
        raise ConfigError(f"{work} is a finished `cliplab curate` run of another config "
                          f"({_changes(_finished_request(work), request)}), not yet moved to "
                          "--out; rerun that config to move it, or pass --overwrite")
    if state.is_file() or finished:
        shutil.rmtree(work)
    else:  # no state: a folder of that name is ours only if it holds just our cache (and the
        # state.json.tmp of a first write that failed)
        remove_own_work(work, "curate", ("cache", "state.json.tmp"))
    (work / "cache" / "pool").mkdir(parents=True)
    write_json(state, {"format": FORMAT, "request": request, "step_models": step_models})


def _step_folder(index: int, spec: StepSpecBase) -> str:
    return f"{index:02d}-{step_name(spec)}"


def _input_changed(work: Path, steps: Sequence[StepSpecBase]) -> str | None:
    """How a file a started step of the stopped run in ``work`` read changed since (its
    ``inputs.json`` stamps), e.g. "steps[0] (balance) read a file that changed since (FILE
    holds other bytes now)", or None when none did (or no step started)."""
    for index, spec in enumerate(steps):
        record = work / "cache" / "steps" / _step_folder(index, spec) / INPUTS
        if not record.is_file():
            continue
        changed = changed_input(json.loads(record.read_text(encoding="utf-8")),
                                spec.input_paths())
        if changed is not None:
            return (f"steps[{index}] ({step_name(spec)}) read a file that changed since "
                    f"({changed})")
    return None


def _model_changed(then: dict[str, dict], now: dict[str, dict]) -> str | None:
    """How a step's model differs from a stopped run's (it resolves elsewhere, or its files
    changed), e.g. "steps[1].model now resolves to ...", or None when none does."""
    for step, model in now.items():
        before = then.get(step)
        if before is None or before == model:
            continue
        if before["path"] != model["path"]:
            return f"{step}.model now resolves to {model['path']}, not {before['path']},"
        return f"{step}.model ({model['path']}) has files rewritten, replaced or re-permissioned"
    return None


def _changes(saved: dict, now: dict, shown: int = 3) -> str:
    """``steps.1.keep_top 0.3 in the run, now 0.5; ...``: how this config differs from a
    run's (the first ``shown`` keys)."""
    paths = changed_key_paths(saved, now)
    told = [f"{path} {_brief(value_at(saved, path))} in the run, now "
            f"{_brief(value_at(now, path))}" for path in paths[:shown]]
    more = len(paths) - shown
    return "; ".join(told) + (f"; and {more} more key{'s' * (more != 1)}" if more > 0 else "")


def _brief(value: Any, width: int = 40) -> str:
    """A value as a change names it: a list (steps of another count) by its length."""
    if isinstance(value, list):
        return f"[{len(value)} item{'s' * (len(value) != 1)}]"
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _read_pool(config: CurateConfig, work: Path, progress: bool
               ) -> tuple[PoolIndex, list[dict], float]:
    """The pool (its chunks indexed, their records left in their cache files), the items
    dropped at ``read`` and the seconds it took (chunks already read by a killed run are
    indexed, not read again)."""
    folder = work / "cache" / "pool"
    done = folder / "done.json"
    count = 0
    while chunk_path(folder, count).is_file():
        count += 1
    counted = json.loads(done.read_text(encoding="utf-8"))["chunks"] if done.is_file() else count
    if counted != count:
        raise DataError(f"{folder} is damaged: {done.name} counts {counted} chunks, {count} "
                        f"are there; delete {work} to start this run over")
    if done.is_file():
        _check_sources(folder, count, config.data, work)
    else:
        size = config.chunk_size
        total, items = open_collection(config.data, progress=progress)
        items = iter(items)
        if count:
            _skip_read(items, count * size, chunk_path(folder, count - 1), config.data, work)
            _check_sources(folder, count, config.data, work)
        bar = tqdm(desc="read pool", unit="item", disable=not progress, initial=count * size,
                   total=total)
        number = count * size
        readable: set[tuple] = set()  # image files decoded once, however many rows name them
        while True:
            start = time.perf_counter()
            chunk = list(itertools.islice(items, size))
            if not chunk:
                break
            if len(readable) > READ_MEMORY:
                readable.clear()
            records, dropped = [], []
            for item in chunk:
                record, reason = read_item(item, number, work, readable)
                number += 1
                if record is None:
                    dropped.append({"key": item.key, "step": READ_STEP, "reason": reason,
                                    "score": math.nan, "source_key": _source_key(item.meta)})
                else:
                    records.append(record)
            write_json(chunk_path(folder, count), {"records": records, "dropped": dropped,
                                                      "seconds": time.perf_counter() - start,
                                                      "last_key": chunk[-1].key,
                                                      "sources": stamp_sources(records)},
                       indent=None)  # a record per item: compact
            count += 1
            bar.update(len(chunk))
        bar.close()
        write_json(done, {"chunks": count})
    pool, dropped, seconds = PoolIndex(folder, _source_key), [], 0.0
    for c in range(count):
        data = read_chunk(folder, c)
        pool.add_chunk(data["records"])
        dropped += [{**d, "score": math.nan} for d in data["dropped"]]
        seconds += data["seconds"]
    if not count:
        raise DataError(f"the pool {config.data} holds no items")
    return pool, dropped, seconds


def _source_key(meta) -> str | None:
    """The item a pool item was made from, as its metadata records it: a shard sample's
    ``source_key`` (`cliplab data shard` writes the original file or manifest row there), so
    a drop over shards names the user's file, not only ``00000.tar:000000006``; else None."""
    key = meta.get("source_key") if isinstance(meta, dict) else None
    return None if key is None else str(key)


def _check_sources(folder: Path, count: int, source: dict, work: Path) -> None:
    """Refuse to resume when a source file the stopped run's ``count`` chunks were read from
    changed since (by its `stamp_sources` stamp: a stat, no reading): the steps would decide
    on the file as it was, and the later steps and the kept pool read it as it is now."""
    stamps: dict[str, list[int]] = {}
    for c in range(count):
        stamps.update(read_chunk(folder, c)
                      .get("sources", {}))  # none: a chunk of an older version
    changed = changed_source(stamps)
    if changed is not None:
        raise DataError(f"{source.get('path') or source}: the source changed since the stopped "
                        f"run read it ({changed}): resumed, its items would be decided on and "
                        f"written partly as they were, partly as they are; delete {work} to "
                        "start over")


def _skip_read(items, n: int, last_chunk: Path, source: dict, work: Path) -> None:
    """Skip the ``n`` items a stopped run read, checking that the last of them is the one its
    last chunk ended with: files added to or removed from the source since, before that point,
    would shift the reading on (items read twice or never)."""
    skipped = None
    for skipped in itertools.islice(items, n):
        pass
    ended = json.loads(last_chunk.read_text(encoding="utf-8")).get("last_key")
    found = skipped.key if skipped is not None else None
    if ended is not None and found != ended:  # None: a chunk of an older version
        now = f"{found} there" if found is not None else f"fewer than {n} items"
        raise DataError(f"{source.get('path') or source}: the source changed since the stopped "
                        f"run read it (the last of the {n} items it read was {ended}; the source "
                        f"now has {now}): resumed, items would be read twice or never; delete "
                        f"{work} to start over")


def _run_relative(value, work: Path):
    """``value`` (a step's report) with every path inside ``work`` made relative to it: the
    folder is renamed to ``OUT`` when done, and a path into ``OUT.partial`` would lead nowhere."""
    if isinstance(value, dict):
        return {k: _run_relative(v, work) for k, v in value.items()}
    if isinstance(value, list):
        return [_run_relative(v, work) for v in value]
    if isinstance(value, str) and value.startswith(f"{work}{os.sep}"):
        return str(Path(value).relative_to(work))
    return value


def _run_steps(config: CurateConfig, pool: PoolIndex, alive: list[np.ndarray],
               dropped: DroppedTable, summary_steps: list[dict], work: Path,
               progress: bool) -> list[StepShown]:
    """Run every step on the items still alive (``alive`` updated in place), adding each drop
    to ``dropped`` and each step's counts to ``summary_steps``; returns what the report shows
    of each (its per-item reasons let go once in ``dropped``)."""
    shown: list[StepShown] = []
    for index, spec in enumerate(config.steps):
        name = step_name(spec)
        folder = _step_folder(index, spec)
        reached = pool.alive_items(alive)  # pool positions
        decision, seconds = _run_step(config, spec, folder, pool, alive, reached, work,
                                      progress)
        flat = iter(decision.keep)
        for c in range(len(alive)):
            for i in np.flatnonzero(alive[c]):
                alive[c][i] = next(flat)
        gone = np.flatnonzero(~decision.keep)
        for at in range(0, len(gone), ROWS_AT_ONCE):  # (at once: ~250 bytes a drop as lists)
            part = gone[at:at + ROWS_AT_ONCE]
            dropped.add([pool.keys[reached[i]] for i in part], name,
                        [decision.reasons[i] for i in part],
                        [float(decision.scores[i]) if decision.scores is not None else math.nan
                         for i in part], [pool.source_keys[reached[i]] for i in part])
        summary_steps.append({"name": name, "step": spec.step, "in": len(reached),
                              "kept": int(decision.keep.sum()),
                              "dropped": int((~decision.keep).sum()),
                              "seconds": round(seconds, 3)})
        shown.append(shown_step(name, decision, Picked(pool.keys, reached),
                                lambda at, reached=reached: pool.records_at(reached[at]),
                                config.examples))
        decision.reasons = []  # in dropped (each item's: ~200 characters at millions)
    return shown


def _run_step(config: CurateConfig, spec, folder: str, pool: PoolIndex,
              alive: list[np.ndarray], reached: np.ndarray, work: Path, progress: bool
              ) -> tuple[Decision, float]:
    """The decision of one step: the saved one, or prepare → map (missing chunks) → decide
    (``reached``: the pool positions of the items alive, in order)."""
    step_dir = work / "steps" / folder
    saved = step_dir / "decision.json"
    if saved.is_file():
        data = json.loads(saved.read_text(encoding="utf-8"))
        if len(data["keep"]) != len(reached):
            raise DataError(f"{saved} decides on {len(data['keep'])} items, {len(reached)} "
                            "reach the "
                            f"step; delete {work} to start this run over")
        scores = None if data["scores"] is None else np.array(data["scores"], dtype=float)
        return Decision(keep=np.array(data["keep"], dtype=bool), reasons=data["reasons"],
                        scores=scores, threshold=data["threshold"],
                        report=data["report"]), data["seconds"]
    start = time.perf_counter()
    step_dir.mkdir(parents=True, exist_ok=True)  # also for a step no item reached
    cache = work / "cache" / "steps" / folder
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / INPUTS).is_file():  # before prepare reads them
        write_json(cache / INPUTS, stamp_inputs(spec.input_paths()))
    # views into the pool's columns: a list of each per step held ~16 bytes an item
    items = PoolItems(keys=Picked(pool.keys, reached), captions=Picked(pool.captions, reached))
    # the chunks an item reaches, each loaded when mapped (not the whole pool at once)
    reaching = LazyChunks({c: int(a.sum()) for c, a in enumerate(alive) if a.any()},
                          lambda c: pool.alive_records(c, alive[c]))
    if not items.keys:
        decision = Decision(keep=np.zeros(0, dtype=bool), reasons=[])
    else:
        step = make_step(spec)
        (step_dir / "work").mkdir(parents=True, exist_ok=True)
        step.prepare(StepContext(work=step_dir / "work", seed=config.seed, progress=progress,
                                 device=config.step_device()))
        engine = map_chunks
        if config.engine == "ray":
            from cliplab.curate.ray_engine import map_chunks_ray, start_ray

            start_ray(config.ray_address, config.workers)
            engine = map_chunks_ray
        engine(step, reaching, lambda c: cache / f"{c:06d}.npz", work, config.workers,
               desc=folder, progress=progress)
        parts = [load_columns(cache / f"{c:06d}.npz") for c in sorted(reaching)]
        columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        del parts  # (held with the whole columns through decide: ~70 bytes an item more)
        if progress:  # decide is global (k-means, balancing): minutes at millions, no bar
            print(f"curate: {folder}: deciding on {len(items)} items", file=sys.stderr,
                  flush=True)
        decision = step.decide(items, columns)
        if len(decision.keep) != len(items):
            raise DataError(f"step {folder}: decided on {len(decision.keep)} items, "
                            f"{len(items)} reached it")
    seconds = time.perf_counter() - start
    decision.report = _run_relative(decision.report, work)
    write_json_streamed(saved, {"keep": decision.keep.tolist(), "reasons": decision.reasons,
                                "scores": None if decision.scores is None else
                                [float(s) for s in np.asarray(decision.scores, dtype=float)],
                                "threshold": decision.threshold, "report": decision.report,
                                "seconds": seconds})  # a list per item: no line per entry
    return decision, seconds
