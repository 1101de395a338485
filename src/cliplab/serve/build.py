"""`cliplab index`: embed a collection into an index folder, resumably.

Work happens in ``OUT.partial/``: every ``chunk`` items, the chunk's vectors (``chunks/N.npy``),
its metadata rows (SQLite, one transaction) and then ``progress.json`` are written, each
atomically. A killed run is resumed by the same command (rows and chunks past the last progress
record are dropped first); a different command is refused while the half-built folder exists.
Only when every item is embedded are the vectors gathered, the vector index built and
``index.json`` written with ``complete: true``, and the folder renamed to ``OUT``; the server
opens nothing else. The index type (and recall, memory budget) only shape that last step, so a
run that failed there is finished by the same command with another ``index_type``.

An ``--add`` starts from the index's own files: its vectors are chunk 0 as a hard link (no
copy; nothing in the work folder is written in place, so the old index a server reads never
changes), its metadata a copy, and a trained FAISS index (IVF) that keeps its type is read and
given only the new vectors (`faiss_build`).

A Milvus index gets a collection of its own (``cliplab_`` + 12 hex digits unless named), chosen
once and kept in ``progress.json``; an existing collection is never taken over, except the one
this run created (resumed). ``--add`` writes the grown index into a new collection too and drops
the old one only once the new index is complete, so until then the old index stays whole (a
killed ``--add`` leaves it serving, as a FAISS index's folder does). An ``--add`` that finds
nothing new (and asks no other index type, recall or collection) leaves the index, its files
and its collection as they were.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cliplab.config import validate
from cliplab.data.collection import (PIL_ERRORS, check_collection_path, open_collection,
                                     skip_message, skip_reason, source_spec)
from cliplab.data.images import fit_to_model
from cliplab.data.types import SkipReport, counts_text
from cliplab.errors import CliplabError, ConfigError, DataError, first_line, warn
from cliplab.evaluate.tasks.base import data_origin
from cliplab.models.embed import embed_images
from cliplab.models.fingerprints import embedding_identity
from cliplab.models.folder import model_fingerprint
from cliplab.output_folder import (atomic_path, check_out, check_writable_beside, hold,
                                   partial_path, remove_own_work, same_folder, swap_in,
                                   write_json)
from cliplab.provenance import stamp
from cliplab.serve import faiss_index
from cliplab.serve.faiss_build import finished_faiss
from cliplab.serve.folder import (CHUNKS_DIR, FAISS_FILE, FORMAT, IMAGES_DIR, INDEX_FILE,
                                  INDEX_FOLDER, META_FILE, PROGRESS_FILE, READ_FORMATS,
                                  VECTORS_FILE, read_index_json)
from cliplab.serve.index import model_difference, unchecked_identity
from cliplab.serve.settings import DEFAULT_RECALL, IndexConfig
from cliplab.serve.store import MetadataStore
from cliplab.serve.tuning_queries import tuning_queries

# keys of each skip reason index.json lists: meta.sqlite's table `skipped` holds them all,
# and a server parses index.json whole (a million broken links made it tens of MB)
SKIPPED_KEYS_LISTED = 1000


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, ".tmp.npy") as tmp:
        np.save(tmp, array)


def _model_record(cfg: IndexConfig) -> dict:
    """The model spec to record: a folder as an absolute path, a run folder as the model folder
    of its newest checkpoint (the one embedded; later checkpoints hold other weights)."""
    spec = cfg.model.to_dict()
    path = Path(spec["name"]).expanduser()
    if path.exists():  # a folder: remember where, from anywhere
        from cliplab.models.resolve import model_folder
        from cliplab.runs import CHECKPOINTS

        folder = model_folder(path) if (path / CHECKPOINTS).is_dir() else path
        spec["name"] = str(folder.resolve())
    return spec


def build_index(cfg: IndexConfig | dict, progress: bool = True, model=None) -> dict:
    """Embed ``cfg.data`` with ``cfg.model`` into ``cfg.out`` (append with ``cfg.add``); resume a
    killed run of the same command. Returns the written ``index.json`` record, plus
    ``already_indexed``: how many items of ``cfg.data`` the index held already (not added),
    and ``skipped_now``: this run's skipped items by reason (the record counts the index's).
    ``cfg`` may be a dict of `IndexConfig` keys (validated: bad keys are a `ConfigError`)."""
    from cliplab.models.resolve import load_model

    if isinstance(cfg, dict):
        cfg = validate(IndexConfig, cfg, "the index config")
    elif not isinstance(cfg, IndexConfig):
        raise ConfigError(f"build_index config must be an IndexConfig or a dict of index keys "
                          f"(model, data, out, ...), not {type(cfg).__name__}")
    out = Path(cfg.out).expanduser().resolve()
    try:
        spec = source_spec(cfg.data)
    except ConfigError as err:  # an option of a built-in source's spec
        raise ConfigError(f"data: {err}") from None
    if "path" in spec:  # recorded resolved: an --add from another folder finds it the same
        spec["path"] = str(Path(spec["path"]).expanduser().resolve())
    check_collection_path(spec)  # before OUT.partial is made
    for key in ("path",):
        if key in spec and same_folder(Path(spec[key]).resolve(), out):
            raise ConfigError(f"--out {out} is the collection's own folder; write the index elsewhere")
    check_writable_beside(out)  # OUT.partial is made beside it
    hold(out)
    # --overwrite: built as a new index, which replaces the old one once complete
    replaced = _replaced_index(out, [cfg.model.name, spec.get("path")]) if cfg.overwrite \
        else None
    existing = read_index_json(out) if out.is_dir() and not cfg.overwrite else None
    if out.exists() and not cfg.add and not cfg.overwrite:
        what = "an index" if existing else "a file or folder"
        stopped = " (an --add to it stopped before its end: the same command with --add " \
            f"finishes it from {partial_path(out)})" if existing and \
            (partial_path(out) / PROGRESS_FILE).is_file() else ""
        how = "pass --add to append to it or --overwrite to replace it" if existing else \
            "pass --add to append to an index"
        raise ConfigError(f"--out {out} already exists ({what}){stopped}; {how}, or choose a "
                          "new --out")
    if cfg.add and existing is None and not partial_path(out).exists():
        raise ConfigError(f"--add: {out} does not exist; an --add appends to an index built "
                          "there (leave --add out to build one)" if not out.exists() else
                          f"--add: {out} is not a complete index to append to")
    if cfg.add and existing is not None:
        _check_appendable(out)
    if cfg.uri:  # as typed (a recorded one of an older index may hold them: it still opens)
        from cliplab.serve.milvus_index import check_no_credentials

        check_no_credentials(cfg.uri)
    cfg = _resolve_settings(cfg, existing, out)
    if cfg.uri and cfg.backend != "milvus":
        raise ConfigError("--uri is where a Milvus index lives; add --backend milvus (the "
                          "default backend, faiss, keeps its index in --out)")
    if cfg.collection and cfg.backend != "milvus":
        raise ConfigError(f"collection={cfg.collection} names a Milvus collection; add "
                          "--backend milvus, or leave it out (a faiss index lives in --out)")
    if cfg.backend == "milvus" and not cfg.uri:
        raise ConfigError("--backend milvus needs --uri (./file.db for Milvus Lite, "
                          "http://HOST:19530 for a server)")
    if cfg.backend == "milvus":
        from cliplab.serve.milvus_index import normalise_uri

        # a bad URI fails before the embedding, not after
        cfg = cfg.model_copy(update={"uri": normalise_uri(cfg.uri)})
        if cfg.index_type != "auto":
            raise ConfigError(f"--index-type {cfg.index_type} is for the FAISS backend; Milvus "
                              "indexes with FLAT (Milvus Lite) or AUTOINDEX (a server): leave "
                              "it out with --backend milvus")
        tuned = [key for key in ("recall", "max_memory_gb")
                 if getattr(cfg, key) != IndexConfig.model_fields[key].default]
        if tuned:
            one = len(tuned) == 1
            raise ConfigError(f"{' and '.join(tuned)} tune{'s' * one} the FAISS index's type "
                              "and search breadth; Milvus indexes with FLAT or AUTOINDEX: leave "
                              f"{'it' if one else 'them'} out with --backend milvus")
        _check_reachable(cfg.uri, (existing or {}).get("milvus", {}).get("collection"))
    model = model if model is not None else load_model(cfg.model, cfg.device)
    if cfg.backend == "faiss":  # a bad index type fails before the embedding, not after
        faiss_index.empty_faiss(model.embed_dim, faiss_index.choose_index_type(
            faiss_index.EXACT_BELOW, model.embed_dim, cfg.index_type))
    fingerprint, identity = model_fingerprint(model), embedding_identity(model)
    differs = model_difference(existing, fingerprint, identity) if existing else None
    if differs:
        raise ConfigError(f"--add: {out} was built with model {existing['model']['name']} "
                          f"({existing['fingerprint'][:19]}); this one has {differs}: add with "
                          "that model, or rebuild the index")
    unchecked = unchecked_identity(existing, out) if existing else None
    if unchecked:  # what embedded the index is not known to be this: none is recorded
        warn(f"index: {unchecked}")
        identity = None
    # index_type, recall and max_memory_gb shape only the finishing step: not part of the
    # request, so a run that failed there is finished with another index type
    request = {"model": _model_record(cfg), "fingerprint": fingerprint,
               "embedding_identity": identity,
               "data": spec, "add": cfg.add, "backend": cfg.backend, "uri": cfg.uri,
               "collection": cfg.collection}
    if existing is not None and spec["source"] == "manifest":
        _refuse_moved_rows(spec, out, key_prefix(spec, existing))
    work = partial_path(out)
    finished = read_index_json(work) if work.is_dir() else None
    if finished and finished.get("complete") and not (work / PROGRESS_FILE).exists():
        # killed after finishing, before the rename: put in place only what this command asks
        other = _another_request(finished, request, existing)
        if other and not cfg.overwrite:
            raise ConfigError(f"{work} is a complete index of another `cliplab index` run "
                              f"({other}) that stopped before it was moved to {out}: rerun "
                              "that command to put it in place, delete the folder, or pass "
                              "--overwrite to build this one instead")
        if other:  # --overwrite: that index goes, with the collection it made
            shutil.rmtree(work)
            _drop_replaced_collection(finished, {})
        else:
            done = MetadataStore(work / META_FILE, readonly=True)
            try:
                skipped_now, recovered = _skips_since(done, _earlier_skips(out, existing))
            finally:
                done.close()
            shutil.rmtree(work / CHUNKS_DIR, ignore_errors=True)  # a kill came before _finish's
            swap_in(work, out)
            _drop_replaced_collection(existing or replaced, finished)
            return {**finished, "already_indexed": 0,
                    "skipped_now": skip_counts(skipped_now), "recovered": recovered}
    named = cfg.backend == "milvus" and request["collection"] is not None
    resumable = (work / PROGRESS_FILE).is_file()
    if named and not resumable:  # a named collection: refused before the work folder is made
        _check_collection(cfg.uri, {"collection": request["collection"]})
    state = _open_work(work, out, request, existing, cfg.overwrite)
    if named and resumable:  # refused unless this run created it
        _check_collection(cfg.uri, state)
    store = MetadataStore(work / META_FILE)
    before = MetadataStore(out / META_FILE, readonly=True) if existing else None
    refused = unchanged = False
    try:
        if state["phase"] == "embedding":
            try:
                _embed_collection(cfg, model, spec, work, store, state, progress,
                                  key_prefix(spec, existing), before)
            except CliplabError:  # before its first item: a source that cannot be read
                refused = state["position"] == 0  # nothing to resume, no folder to leave
                raise
        unchanged = _adds_nothing(state, existing, out) and \
            not _asks_other_settings(cfg, existing)
        if not unchanged:
            record = _finish(cfg, work, store, state, request, existing, model, progress)
            # an --add's skipped table holds the index's earlier ones (less those it indexed)
            skipped_now, recovered = _skips_since(store, before.skipped() if before else [])
    finally:
        store.close()
        if before is not None:
            before.close()
        if refused:
            shutil.rmtree(work, ignore_errors=True)
    if unchanged:  # the index's files and Milvus collection stay as they were
        shutil.rmtree(work)
        already = state.get("already_indexed", 0)
        return {**existing, "unchanged": True, "already_indexed": already,
                "skipped_before": state["position"] - already, "skipped_now": {}}
    swap_in(work, out)
    _drop_replaced_collection(existing or replaced, record)
    return {**record, "already_indexed": state.get("already_indexed", 0),
            "skipped_now": skip_counts(skipped_now), "recovered": recovered}


def _replaced_index(out: Path, inputs: list[str | None]) -> dict | None:
    """The record of the index ``--overwrite`` replaces at ``out`` (None when there is none, or
    its index.json is damaged), after the rule every command's ``--overwrite`` follows
    (`check_out`): a folder holding anything but an index's files (`INDEX_FOLDER`) is refused,
    untouched."""
    if not out.exists():
        return None
    check_out(out, "index", inputs, overwrite=True, previous=INDEX_FOLDER)
    try:
        return read_index_json(out)
    except DataError:  # a damaged index is replaced all the same
        return None


def _earlier_skips(out: Path, existing: dict | None) -> list[tuple[str, str]]:
    """The skipped entries of the index ``out`` an ``--add`` adds to (none for a new one)."""
    if existing is None:
        return []
    before = MetadataStore(out / META_FILE, readonly=True)
    try:
        return before.skipped()
    finally:
        before.close()


def _skips_since(store: MetadataStore, earlier: list[tuple[str, str]]
                 ) -> tuple[list[tuple[str, str]], int]:
    """This run's skipped entries (those not among ``earlier``, the index's before an
    ``--add``) and how many of ``earlier`` it has indexed since (gone from the table)."""
    now = store.skipped()
    old, held = {key for key, _ in earlier}, {key for key, _ in now}
    return [row for row in now if row[0] not in old], sum(key not in held for key in old)


def _adds_nothing(state: dict, existing: dict | None, out: Path) -> bool:
    """Whether an ``--add`` (to the index ``out``) whose items are all read found none that is
    new, to index or to list as skipped: a re-run that finds nothing new (from cron, say)
    leaves the index as it is, rather than rebuilding it (a Milvus one into a new collection)
    to hold the same."""
    return existing is not None and state["count"] == existing["count"] and \
        state["skipped"] == _skipped_rows(out / META_FILE) and \
        not state.get("collection_created")


def _asks_other_settings(cfg: IndexConfig, existing: dict) -> bool:
    """Whether an ``--add`` asks the index to be built otherwise than it is (another index
    type, recall target or Milvus collection): built again then, though nothing is new."""
    return cfg.index_type != (existing.get("index_type") or "auto") or \
        cfg.collection is not None or \
        cfg.recall != (existing.get("faiss") or {}).get("recall_target", cfg.recall)


def _grown_sources(sources: list[dict], spec: dict) -> list[dict]:
    """``sources`` of an index after ``spec`` was added to it: each source once, in the order
    first added; one added again (its size options aside, as `key_prefix` tells sources
    apart) keeps its place with the spec it was last read by (``n=40`` after ``n=10``)."""
    grown: dict[str, dict] = {}
    for source in [*sources, spec]:
        grown[_source_identity(source)] = source  # a key keeps its first place
    return list(grown.values())


def _another_request(finished: dict, request: dict, existing: dict | None) -> str | None:
    """How the complete index ``finished`` (an ``OUT.partial`` left by a kill before its
    rename) was asked for otherwise than ``request`` (model, data, backend), or None."""
    if finished.get("fingerprint") != request["fingerprint"]:
        return f"model {finished['model']['name']}"
    if finished.get("sources") != _grown_sources((existing or {}).get("sources", []),
                                                 request["data"]):
        return f"data {data_origin((finished.get('sources') or [{}])[-1], None)}"
    if finished.get("backend") != request["backend"] or \
            (finished.get("milvus") or {}).get("uri") != request["uri"]:
        return f"backend {finished.get('backend')}"
    return None


def _check_appendable(out: Path) -> None:
    """An ``--add`` appends only to an index ``serve`` would open: a damaged one, or one of a
    format this version does not know, is refused naming what is wrong (it was rewritten as
    format 1, or failed with a traceback)."""
    from cliplab.serve.index import SearchIndex

    try:
        index = SearchIndex(out, search=False)  # its FAISS file is read once, by the --add
        index.close()
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a value of a wrong type
        raise DataError(f"--add: {out}/index.json is damaged ({first_line(err)}); rebuild the "
                        "index with `cliplab index`") from None
    except DataError as err:
        raise DataError(f"--add: {err}") from None
    sources = index.record.get("sources", [])  # what an --add's keys are told apart by
    if not isinstance(sources, list) or not all(isinstance(spec, dict) for spec in sources):
        raise DataError(f"--add: {out}/index.json: sources must be a list of data specs, not "
                        f"{sources!r}; the index is damaged, rebuild it with `cliplab index`")


def _resolve_settings(cfg: IndexConfig, existing: dict | None, out: Path) -> IndexConfig:
    """``cfg`` with backend, uri and index_type as this run uses them: for a new index faiss
    and auto; for ``--add`` the index's own, refusing a backend or Milvus URI other than the
    index's. A Milvus collection left None is named in `_open_work` (``--add`` too: the old
    collection is dropped only once the new one is complete)."""
    if existing is None:
        backend = cfg.backend or "faiss"
        return cfg.model_copy(update={"backend": backend, "index_type": cfg.index_type or "auto",
                                      **_faiss_settings(backend, cfg, None)})
    backend = existing["backend"]
    if cfg.backend not in (None, backend):
        raise ConfigError(f"--add: {out} is a {backend} index; --backend {cfg.backend} would "
                          "leave its vectors behind: leave --backend out, or build a new index")
    # an index from before index_type was recorded: auto again, as its --add always chose (its
    # recorded factory would pin e.g. Flat however large it grows)
    index_type = existing.get("index_type") or "auto"
    update = {"backend": backend, "index_type": cfg.index_type or index_type,
              **_faiss_settings(backend, cfg, existing)}
    if backend == "milvus":
        from cliplab.serve.milvus_index import normalise_uri

        old = existing["milvus"]
        if cfg.uri is not None and normalise_uri(cfg.uri) != old["uri"]:
            raise ConfigError(f"--add: {out} keeps its vectors in Milvus at {old['uri']}, not "
                              f"{cfg.uri}: leave --uri out, or build a new index")
        if cfg.collection == old["collection"]:
            raise ConfigError(f"--add: collection={cfg.collection} is the one {out} serves now; "
                              "--add fills a new collection and drops that one once the index "
                              "is complete: name another, or leave collection out")
        update.update(uri=old["uri"])
    return cfg.model_copy(update=update)


def _faiss_settings(backend: str, cfg: IndexConfig, existing: dict | None) -> dict:
    """A FAISS index's ``recall`` and ``max_memory_gb``: the ones asked, else those an
    ``--add``'s index was built with (an index tuned to 0.99 was tuned to 0.95 by an --add; an
    IVF-PQ of a budget became an IVF-Flat over it), else `DEFAULT_RECALL` and none (half the
    RAM); nothing for Milvus (which refuses either given)."""
    if backend != "faiss":
        return {}
    own = (existing or {}).get("faiss") or {}
    budget = cfg.max_memory_gb or own.get("max_memory_gb")
    return {"recall": cfg.recall or own.get("recall_target") or DEFAULT_RECALL,
            **({"max_memory_gb": budget} if budget else {})}


def _check_collection(uri: str, state: dict, milvus=None) -> None:
    """Refuse a Milvus collection that exists but was not created by this run (resumed)."""
    from cliplab.serve.milvus_index import MilvusVectors

    name = state["collection"]
    if state.get("collection_created"):
        return
    client = milvus or MilvusVectors(uri, name)
    try:
        taken = client.exists()
    finally:
        if milvus is None:
            client.close()
    if taken:
        raise ConfigError(f"collection={name} already exists at {uri} (another index's?); "
                          "name another collection, or leave it out for a fresh one")


def _check_reachable(uri: str, collection: str | None) -> None:
    """Connect to the Milvus at ``uri`` once before the embedding: a server that cannot be
    reached, a missing pymilvus or a Milvus Lite file another process holds fail in seconds,
    not after hours of embedding. An --add's (the index's ``collection`` given): a Milvus Lite
    file that is gone (moved) is refused, not made anew."""
    from cliplab.serve.milvus_index import MilvusVectors

    MilvusVectors(uri, collection or "", must_exist=collection is not None).close()


def _drop_replaced_collection(existing: dict | None, record: dict) -> None:
    """After ``--add``: drop the replaced index's Milvus collection if the new index has
    another one."""
    old = (existing or {}).get("milvus")
    if old and old["collection"] != (record.get("milvus") or {}).get("collection"):
        from cliplab.serve.milvus_index import MilvusVectors

        milvus = MilvusVectors(old["uri"], old["collection"])
        try:
            milvus.drop()
        finally:
            milvus.close()


def _drop_stopped_collection(work: Path, state: dict) -> None:
    """Drop the Milvus collection the stopped run in ``work`` (its progress ``state``) created,
    before the folder goes: no folder would name it after. A Milvus Lite file that is gone took
    it along; a Milvus that cannot be reached refuses the run, the folder kept."""
    if not state.get("collection_created"):
        return
    from cliplab.serve.milvus_index import MilvusVectors, is_remote, normalise_uri

    uri, name = normalise_uri(state["request"]["uri"]), state["collection"]
    if not is_remote(uri) and not Path(uri).exists():
        return
    try:
        milvus = MilvusVectors(uri, name)
    except DataError as err:
        raise DataError(f"{work} is a stopped run that created Milvus collection {name}, "
                        f"dropped before the folder goes: {err}") from None
    try:
        milvus.drop()
    finally:
        milvus.close()


def _open_work(work: Path, out: Path, request: dict, existing: dict | None,
               overwrite: bool = False) -> dict:
    """The progress state of ``work``: resumed if it holds this request, fresh if absent (or,
    with ``overwrite``, if it holds another request's)."""
    state_file = work / PROGRESS_FILE
    if work.exists() and state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if state.get("format") not in READ_FORMATS:  # its keys may mean other things
            raise ConfigError(f"{state_file}: format {state.get('format')!r}, not "
                              f"{' or '.join(map(str, READ_FORMATS))} (another cliplab's?); "
                              "resume it with the cliplab that stopped it, or delete the folder")
        nothing_embedded = state["position"] == 0 and state["chunks"] == state["base_chunks"]
        saved = state["request"]
        if "towers" in saved:  # its name in a run an older cliplab stopped (format 1)
            saved["embedding_identity"] = saved.pop("towers")
        saved.setdefault("embedding_identity", request["embedding_identity"])  # none kept then
        if state["request"] != request and not nothing_embedded and not overwrite:
            if {**state["request"], "fingerprint": None, "embedding_identity": None} == \
                    {**request, "fingerprint": None, "embedding_identity": None}:
                raise ConfigError(
                    f"{work} is a half-built index of this command, but model "
                    f"{request['model']['name']} embeds otherwise since it was stopped (other "
                    "weights, preprocessing, tokenizer or settings): its items would mix two "
                    "models; delete the folder to start over")
            raise ConfigError(
                f"{work} is a half-built index of another `cliplab index` run (model "
                f"{state['request']['model']['name']}, data {state['request']['data']}); rerun "
                "that command to resume it, or delete the folder to start over")
        if state["request"] == request:
            _drop_unrecorded(work, state)
            if not nothing_embedded:  # said, as pretrain says "resumed from step N"
                print(f"index: resuming the stopped run in {work} ({state['count']} items "
                      "embedded)", file=sys.stderr)
            return state
    if state_file.is_file():  # another request that embedded nothing yet (or --overwrite)
        _drop_stopped_collection(work, state)
        shutil.rmtree(work)
    else:  # stopped before its first progress record (or a user's folder of that name)
        # (the progress.json.tmp of a first record that failed to write is ours too)
        remove_own_work(work, "index",
                        (CHUNKS_DIR, IMAGES_DIR, META_FILE, PROGRESS_FILE + ".tmp"))
    (work / CHUNKS_DIR).mkdir(parents=True)
    (work / IMAGES_DIR).mkdir()
    collection = request["collection"]
    if collection is None and request["backend"] == "milvus":  # chosen once, kept on resume
        from cliplab.serve.milvus_index import new_collection_name

        collection = new_collection_name()
    state = {"format": FORMAT, "request": request, "phase": "embedding", "position": 0,
             "count": 0, "skipped": 0, "already_indexed": 0, "chunks": 0, "base_chunks": 0,
             "collection": collection, "collection_created": False}
    if existing is not None:  # --add: start from a copy of the complete index
        shutil.copy2(out / META_FILE, work / META_FILE)
        _link_or_copy(out / VECTORS_FILE, work / CHUNKS_DIR / f"{0:06d}.npy")
        shutil.rmtree(work / IMAGES_DIR)
        _link_tree(out / IMAGES_DIR, work / IMAGES_DIR)
        state.update(count=existing["count"], skipped=_skipped_rows(work / META_FILE),
                     chunks=1, base_chunks=1)
    write_json(state_file, state)
    return state


def _skipped_rows(meta: Path) -> int:
    """How many entries the table ``skipped`` of the metadata file ``meta`` lists (progress
    states count rows; index.json counts lost samples, a shard read in part apart)."""
    store = MetadataStore(meta, readonly=True)
    try:
        return store.skipped_count()
    finally:
        store.close()


def _link_or_copy(src: Path, dst: Path) -> None:
    """``src`` at ``dst`` too: a hard link (no copy of an index's vectors or images), or a
    copy where the file system has none. Safe for the old index a server reads: no file of a
    work folder is written in place (each is written anew and renamed in), so a linked file
    stays as it was."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=_link_or_copy) if src.is_dir() else dst.mkdir()


def _drop_unrecorded(work: Path, state: dict) -> None:
    """Remove what a killed run wrote after its last progress record."""
    store = MetadataStore(work / META_FILE)
    store.truncate(state["count"], state["skipped"])
    store.close()
    for chunk in (work / CHUNKS_DIR).iterdir():
        if not chunk.name.endswith(".npy") or ".tmp" in chunk.name or \
                int(chunk.name.split(".")[0]) >= state["chunks"]:
            chunk.unlink()
    for image in (work / IMAGES_DIR).iterdir():
        if ".tmp" in image.name or int(image.stem) >= state["count"]:
            image.unlink()


def key_prefix(spec: dict, existing: dict | None) -> str:
    """What the keys of ``spec``'s items start with: nothing for the index's first source (and
    for adding it again, whose items are then already indexed); the source in full for any
    other, so two folders' ``IMG_0001.jpg`` (or two seeds' ``shapes#1``) are two items."""
    sources = (existing or {}).get("sources") or []
    if not sources or _source_identity(sources[0]) == _source_identity(spec):
        return ""
    first = sources[0].get("path")
    if first is not None and not Path(first).expanduser().is_absolute() \
            and not Path(first).expanduser().exists():
        # indexes before 2026-12-03 recorded the path as typed: from another folder the same
        # collection would be a second source, every item indexed twice
        raise ConfigError(f"--add: the index records its first source as the relative path "
                          f"{first!r} (an older index), which is not here: run --add from the "
                          "folder the index was built in, or rebuild the index")
    return _source_identity(spec) + "|"


# options saying how many of a source's items to read, not which: `shapes` with n=10 is the
# first 10 items of n=40
_SIZE_OPTIONS = ("n", "limit", "progress")


def _source_identity(spec: dict) -> str:
    """A source spec as one string, its path resolved (``photos`` and ``./photos/`` are one)
    and its size options left out."""
    spec = {k: v for k, v in spec.items() if k not in _SIZE_OPTIONS}
    if "path" in spec:
        spec["path"] = str(Path(spec["path"]).expanduser().resolve())
        return spec.pop("path") + ("" if len(spec) <= 1 else json.dumps(spec, sort_keys=True))
    return json.dumps(spec, sort_keys=True, default=str)


def _embed_collection(cfg: IndexConfig, model, spec: dict, work: Path, store: MetadataStore,
                      state: dict, progress: bool, prefix: str = "",
                      before: MetadataStore | None = None) -> None:
    """Embed the items past ``state["position"]`` chunk by chunk. Items ``before`` (the index
    ``--add`` appends to) holds are counted in ``already_indexed``, not listed as skipped; a
    key is listed in the skipped table once, however often it is read."""
    total, items = open_collection(spec, progress=progress)
    items = itertools.islice(items, state["position"], None)
    recorded = {key for key, _ in store.skipped()}

    def skip(key: str, reason: str) -> None:  # into this chunk's `skipped`, once per key
        if key not in recorded:
            recorded.add(key)
            skipped.append((key, reason))

    bar = tqdm(desc=f"index {spec.get('path', spec['source'])}", unit="img", disable=not progress,
               initial=state["position"], total=total)
    # a chunk holds each image as the model takes it, not as the file is (a 12 MP photo: 36 MB)
    model_input = getattr(model, "preprocess_config", None)
    while True:
        chunk = list(itertools.islice(items, cfg.chunk))
        if not chunk:
            break
        for item in chunk:
            item.key = prefix + item.key
        keys = [item.key for item in chunk]
        known = store.has_keys(keys)
        indexed = before.has_keys(keys) if before is not None else set()
        rows, images, skipped = [], [], []
        for item in chunk:
            if item.key in indexed:
                continue
            if item.key in known:  # indexed from an earlier item of this collection
                skip(item.key, f"duplicate_key: {item.key} is also an earlier item's key")
                continue
            known.add(item.key)
            try:
                image = item.read()
            except PIL_ERRORS as err:
                reason = skip_reason(err)
                # a manifest row's key counts data rows; its file line is where to look
                line = item.location.get("line")
                at = f"{Path(item.location['manifest']).name} {line}: " if line else ""
                skip(item.key, f"{reason}: {at}{skip_message(err)}")
                continue
            item_id = state["count"] + len(rows)
            location = item.location
            if model_input is not None and "stored" not in location:  # files, as eval reads them
                image = fit_to_model(image, model_input)
            if "stored" in location:  # an in-memory source: keep its image with the index
                rel = f"{IMAGES_DIR}/{item_id}.png"
                with atomic_path(work / rel) as tmp:
                    image.save(tmp, format="PNG")
                location = {"stored": rel}
            rows.append({"id": item_id, "key": item.key, "caption": item.caption,
                         "location": location, "meta": item.meta})
            images.append(image)
        if rows:
            _save_npy(work / CHUNKS_DIR / f"{state['chunks']:06d}.npy",
                      embed_images(model, images, cfg.batch_size))
        store.add(rows, skipped)
        state.update(position=state["position"] + len(chunk), count=state["count"] + len(rows),
                     skipped=state["skipped"] + len(skipped),
                     already_indexed=state.get("already_indexed", 0) + sum(
                         item.key in indexed for item in chunk),
                     chunks=state["chunks"] + (1 if rows else 0))
        write_json(work / PROGRESS_FILE, state)
        bar.update(len(chunk))
    bar.close()
    state["phase"] = "finishing"
    write_json(work / PROGRESS_FILE, state)


def _refuse_moved_rows(spec: dict, out: Path, prefix: str) -> None:
    """Before an ``--add`` of a manifest embeds anything: its items are keyed by row number and
    image (``NAME:ROW:IMAGE``), so a row inserted, removed or moved above the manifest's end
    would re-key every row below it and index each of their images again, silently twice. A
    new key whose row the index holds (indexed, or skipped) with another image is refused,
    naming both."""
    start = prefix + Path(spec["path"]).name + ":"
    _, items = open_collection(spec, progress=False)  # rows only: no image is read
    before = MetadataStore(out / META_FILE, readonly=True)
    try:
        # a skipped row (a missing file) holds its number too: removing it shifts the rest
        skipped = {key[:key.find(":", len(start)) + 1]: key for key, _ in before.skipped()
                   if key.startswith(start)}
        for chunk in iter(lambda: [prefix + item.key for item in itertools.islice(items, 500)],
                          []):
            indexed = before.has_keys(chunk)
            for key in (key for key in chunk if key not in indexed and key.startswith(start)):
                row = key[:key.find(":", len(start)) + 1]
                held = before.key_starting(row) if row.endswith(":") else None
                if held is None and skipped.get(row, key) != key:
                    held = skipped[row]
                if held is not None:
                    number, manifest = row[len(start):-1], Path(spec["path"]).name
                    raise DataError(
                        f"--add: {manifest} row {number} is {key[len(row):]!r} now, but the "
                        f"index holds row {number} as {held[len(row):]!r}: rows were inserted, "
                        "removed or reordered since it was indexed, and an --add knows a "
                        "manifest's rows by their number (it takes rows appended at the end); "
                        "rebuild the index with `cliplab index`")
    finally:
        before.close()


def _gather_vectors(work: Path, state: dict, dim: int) -> np.ndarray:
    """The chunks' vectors written into ``VECTORS_FILE`` one chunk at a time and returned
    memory-mapped (read from disk as they are used): the collection is never held twice over
    (a list of chunks and their concatenation, then the index's copy: 2.4 times the vectors)."""
    chunks = [np.load(work / CHUNKS_DIR / f"{i:06d}.npy", mmap_mode="r")
              for i in range(state["chunks"])]
    count = sum(len(chunk) for chunk in chunks)
    if count != state["count"] or any(chunk.shape[1:] != (dim,) for chunk in chunks):
        raise DataError(f"{work}: {count} vectors for {state['count']} rows of dimension "
                        f"{dim}; the half-built index is damaged, delete it and run again")
    with atomic_path(work / VECTORS_FILE, ".tmp.npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, dim))
        start = 0
        for chunk in chunks:
            out[start:start + len(chunk)] = chunk
            start += len(chunk)
        out.flush()
        del out
    return np.load(work / VECTORS_FILE, mmap_mode="r")


def _finish(cfg: IndexConfig, work: Path, store: MetadataStore, state: dict, request: dict,
            existing: dict | None, model, progress: bool = True) -> dict:
    """Gather vectors, build the backend's index (an approximate one's search breadth tuned
    on image and text queries) and write ``index.json`` (complete); with ``progress`` each
    phase is told on stderr (minutes at millions of vectors, after the last bar)."""
    def phase(text: str) -> None:
        if progress:
            print(f"index: {text}", file=sys.stderr, flush=True)

    if existing is not None:  # an --add may have indexed what the index skipped before
        store.drop_recovered_skips()
        state["skipped"] = store.skipped_count()
    if state["count"] == 0:
        raise DataError(f"nothing to index: every item of {data_origin(request['data'], None)}"
                        f" was skipped ({_skip_summary(store)}); delete {work} after fixing the "
                        "data")
    vectors = _gather_vectors(work, state, model.embed_dim)
    record = {"format": FORMAT, "complete": True, "model": request["model"],
              "fingerprint": request["fingerprint"],
              "embedding_identity": request["embedding_identity"],
              "dim": int(vectors.shape[1]), "count": state["count"],
              "skipped": skip_report(store.skipped()).to_dict(SKIPPED_KEYS_LISTED),
              "backend": cfg.backend,
              "index_type": cfg.index_type, "build": _build_id(existing),
              "sources": _grown_sources((existing or {}).get("sources", []),
                                        request["data"])}
    if cfg.backend == "faiss":
        budget = int(cfg.max_memory_gb * (1 << 30)) if cfg.max_memory_gb else None
        factory = faiss_index.choose_index_type(len(vectors), vectors.shape[1], cfg.index_type, budget)
        # an --add's index is read from the old folder (never written: the new one is
        # written here)
        old_file = Path(cfg.out).expanduser().resolve() / FAISS_FILE
        index, record["faiss"] = finished_faiss(
            vectors, factory, cfg.recall, existing, old_file,
            lambda: tuning_queries(model, store, vectors), phase)
        faiss_index.write_faiss(index, work / FAISS_FILE)
        if cfg.max_memory_gb:  # kept by an --add, which chooses the type again
            record["faiss"]["max_memory_gb"] = cfg.max_memory_gb
    else:
        from cliplab.serve.milvus_index import MilvusVectors

        phase(f"inserting {state['count']} vectors into Milvus collection {state['collection']}")
        milvus = MilvusVectors(cfg.uri, state["collection"])
        try:
            _check_collection(cfg.uri, state, milvus)
            if not state.get("collection_created"):  # recorded first: a resumed run knows it
                state["collection_created"] = True
                write_json(work / PROGRESS_FILE, state)
            milvus.create(vectors.shape[1])
            milvus.insert(np.arange(state["count"]), vectors)
        finally:
            milvus.close()
        record["milvus"] = {"uri": cfg.uri, "collection": state["collection"]}
    write_json(work / INDEX_FILE, stamp(record))
    (work / PROGRESS_FILE).unlink()  # from here on the folder is complete (see build_index)
    shutil.rmtree(work / CHUNKS_DIR)
    return record


def _build_id(existing: dict | None) -> str:
    """The id of an index as built from scratch, kept by each ``--add`` (which keeps its stored
    images): a server tells a folder rebuilt in place under it from one grown."""
    return (existing or {}).get("build") or uuid.uuid4().hex[:16]


def skip_counts(skipped: list[tuple[str, str]]) -> dict[str, int]:
    """Skipped ``(key, reason)`` rows counted by reason (``unreadable_image``,
    ``truncated_shard``, ``duplicate_key``)."""
    return dict(Counter(reason.split(":")[0] for _, reason in skipped))


def skip_report(skipped: list[tuple[str, str]]) -> SkipReport:
    """Skipped ``(key, reason)`` rows as every command's skip record (by reason, each key)."""
    report = SkipReport()
    for key, reason in skipped:
        report.add(reason.split(":")[0], key)
    return report


def _skip_summary(store: MetadataStore) -> str:
    return counts_text(skip_counts(store.skipped())) or "nothing read"
