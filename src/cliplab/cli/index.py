"""`cliplab index`: embed a collection into a search index."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cliplab.cli.arguments import (MODEL_SPECS, add_common, add_data_argument, add_debug,
                                   add_device, check_out_is_not_input, data_spec, given_by,
                                   naming_models, out_required)
from cliplab.errors import ConfigError, warn


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cliplab index`, its arguments and its ``--help``, to ``sub``."""
    p = sub.add_parser("index", help="embed an image collection into a search index (FAISS or "
                       "Milvus)",
                       description="Embed every image of a collection (an image folder, a "
                       "manifest, a shard folder or a built-in source) with a model, and write "
                       "an index folder: vectors, metadata in SQLite, the model's fingerprint. "
                       "Unreadable images are skipped and listed; a stopped run resumes when "
                       "the same command is run again. key=value overrides set config keys "
                       "(index_type=hnsw, recall=0.99, batch_size=32, data.n=500, "
                       "collection=NAME for a Milvus collection of that name instead of a "
                       "fresh one). Config keys: model, data, out, add, overwrite, backend, uri, "
                       "collection, index_type, recall, max_memory_gb, batch_size, chunk, "
                       "device (configs/index/collection.yaml lists each at its default).")
    add_common(p, "index_type=hnsw batch_size=32")
    p.add_argument("--model", help=MODEL_SPECS)
    add_data_argument(p)
    p.add_argument("--out", metavar="INDEX", help="index folder to write",
                   type=os.path.expanduser)
    p.add_argument("--add", action="store_true", default=None,
                   help="append the collection to an existing index (keeping its backend, "
                   "Milvus URI and index type; a Milvus index moves to a fresh collection, the "
                   "old one dropped once the index is complete); with nothing new to add (and "
                   "no other index_type, recall or collection asked) the index is left as it was")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing index at --out (one holding nothing but an index's "
                   "files; the old one stays until the new one is complete, and a Milvus "
                   "index's collection is dropped then) or a stopped run of another command; "
                   "not with --add")
    p.add_argument("--backend", choices=("faiss", "milvus"),
                   help="vector store (default faiss; with --add the index's own)")
    p.add_argument("--uri", help="Milvus: ./file.db (Milvus Lite) or http://HOST:19530, "
                   "credentials in $CLIPLAB_MILVUS_TOKEN (with --add the index's own)")
    p.add_argument("--index-type", metavar="T",
                   help="FAISS: auto (default; with --add the index's own), "
                   "flat, hnsw, ivf-flat, ivf-pq or a FAISS factory string")
    add_device(p)
    add_debug(p)


def run(args: argparse.Namespace) -> int:
    """`cliplab index`; 0 when it succeeds (bad input raises `CliplabError`)."""
    from cliplab.config import load_config
    from cliplab.output_folder import check_apart_from_inputs, spec_paths
    from cliplab.serve.build import build_index
    from cliplab.serve.index import describe
    from cliplab.serve.settings import IndexConfig

    if args.add and args.overwrite:  # named as flags (IndexConfig names its keys, from a file)
        raise ConfigError("--add appends to the index at --out and --overwrite replaces it; "
                          "give one of them")
    given = ("model", "out", "add", "overwrite", "backend", "uri", "index_type", "device")
    extra = {key: getattr(args, key) for key in given if getattr(args, key) is not None}
    cfg = load_config(IndexConfig, args.config, args.overrides, extra=extra,
                      replace={"data": data_spec(args)}, required=out_required("the index"))
    check_out_is_not_input(cfg.out, [cfg.model.name, *spec_paths(cfg.data)])
    if cfg.uri and "://" not in cfg.uri:  # a Milvus Lite file: as --out, not among the images
        check_apart_from_inputs(cfg.uri, spec_paths(cfg.data), flag="--uri")
    with naming_models({cfg.model.name: given_by(args, "--model", "model")}):
        record = build_index(cfg, progress=not args.no_progress)
    if record.get("unchanged"):
        print(f"index {cfg.out}: {_nothing_to_add(record, cfg.data)}")
        return 0
    print(f"index {cfg.out}: {describe(record)}")
    tuned = record.get("faiss", {})
    if tuned.get("parameter") and tuned["recall"] < tuned["recall_target"]:
        warn(f"index: recall {tuned['recall']:.3f} stays below the target "
             f"{tuned['recall_target']} at the widest search ({tuned['parameter']}="
             f"{tuned['value']}): {tuned['type']} loses neighbours on this collection; "
             "--index-type flat is exact" + (" (ivf-flat and hnsw keep the vectors whole, "
                                             "unlike PQ)" if "PQ" in tuned["type"] else ""))
    if record.get("already_indexed"):
        print(f"{record['already_indexed']} item(s) of the collection were in the index "
              "already (not added again, nor read: rebuild the index to take files changed "
              "since)")
    if record.get("recovered"):
        print(f"{record['recovered']} item(s) skipped before (unreadable then, or in a damaged "
              "shard) were indexed now and taken off the skipped table", file=sys.stderr)
    skipped = record["skipped_now"]  # this run's: an --add's index also holds earlier ones
    if skipped:
        from cliplab.data.types import counts_text

        print(f"skipped {sum(skipped.values())} item(s) ({counts_text(skipped)}); each is "
              f"listed with its reason in {Path(cfg.out) / 'meta.sqlite'} (table skipped)",
              file=sys.stderr)
    return 0


def _nothing_to_add(record: dict, data) -> str:
    """What an ``--add`` that found nothing new says: the index is left as it was."""
    from cliplab.data.collection import source_spec
    from cliplab.evaluate.tasks.base import data_origin

    held, before = record["already_indexed"], record["skipped_before"]
    source = data_origin(source_spec(data), None)
    found = (f"{held} item(s) of {source} are in the index already and {before} were skipped "
             "before (table skipped of meta.sqlite)" if before else
             f"all {held} item(s) of {source} are in the index already")
    return (f"nothing to add: {found}; the index is left as it was ({record['count']} items; "
            "files changed since are not read again: rebuild the index to take them)")
