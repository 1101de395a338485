"""An opened, complete index: the model check, vector search with paging, metadata, images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cliplab.errors import CliplabError, DataError, ModelError
from cliplab.serve import faiss_index
from cliplab.output_folder import partial_path
from cliplab.output_lock import holder_of
from cliplab.serve.folder import (FAISS_FILE, FORMAT, INDEX_FILE, META_FILE, PROGRESS_FILE,
                                  READ_FORMATS, VECTORS_FILE, current_record, read_index_json)
from cliplab.models.fingerprints import embedding_identity, identity_difference
from cliplab.models.folder import files_stamp, model_fingerprint
from cliplab.serve.store import MetadataStore


# what every complete index.json holds (and "faiss" or "milvus", its backend's settings)
RECORD_KEYS = ("model", "fingerprint", "dim", "count", "skipped", "backend")
BACKENDS = ("faiss", "milvus")


class IndexReplaced(DataError):
    """The opened index's folder holds another index now (rebuilt in place): its stored
    images are that index's, not the ones the open index's captions describe."""


class SearchIndex:
    """A complete index folder opened for search. ``search`` returns ``(scores, ids)``."""

    def __init__(self, path: str | Path, search: bool = True):
        """Open the index at ``path``, checked whole (a ``DataError`` names what is damaged);
        ``search=False`` checks it without loading the FAISS index or connecting to Milvus
        (an ``--add`` reads it again itself)."""
        self.path = Path(path).expanduser().resolve()
        # taken before the record is read: a folder swapped in meanwhile is seen as newer
        self.stamp = index_stamp(self.path)
        self.record = _complete_record(self.path)
        self._seen: tuple = (self.stamp, None)  # index.json, its build
        self.store = MetadataStore(self.path / META_FILE, readonly=True)
        self.backend = self.record["backend"]
        self._milvus = None
        try:  # a refused index leaves no open connection behind (sqlite, Milvus)
            self.store.check()
            rows = self.store.count()
            if rows != self.count:
                raise DataError(f"{self.path / META_FILE}: holds {rows} items, "
                                f"index.json says {self.count}; the index is damaged, rebuild it "
                                "with `cliplab index`")
            self.vectors = _read_vectors(self.path / VECTORS_FILE, self.count,
                                         int(self.record["dim"]))  # [N, D], by id
            if search:
                self._open_backend()
        except CliplabError:
            self.close()
            raise

    def _open_backend(self) -> None:
        if self.backend == "faiss":
            self._faiss = faiss_index.read_faiss(self.path / FAISS_FILE)
            if (self._faiss.ntotal, self._faiss.d) != self.vectors.shape:
                raise DataError(f"{self.path / FAISS_FILE}: holds {self._faiss.ntotal} vectors of "
                                f"{self._faiss.d} dimensions, the index {self.count} of "
                                f"{self.vectors.shape[1]}; the index is damaged, rebuild it "
                                "with `cliplab index`")
            faiss_index.set_search_parameter(self._faiss, self.record["faiss"].get("value"))
            return
        from cliplab.serve.milvus_index import MilvusVectors

        where = self.record["milvus"]
        self._milvus = MilvusVectors(where["uri"], where["collection"], must_exist=True)
        if not self._milvus.exists():
            raise DataError(f"Milvus collection {where['collection']} at {where['uri']} does "
                            f"not exist (dropped, or replaced by an `index --add` of a copy of "
                            f"{self.path}); rebuild the index")
        self._milvus.load()
        found = self._milvus.count()
        if found != self.record["count"]:
            raise DataError(f"Milvus collection {where['collection']} at {where['uri']} holds "
                            f"{found} vectors, the index {self.path} {self.record['count']}; "
                            "rebuild the index")

    def backend_problem(self) -> str | None:
        """What keeps the open index from searching (its Milvus collection dropped since it was
        opened), or None."""
        if self._milvus is not None and not self._milvus.exists():
            from cliplab.serve.milvus_index import gone_message

            return gone_message(self._milvus.collection, self._milvus.uri)
        return None

    @property
    def count(self) -> int:
        return int(self.record["count"])

    @property
    def fingerprint(self) -> str:
        return self.record["fingerprint"]

    def check_model(self, model) -> None:
        """Refuse a model that does not embed as the one the index was built with: other
        weights or, same weights, other preprocessing, tokenizer or tower settings."""
        differs = embeds_otherwise(self.record, model)
        if not differs:
            return
        name = self.record["model"]["name"]
        # an ONNX export and the model it was made from: not "other weights" (the same weights,
        # run by onnxruntime; int8: quantized), yet each a model of its own to an index, as
        # their fingerprints are: never accepted for the other, said as what it is
        export = export_of(model, self.fingerprint)
        if export:
            raise ModelError(f"{self.path} was built with model {name}; the given model "
                             f"{model.path} is {export} of that model, which an index counts as "
                             "a model of its own: serve the index with the model it was built "
                             f"with, or build an index with the export (cliplab index --model "
                             f"{model.path} ...)")
        export = export_of(_export_record(name), model_fingerprint(model))
        if export:
            raise ModelError(f"{self.path} was built with model {name}, {export} of the given "
                             "model, which an index counts as a model of its own: serve the "
                             "index with that export, or build an index with the given model")
        raise ModelError(f"{self.path} was built with model {name} ({self.fingerprint[:19]}...); "
                         f"the given model has {differs}: search it with the same model or "
                         "rebuild the index")

    def search(self, queries: np.ndarray, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids ``[Q, k]`` of hits ``offset .. offset+k-1`` (id -1 where none).
        ``queries`` are ``[Q, D]`` embeddings (NumPy or torch) of the index's model; one vector
        ``[D]`` is one query. ``k >= 1`` and ``offset >= 0``; else an `InputError`."""
        queries = faiss_index.search_queries(
            queries, k, offset, int(self.record["dim"]),
            f"index {self.path} (model {self.record['model'].get('name')})")
        if self.backend == "faiss":
            return faiss_index.search(self._faiss, queries, k, offset, self.vectors)
        return self._milvus.search(queries, k, offset, self.vectors)

    def vector(self, item_id: int) -> np.ndarray:
        """The stored unit embedding of ``item_id``."""
        return np.asarray(self.vectors[int(item_id)], dtype=np.float32)

    def items(self, ids) -> dict[int, dict]:
        return self.store.get_many([int(i) for i in ids if i >= 0])

    def image_source(self, row: dict) -> dict:
        """Where row's image is: ``{"file": abs path}`` or ``{"tar", "offset", "size"}``;
        stored images resolve inside the index folder only."""
        loc = dict(row["location"])
        if "stored" in loc:
            replaced = self.replaced()
            if replaced:
                raise IndexReplaced(replaced)
            return {"file": str(self.path / loc["stored"])}
        return loc

    def replaced(self) -> str | None:
        """What to say when the folder holds another index now than the one opened (rebuilt
        in place; an ``--add`` grows the same one, its stored images kept), else None. Known by
        the ``build`` id index.json keeps: an index built before it was kept is not checked."""
        build = self.record.get("build")
        if build is None:
            return None
        stamp, found = self._seen
        now = index_stamp(self.path)
        if now != stamp or found is None:  # read again only when index.json was replaced
            try:
                now_record = read_index_json(self.path)
            except (DataError, OSError):  # half-written or gone: the image's own check says
                now_record = None
            found = now_record.get("build", build) if isinstance(now_record, dict) else build
            self._seen = (now, found)
        if found == build:
            return None
        return (f"the index {self.path} was rebuilt since this server opened it: its stored "
                "images are the new index's; the server serves that one once it has loaded it")

    def close(self) -> None:
        """Close the metadata and Milvus connections and let go of the vectors' mapping and
        the FAISS index (their memory, and a deleted index folder's disk space, are returned
        even while something still holds this object)."""
        self.store.close()
        if self._milvus is not None:
            self._milvus.close()
        self.vectors = self._faiss = self._milvus = None


