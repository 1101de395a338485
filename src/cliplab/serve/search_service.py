"""What the API routes of `cliplab serve` ask of the index and the model: result pages, stored
rows and vectors, embeddings of text and uploads (one forward pass at a time), zero-shot heads,
and the indexed images' files and thumbnails."""

from __future__ import annotations

import copy
import threading
from collections.abc import AsyncIterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from fastapi import Depends, Request, UploadFile
from starlette.exceptions import HTTPException

from cliplab.data.collection import read_range
from cliplab.errors import ModelError
from cliplab.evaluate.zeroshot import zeroshot_classifier
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.embed import embed_images, embed_texts
from cliplab.serve.image_files import THUMBNAIL_SIZES, fail, read_upload, thumbnail
from cliplab.serve.index import IndexReplaced, SearchIndex, embeds_otherwise
from cliplab.serve.milvus_index import CollectionGone
from cliplab.serve.sized_cache import SizedLru

THUMBNAIL_CACHE_BYTES = 64 << 20  # thousands of cards' thumbnails


class ModelCaches:
    """The model, its lock (one forward pass at a time: the CPU is the bottleneck) and what
    depends on the model only: the text embeddings and zero-shot heads asked for. Shared by
    every generation's `SearchService`, and holding none of them: a replaced service (its
    thumbnails, its closed index) goes once its last request ends."""

    def __init__(self, model: DualEncoder):
        self.model = model
        self.lock = threading.Lock()
        # per object: an lru_cache on the method would keep every model alive
        self.text_vector = lru_cache(maxsize=1024)(self._text_vector)
        self.label_head = lru_cache(maxsize=64)(self._label_head)

    def _text_vector(self, text: str) -> np.ndarray:
        with self.lock:
            return embed_texts(self.model, [text])

    def _label_head(self, names: tuple[str, ...], prompt: str) -> torch.Tensor:
        """The zero-shot head of ``names`` (the page labels every image shown with one set)."""
        with self.lock:
            return zeroshot_classifier(self.model, list(names), [prompt])


