"""The queries an approximate index's search breadth is tuned on, embedded with the index's model.

A served index answers image queries and text queries. Text embeddings lie apart from image
embeddings (CLIP's modality gap), so the lists or graph neighbourhoods nearest a text query hold
its neighbours less often than for an image query: on Fashion-MNIST (60 000 images, IVF256,
the quickstart's model) nprobe 4 finds 0.99 of an image query's top 10 but 0.77 of a caption's.
Breadth is therefore tuned on both kinds: held-out image queries (indexed vectors plus noise)
and the collection's own captions as text queries, or everyday object names where it has none.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np

from cliplab.models.embed import embed_texts
from cliplab.serve.faiss_index import TUNE_QUERIES, held_out_queries

# Object names of COCO's 80 categories: text queries for a collection without captions.
EVERYDAY_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


def sample_captions(store, count: int, n: int = TUNE_QUERIES, seed: int = 0) -> list[str]:
    """Up to ``n`` distinct captions of rows drawn at random (seeded) from the ``count`` rows
    of ``store`` (a `MetadataStore`), in draw order. Empty captions and a folder's file names
    (an uncaptioned photo's caption is its file name: "IMG 0001") are no text queries."""
    rng = np.random.default_rng(seed)
    # extra draws, since captions repeat (class names); a sample, not a permutation of all
    ids = rng.choice(count, min(count, 4 * n), replace=False)
    rows = store.get_many(ids.tolist())
    seen: dict[str, None] = {}
    for i in ids:
        row = rows[int(i)]
        caption = row["caption"].strip()
        if caption and caption != _file_name(row["key"]) and len(seen) < n:
            seen.setdefault(caption)
    return list(seen)


def _file_name(key: str) -> str:
    """The caption a folder gives an image without one (`folder_files.image_caption`)."""
    return PurePosixPath(key.rsplit("|", 1)[-1]).stem.replace("_", " ")


def tuning_queries(model, store, vectors: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """``{"images": ..., "captions" | "objects": ...}``: held-out image queries near the
    indexed ``vectors``, and text queries embedded as the server embeds a query's text — the
    collection's captions (from ``store``), else "a photo of a {object}" for everyday objects."""
    captions = sample_captions(store, len(vectors), seed=seed)
    name, texts = (("captions", captions) if captions else
                   ("objects", [f"a photo of a {name}" for name in EVERYDAY_OBJECTS]))
    return {"images": held_out_queries(vectors, seed=seed), name: embed_texts(model, texts)}


__all__ = ["EVERYDAY_OBJECTS", "sample_captions", "tuning_queries"]
