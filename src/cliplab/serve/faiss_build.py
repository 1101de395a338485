"""The FAISS index a finished `cliplab index` run writes: trained and filled anew, or grown.

An ``--add`` to an index whose FAISS type needs training (IVF, PQ) and stays what the grown
collection is given (the same factory string: an IVF's list count follows the collection's
size, and changes each time the collection grows about fourfold) reads the old trained index
and adds only the new vectors, under the next row numbers; its tuned search breadth is checked
on the grown index and kept if it still reaches the recall target (else tuned on from there).
Training and adding every vector again cost the O(n) of the whole collection for each add.
An index grown past ``RETRAIN_GROWTH`` times the vectors it was trained on is trained again,
so a quantizer fitted to the first vectors does not go on serving a collection grown far past
them; the whole cost is then paid once per doubling (amortised O(added)). Flat and HNSW
indexes are built anew as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from cliplab.errors import DataError, first_line, warn
from cliplab.serve import faiss_index

RETRAIN_GROWTH = 2


def finished_faiss(vectors: np.ndarray, factory: str, recall: float, existing: dict | None,
                   old_file: Path, queries: Callable[[], dict | None],
                   phase: Callable[[str], None]) -> tuple[object, dict]:
    """The FAISS index of ``vectors`` (ids are row numbers) and its ``faiss`` record for
    index.json: the index ``existing`` (an ``--add``'s, its FAISS file ``old_file``) grown by
    the rows past its own when it can take them, else one built anew. ``queries()`` gives the
    tuning queries of an approximate index; ``phase`` tells the user each step."""
    dim = int(vectors.shape[1])
    old = _growable(existing, factory, len(vectors), dim)
    index, problem = _read_old(old_file, existing, vectors) if old is not None else (None, None)
    if problem:  # said whatever ``phase`` shows: an add that trains again takes much longer
        warn(f"index: {old_file} cannot be grown ({problem}); training the index anew")
    if index is None:
        phase(f"building a FAISS {factory} index of {len(vectors)} vectors")
        index = faiss_index.build_faiss(vectors, factory)
        trained_on, start = len(vectors), None
    else:
        trained_on = int(old.get("trained_on") or existing["count"])
        phase(f"adding {len(vectors) - index.ntotal} vectors to the trained FAISS {factory} "
              f"index of {index.ntotal} (trained on {trained_on})")
        faiss_index.add_vectors(index, vectors[index.ntotal:])
        # another recall target is tuned from the narrowest: a lower one may need less
        start = old.get("value") if old.get("recall_target") == recall else None
    name = faiss_index.search_parameter(index)
    if name and start is not None:
        phase(f"checking its search breadth {name}={start} at recall {recall} (widened if "
              "short)")
    elif name:
        phase(f"tuning its search breadth to recall {recall}")
    tuned = faiss_index.tune_search(index, vectors, recall, start=start,
                                    queries=queries() if name else None)
    record = {"type": factory, "recall_target": recall, **tuned}
    if faiss_index.needs_training(dim, factory):  # what a later --add decides by
        record["trained_on"] = trained_on
    return index, record


def _growable(existing: dict | None, factory: str, count: int, dim: int) -> dict | None:
    """The ``faiss`` record of ``existing`` when its trained index can take the rows up to
    ``count`` as ``factory``: the same type, one that needs training, grown less than
    ``RETRAIN_GROWTH`` times what it was trained on (an index from before ``trained_on`` was
    recorded was trained on all it held). Else None: built anew."""
    old = (existing or {}).get("faiss")
    if existing is None or existing.get("backend") != "faiss" or not isinstance(old, dict) or \
            old.get("type") != factory or not faiss_index.needs_training(dim, factory):
        return None
    trained_on = old.get("trained_on") or existing["count"]
    return old if count <= RETRAIN_GROWTH * int(trained_on) else None


def _read_old(path: Path, existing: dict, vectors: np.ndarray) -> tuple[object, str | None]:
    """The old index's FAISS index read from ``path`` if it holds exactly its rows (the first
    ``existing["count"]`` of ``vectors``), else None and what is wrong with it (built anew:
    that also repairs it)."""
    try:
        index = faiss_index.read_faiss(path)
    except (DataError, OSError) as err:
        return None, first_line(err)
    count = int(existing["count"])
    if not index.is_trained:
        return None, "it is not trained"
    if index.ntotal != count or index.d != vectors.shape[1] or count > len(vectors):
        return None, (f"it holds {index.ntotal} vectors of dimension {index.d}, the index "
                      f"{count} of {vectors.shape[1]}")
    return index, None