class SearchService:
    """An opened ``index`` and the ``model`` it was built with (checked to match)."""

    def __init__(self, index: SearchIndex, model: DualEncoder):
        index.check_model(model)
        model.eval()
        self.index, self.model = index, model
        self.caches = ModelCaches(model)
        self._model_input = getattr(model, "preprocess_config", None)
        # the page shows the same cards again when paging; bounded by bytes, as a thumbnail
        # small enough to be its original file as it is may be most of a MB
        self.thumbnails = SizedLru(THUMBNAIL_CACHE_BYTES)
        # why the index folder's next generation cannot be served by this server (set by
        # `IndexGenerations` when it refuses it), else None
        self.next_refused: str | None = None

    def with_index(self, index: SearchIndex) -> SearchService:
        """This service over ``index``, the index folder's next generation (its model checked:
        a ``ModelError`` if it embeds otherwise: a restart, which loads the model the index
        records, serves it). The model, its lock and the text and label caches are shared
        (`ModelCaches`); the thumbnails too after an ``--add``, which keeps every id's image,
        but not after a rebuild (another build id): an id may name another image there."""
        differs = embeds_otherwise(index.record, self.model)
        if differs:
            raise ModelError(f"it was built with model {index.record['model']['name']}; the "
                             f"model this server loaded has {differs}")
        served = copy.copy(self)
        served.index, served.next_refused = index, None
        build = index.record.get("build")
        if build is None or build != self.index.record.get("build"):
            served.thumbnails = SizedLru(THUMBNAIL_CACHE_BYTES)
        return served

    def text_vector(self, text: str) -> np.ndarray:
        """The embedding of ``text`` (cached)."""
        return self.caches.text_vector(text)

    def label_head(self, names: tuple[str, ...], prompt: str) -> torch.Tensor:
        """The zero-shot head of ``names`` with ``prompt`` (cached)."""
        return self.caches.label_head(names, prompt)

    def upload_vector(self, file: UploadFile) -> np.ndarray:
        """The embedding of an uploaded image: decoded before the model's lock is taken (a
        large upload must not hold up other requests' forward passes)."""
        image = read_upload(file.file.read(), "file", self._model_input)
        with self.caches.lock:
            return embed_images(self.model, [image])

    def results(self, vector: np.ndarray, k: int, offset: int) -> list[dict]:
        """The ``k`` indexed items closest to ``vector`` from rank ``offset``, with their rows
        and image URLs."""
        try:
            scores, ids = self.index.search(vector.reshape(1, -1), k, offset)
        except CollectionGone as err:  # dropped under the server by an --add
            fail(503, self.cannot_search(str(err)))
        rows = self.index.items(ids[0])
        return [{"id": int(i), "score": round(float(s), 6), "caption": rows[int(i)]["caption"],
                 "key": rows[int(i)]["key"], "meta": rows[int(i)]["meta"],
                 "image": f"/images/{int(i)}", "thumbnail": f"/images/{int(i)}/thumbnail"}
                for s, i in zip(scores[0], ids[0]) if int(i) in rows]

    def cannot_search(self, problem: str) -> str:
        """What a 503 for the index's ``problem`` says, with why its next generation is not
        served if it was refused (the problem says it will be)."""
        return f"{problem}; but {self.next_refused}" if self.next_refused else problem

    def page(self, query: dict, vector: np.ndarray, k: int, offset: int) -> dict:
        """One page of results for ``query`` (echoed), with the index's size."""
        return {**query, "k": k, "offset": offset, "total": self.index.count,
                "results": self.results(vector, k, offset)}

    def indexed(self, item_id: int) -> dict:
        """The stored row of ``item_id``; a 404 if there is none."""
        row = self.index.items([item_id]).get(item_id)
        if row is None:
            fail(404, f"no indexed image with id {item_id}")
        return row

    def probabilities(self, vectors: np.ndarray | torch.Tensor, names: list[str],
                      prompt: str) -> torch.Tensor:
        """``[N, labels]`` zero-shot probabilities of image embeddings."""
        return zero_shot_probabilities(self.model, torch.from_numpy(np.array(vectors)),
                                       self.label_head(tuple(names), prompt))

    def image_source(self, item_id: int) -> dict:
        """`SearchIndex.image_source` of ``item_id``; a 503 when the index folder was rebuilt
        under the server (its stored image would be another index's item)."""
        try:
            return self.index.image_source(self.indexed(item_id))
        except IndexReplaced as err:
            if self.next_refused:  # never loaded: not "once it has loaded it"
                fail(503, f"the index {self.index.path} was rebuilt since this server opened "
                     f"it, and its stored images are the new index's: {self.next_refused}")
            fail(503, str(err))

    def stored_image(self, item_id: int) -> Path | tuple[bytes, str]:
        """Where ``item_id``'s original image is: its file, or its bytes read from a shard
        with the name they had there; a 404 when it is gone."""
        source = self.image_source(item_id)
        if "file" in source:
            path = Path(source["file"])
            if not path.is_file():
                fail(404, f"the image file of id {item_id} is gone")
            return path
        try:
            data = read_range(source["tar"], int(source["offset"]), int(source["size"]))
        except OSError as err:
            fail(404, f"the image of id {item_id} cannot be read from its shard ({err})")
        return data, source.get("name", "")

    def image_version(self, item_id: int) -> tuple:
        """What changes when ``item_id``'s image does (a file replaced under the same name):
        its inode and change time too, which a copy that keeps the size and the modification
        time (``cp -p``, ``rsync -t``, a restore) still changes."""
        source = self.image_source(item_id)
        path = Path(source.get("file") or source["tar"])
        try:
            stat = path.stat()
        except OSError:
            fail(404, f"the image file of id {item_id} is gone")
        return (str(path), stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_size,
                source.get("offset"))

    def small_image(self, item_id: int, size: int, version: tuple) -> tuple[bytes, str]:
        """``item_id``'s thumbnail at ``version`` (`_small_image`), from the cache."""
        return self.thumbnails.get((item_id, size, version),
                                   lambda: self._small_image(item_id, size, version),
                                   lambda made: len(made[0]))

    def _small_image(self, item_id: int, size: int, version: tuple) -> tuple[bytes, str]:
        """``item_id``'s thumbnail at ``version`` (`image_version`: a changed file is another
        cache entry). The original is decoded once per `thumbnail_step` (64, 128, 256, 512
        px; requests at the same moment may each decode it): any other size shrinks that
        step's thumbnail, so asking every size from 64 to 512 one after another costs four
        decodes of a large image, not 449."""
        step = thumbnail_step(size)
        if step != size:
            source: Path | bytes = self.small_image(item_id, step, version)[0]
        else:
            stored = self.stored_image(item_id)
            source = stored if isinstance(stored, Path) else stored[0]
        try:
            return thumbnail(source, size)
        except HTTPException:  # the server busy decoding (a 503): not the image's fault
            raise
        except Exception:  # PIL's decoders raise many types on odd files
            fail(404, f"the image of id {item_id} no longer decodes")


def thumbnail_step(size: int) -> int:
    """The power of two at or above ``size``, within `THUMBNAIL_SIZES`."""
    return min(max(1 << (size - 1).bit_length(), THUMBNAIL_SIZES[0]), THUMBNAIL_SIZES[1])


@torch.no_grad()
def zero_shot_probabilities(model: DualEncoder, image_embeddings: torch.Tensor,
                            classifier: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` probabilities from unit embeddings and a zero-shot head: softmax of the scaled
    cosines (CLIP), independent sigmoids with the bias (SigLIP)."""
    # embeddings and head are on the CPU; the model's scale and bias may sit on a GPU
    logits = image_embeddings.float() @ classifier.float().t() * model.logit_scale.exp().item()
    if model.logit_bias is not None:
        return torch.sigmoid(logits + model.logit_bias.item())
    return torch.softmax(logits, dim=-1)


async def current_service(request: Request) -> AsyncIterator[SearchService]:
    """The service of the index generation the app a request came to serves now (the routes'
    dependency), held for the whole request: a page is answered from one generation, and a
    generation replaced meanwhile is closed only once its last request ends. The routes are
    module-level functions that take it per request: FastAPI memoises facts about every
    endpoint function process-wide, so a route closing over its service kept every app's
    index (its vectors mapped, a deleted folder's disk space held) and model alive. Async: a
    plain generator would cost every request two trips through the thread pool, to enter and
    to leave; holding and letting go are a lock and, once a second, a stat."""
    generations = request.app.state.generations
    generation = generations.acquire()
    try:
        yield generation.service
    finally:
        generations.release(generation)


SERVICE = Depends(current_service)  # a route's ``service: SearchService = SERVICE``