def model_difference(record: dict, fingerprint: str, identity: dict) -> str | None:
    """How a model of weights ``fingerprint`` and `embedding_identity` ``identity`` would
    embed otherwise than the model of the index ``record``, named (e.g. "other weights"), or
    None when it embeds alike. An index written before identities were kept is checked by the
    weights alone."""
    if fingerprint != record["fingerprint"]:
        return f"other weights ({fingerprint[:19]}...)"
    recorded = record.get("embedding_identity")
    differs = identity_difference(recorded, identity) if isinstance(recorded, dict) else None
    return f"the same weights but another {differs}" if differs else None


def export_of(model_or_record, fingerprint: str) -> str | None:
    """What an ONNX export is ("an fp32 ONNX export", "an int8 ONNX export") when it was made
    from the weights of ``fingerprint`` as its record says (``model_or_record``: the loaded
    export, `OnnxEncoder`, or its ``onnx_export.json``), else None."""
    meta = getattr(model_or_record, "meta", model_or_record)
    source = meta.get("source") if isinstance(meta, dict) else None
    if not isinstance(source, dict) or source.get("fingerprint") != fingerprint:
        return None
    return f"an {meta.get('quantize') or 'fp32'} ONNX export"


def _export_record(name: str) -> dict | None:
    """The ``onnx_export.json`` of the model folder ``name`` when it is an ONNX export (and
    still there), else None."""
    from cliplab.models.onnx_export import EXPORT_FILE

    try:
        record = json.loads((Path(name) / EXPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def unchecked_identity(record: dict, path) -> str | None:
    """What to say of an index written before the preprocessing and tokenizer of its model
    were recorded (only its weights can be checked), or None for a newer one."""
    if (record.get("embedding_identity") or {}).get("version"):
        return None
    return (f"{path} keeps no record of its model's preprocessing and tokenizer (an older "
            "index): only the weights were checked, and image searches may differ from what "
            "this cliplab would embed; rebuild it to have them checked")


def embeds_otherwise(record: dict, model) -> str | None:
    """`model_difference` of a loaded model against the index ``record``."""
    return model_difference(record, model_fingerprint(model), embedding_identity(model))


def _check_not_being_built(index: Path) -> None:
    """Refuse the half-built ``index`` as one a `cliplab index` run still builds, if one holds
    it (it was said to be stopped, to be run again: that run would be refused)."""
    holder = holder_of(index)
    if holder is not None and not holder.sure:
        raise DataError(f"{index} is not built yet, and {holder.lock} is another user's lock file "
                        f"({holder.who}), which this user cannot open to see whether their "
                        "`cliplab index` run builds it now; ask them")
    if holder is not None:
        raise DataError(f"{index} is not built yet: a `cliplab index` run ({holder.who}) is "
                        "building it now; serve it once that run ends")


def _complete_record(path: Path) -> dict:
    """``index.json`` of a complete index, else a clear refusal (half-built, missing, damaged)."""
    if path.name.endswith(".partial") or (path / PROGRESS_FILE).exists():
        _check_not_being_built(path.with_name(path.name.removesuffix(".partial")))
        raise DataError(f"{path} is a half-built index (its `cliplab index` run was stopped); "
                        "run the same `cliplab index` command again to resume it")
    record = read_index_json(path) if path.is_dir() else None
    if record is None:
        if partial_path(path).exists():
            _check_not_being_built(path)
            raise DataError(f"{path} is not built yet: {partial_path(path)} holds a stopped "
                            "`cliplab index` run; run the same command again to resume it")
        if not path.exists():
            raise DataError(f"{path} does not exist; give the folder `cliplab index --out` "
                            "wrote")
        raise DataError(f"{path} is not an index (no {INDEX_FILE}); build one with "
                        "`cliplab index --model M --data SOURCE --out INDEX`")
    # a format-1 record reads as FORMAT (`read_index_json`)
    if not isinstance(record, dict) or not record.get("complete") or \
            record.get("format") != FORMAT:
        other = isinstance(record, dict) and record.get("format") != FORMAT
        why = ("not a JSON object" if not isinstance(record, dict) else
               f"format {record.get('format')!r}, not {' or '.join(map(str, READ_FORMATS))}: "
               "another cliplab's?" if other
               else '"complete" is not true: an index still being written, or stopped')
        todo = "open it with the cliplab that wrote it, or " if other else ""
        raise DataError(f"{path / INDEX_FILE}: not the record of a complete index ({why}); "
                        f"{todo}rebuild it with `cliplab index`")
    backend = record.get("backend")
    needed = (*RECORD_KEYS, backend) if backend in BACKENDS else RECORD_KEYS
    missing = [key for key in needed if key not in record]
    if missing or backend not in BACKENDS:
        what = f"lacks {missing[0]}" if missing else f"names an unknown backend {backend!r}"
        raise DataError(f"{path / INDEX_FILE}: {what}; the index is damaged, rebuild it with "
                        "`cliplab index`")
    for name in (META_FILE, VECTORS_FILE) + ((FAISS_FILE,) if backend == "faiss" else ()):
        if not (path / name).is_file():
            raise DataError(f"{path}: {name} is missing; the index is damaged, rebuild it")
    return record


def index_stamp(folder: Path) -> str | None:
    """`files_stamp` of the ``index.json`` in ``folder``: one stat, which changes whenever
    `cliplab index` puts another complete index in place (its folder is swapped in whole);
    None while there is none (gone, or between the two renames of a swap)."""
    try:
        return files_stamp(folder / INDEX_FILE)
    except OSError:
        return None


def _read_vectors(path: Path, count: int, dim: int) -> np.ndarray:
    """The stored embeddings ``[count, dim]``, memory-mapped; a ``DataError`` if damaged."""
    try:
        vectors = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError):
        raise DataError(f"{path}: not a readable NumPy array; the index is damaged, rebuild it "
                        "with `cliplab index`") from None
    if vectors.shape != (count, dim):
        raise DataError(f"{path}: holds an array of shape {vectors.shape}, not {count} vectors "
                        f"of {dim}; the index is damaged, rebuild it with `cliplab index`")
    return vectors


def _tuned_recall(faiss: dict) -> str:
    """"recall@10 1.000 on held-out image queries, 0.980 on caption queries" (an index built
    before text queries were tuned on: "recall@10 0.990 on held-out queries")."""
    recalls = faiss.get("recalls") or {"": faiss["recall"]}
    kinds = {"images": "image ", "captions": "caption ", "objects": "object-name "}
    return "recall@10 " + ", ".join(
        f"{recall:.3f} on {'held-out ' if i == 0 else ''}{kinds.get(key, key)}queries"
        for i, (key, recall) in enumerate(recalls.items()))


def image_only_tuning(record: dict) -> str | None:
    """A warning for an approximate FAISS index whose breadth was tuned on image queries only
    (built before text queries were tuned on: no ``recalls``), else None."""
    faiss = record.get("faiss") or {}
    if not faiss.get("parameter") or "recalls" in faiss:
        return None
    return (f"its {faiss['parameter']}={faiss['value']} was tuned on image queries only (an "
            "index built by an older cliplab); text queries may find fewer of their true "
            "neighbours: build it again with `cliplab index` to tune it on its captions too")


def describe(record: dict) -> str:
    """One line for the CLI: count, model, backend and search settings."""
    backend = record["backend"]
    how = (f"FAISS {record['faiss']['type']}" + (
        f", {record['faiss']['parameter']}={record['faiss']['value']} "
        f"({_tuned_recall(record['faiss'])})"
        if record["faiss"].get("parameter") else "")) if backend == "faiss" else \
        f"Milvus {record['milvus']['collection']} at {record['milvus']['uri']}"
    count, skipped = record["count"], current_record(record)["skipped"]["total"]
    return (f"{count} item{'s' * (count != 1)} ({skipped} skipped), model "
            f"{record['model']['name']}, {how}")


__all__ = ["IndexReplaced", "SearchIndex", "describe", "image_only_tuning", "index_stamp"]
