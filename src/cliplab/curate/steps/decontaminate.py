"""``decontaminate``: drop pool images that are near duplicates of an evaluation image.

Two signals, computed against every image of the evaluation sets (embedded and hashed once in
``prepare``):

- the cosine similarity of the model's unit image embeddings (``threshold``), which catches
  re-encoded, resized, cropped or lightly edited copies;
- the Hamming distance of 64-bit perceptual hashes (pHash: the signs of the low-frequency DCT
  of a 32x32 grey thumbnail of the image's centre square, `imagehash.phash`;
  ``hash_distance``), which needs no model and catches exact and resized/noised copies even
  when the model is weak. An evaluation set of mixed sizes is held as squares of its median
  shorter side (`stack_images`), one given ``image_size: N`` as N x N images, so the pool's
  images are hashed against it made so too: an exact copy of any of its files is at distance 0.

A pool image is dropped when ``cosine >= threshold`` OR ``hash distance <= hash_distance``
(either signal alone is evidence of a copy; set one to ``null`` to use only the other). The
evaluation images come from ``eval_sets`` (data source specs, as ``cliplab.data.sources``
reads them) and/or every dataset of the tasks of an eval ``suite`` (a `cliplab eval` YAML).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from cliplab.config import load_config, refuse_unused
from cliplab.curate.steps.base import (Decision, PoolBatch, PoolItems, StepContext,
                                       StepSpecBase, told_apart)
from cliplab.data.images import centre_square, noting_squares, resized_to, to_pil
from cliplab.data.sources import check_options, load_source, with_paths_resolved
from cliplab.errors import CliplabError, ConfigError
from cliplab.models.resolve import load_model
from cliplab.models.spec import ModelField
from cliplab.models.embed import embed_images
from cliplab.output_folder import resolved_path, spec_paths

THUMBNAIL = 96  # longest side of the evaluation thumbnails the report shows


def _tell_skipped(label: str, skipped) -> None:
    """Say what an evaluation set skipped: those images are not checked against the pool."""
    if skipped is not None and skipped.total:
        print(f"curate: decontaminate: {label}: {skipped.summary()}; those evaluation images "
              "are not checked against the pool", file=sys.stderr)


class Spec(StepSpecBase):
    """``{step: decontaminate, model, eval_sets: [data specs], suite: PATH, threshold,
    hash_distance}``."""

    step: Literal["decontaminate"]
    model: ModelField | None = None  # needed by the embedding signal (threshold)
    eval_sets: list[dict[str, Any]] = []
    suite: str | None = None
    threshold: float | None = Field(0.95, ge=-1, le=1)
    hash_distance: int | None = Field(4, ge=0, le=64)
    batch_size: int = Field(64, ge=1)

    @field_validator("eval_sets")
    @classmethod
    def _sets_resolved(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [with_paths_resolved(spec) for spec in value]  # as the spec names its files

    @field_validator("suite")
    @classmethod
    def _suite_resolved(cls, value: str | None) -> str | None:
        return resolved_path(value)

    def packages(self) -> dict[str, str]:
        return {"imagehash": "perceptual hashes"} if self.hash_distance is not None else {}

    @model_validator(mode="after")
    def _has_sets_and_a_signal(self) -> "Spec":
        if not self.eval_sets and self.suite is None:
            raise ValueError("give eval_sets (data specs) and/or suite (an eval suite YAML)")
        if self.threshold is None and self.hash_distance is None:
            raise ValueError("threshold and hash_distance are both null: nothing to match by")
        if self.threshold is not None and self.model is None:
            raise ValueError("threshold (embedding similarity) needs a model; or set "
                             "threshold: null to match by perceptual hash only")
        if self.threshold is None:  # no embeddings: the model is neither loaded nor run
            refuse_unused(self, ["model", "batch_size"], "with threshold: null (only the "
                          "cosine signal embeds images)")
        for i, spec in enumerate(self.eval_sets):
            if "source" not in spec:
                raise ValueError(f"eval_sets[{i}] needs 'source: NAME'")
            try:  # unknown options and wrong types now, not after the steps before this one
                check_options(spec, f"eval_sets[{i}]")
            except ConfigError as err:
                raise ValueError(str(err)) from None
        return self

    def input_paths(self) -> list[str]:
        """The suite file, and the files of every evaluation set (the suite's too)."""
        try:
            sets = eval_set_specs(self)
        except CliplabError:  # the step says what is wrong with the suite when it starts
            sets = list(enumerate(self.eval_sets))
        return [*([self.suite] if self.suite else []), *spec_paths(*(d for _, d in sets))]


def _imagehash():
    try:
        import imagehash
    except ImportError:
        raise ConfigError("decontaminate: perceptual hashes need imagehash "
                          "(pip install 'cliplab[curate]')") from None
    return imagehash


def phash_bits(image: Image.Image) -> np.uint64:
    """The 64-bit perceptual hash of ``image`` packed into one integer."""
    bits = _imagehash().phash(image.convert("RGB")).hash.flatten()
    return np.uint64(int("".join("1" if b else "0" for b in bits), 2))


def square_phash(image: Image.Image) -> np.uint64:
    """`phash_bits` of ``image``'s centre square (its shorter side's): an exact copy of a
    non-square evaluation image is at distance 0 (hashed whole, it was a quarter off)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return phash_bits(image.crop((left, top, left + side, top + side)))


# how an evaluation set holds its images: ("square", side) as centre squares of its median
# shorter side (a set of mixed sizes, `stack_images`), ("squash", N) resized to N x N (its
# `image_size`), None as read (a set of one size)
Frame = tuple[str, int] | None


def frame_phash(image: Image.Image, frame: Frame) -> np.uint64:
    """`square_phash` of ``image`` made as an evaluation set held in ``frame`` holds its
    images, so an exact copy of one of its files is at distance 0 (hashed at its own size, a
    64 px copy of a file held as a 48 px square was at 4; of one squashed to N x N, at 24)."""
    if frame is None:
        return square_phash(image)
    kind, side = frame
    if kind == "squash":
        return phash_bits(resized_to(image.convert("RGB"), side))
    pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    return phash_bits(to_pil(centre_square(pixels, side)))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` Hamming distances between two arrays of packed 64-bit hashes."""
    differ = a[:, None] ^ b[None, :]
    if hasattr(np, "bitwise_count"):  # NumPy 2: ~70x the byte table's speed
        return np.bitwise_count(differ).astype(np.int64)
    return bit_counts(differ)


# the set bits of each byte value
_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def bit_counts(values: np.ndarray) -> np.ndarray:
    """The set bits of each uint64 in ``values``, by a byte table (NumPy 1.x, which cliplab
    supports, has no ``bitwise_count``)."""
    values = np.ascontiguousarray(values, dtype=np.uint64)
    return _BYTE_BITS[values.view(np.uint8)].reshape(*values.shape, 8).sum(-1, dtype=np.int64)


def eval_set_specs(spec: Spec) -> list[tuple[str, dict[str, Any]]]:
    """(label, data spec) of every evaluation set: ``eval_sets[i]`` and each distinct dataset of
    the suite's tasks (labelled ``suite:<task name>``)."""
    sets = [(f"eval_sets[{i}]:{d['source']}", dict(d)) for i, d in enumerate(spec.eval_sets)]
    if spec.suite is not None:
        from cliplab.evaluate.suite import SuiteSpec

        if not Path(spec.suite).is_file():
            raise ConfigError(f"decontaminate: suite {spec.suite} is not a file")
        suite = load_config(SuiteSpec, spec.suite)
        seen = {repr(sorted(d.items())) for _, d in sets}
        for name, task in zip(suite.task_names(), suite.tasks):
            for data in task.datasets():
                if not isinstance(data, dict):
                    continue  # in-memory sets exist only in the Python API
                key = repr(sorted(data.items()))
                if key not in seen:
                    seen.add(key)
                    sets.append((f"suite:{name}:{data.get('source')}", dict(data)))
    return sets


def _pil(image: torch.Tensor) -> Image.Image:
    return to_pil(image).convert("RGB")


class Decontaminate:
    """Drops pool images whose embedding or perceptual hash matches an evaluation image."""

    Spec = Spec
    needs_images = True  # map hashes (and embeds) the images

    def __init__(self, spec: Spec):
        self.spec = spec
        self.model = None
        self.labels: list[str] = []  # per evaluation image: "label#index"
        self.eval_embeddings = np.zeros((0, 0), dtype=np.float32)
        self.eval_hashes = np.zeros(0, dtype=np.uint64)
        self._eval_images: list[torch.Tensor] = []  # per set; driver only (not pickled)
        self._offsets: list[int] = []
        # per set: the frames it holds its images in (`Frame`; one, or a square per part)
        self._frames: list[tuple[Frame, ...]] = []
        self.work: Path | None = None

    def prepare(self, context: StepContext) -> None:
        """Load the model, then embed and hash every evaluation image once."""
        self.work = Path(context.work)
        self.model = (load_model(self.spec.model, context.device)
                      if self.spec.threshold is not None else None)
        embeddings, hashes = [], []
        for label, data_spec in eval_set_specs(self.spec):
            with noting_squares() as squared:
                data = load_source(data_spec, context.progress, label)
            size = data_spec.get("image_size")
            self._frames.append((("squash", int(size)),) if isinstance(size, int) and size > 0
                                else tuple(("square", s) for s in dict.fromkeys(squared))
                                or (None,))
            _tell_skipped(label, getattr(data, "skipped", None))
            images = data.images
            self._offsets.append(len(self.labels))
            self._eval_images.append(images)
            self.labels += [f"{label}#{i}" for i in range(len(images))]
            # a few batches at a time: PIL copies of the whole set were a second copy of it
            step = self.spec.batch_size * 8
            for start in tqdm(range(0, len(images), step), desc=f"hash/embed {label}",
                              disable=not context.progress, leave=False):
                pil = [_pil(im) for im in images[start:start + step]]
                hashes += [square_phash(im) for im in pil]
                if self.model is not None:
                    embeddings.append(embed_images(self.model, pil, self.spec.batch_size))
        if not self.labels:
            raise ConfigError("decontaminate: the evaluation sets hold no images")
        self.eval_hashes = np.array(hashes, dtype=np.uint64)
        if self.model is not None:
            self.eval_embeddings = np.concatenate(embeddings)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_eval_images": []}  # workers need only embeddings and hashes

    def map(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        """Per pool image: its best match by cosine and by hash, each with the other signal's
        value for that same evaluation image."""
        n = len(batch)
        distances = self._distances(batch.images) if n else np.zeros((0, len(self.labels)))
        if self.model is not None and n:
            sims = embed_images(self.model, batch.images, self.spec.batch_size) @ self.eval_embeddings.T
        else:
            sims = np.full((n, len(self.labels)), np.nan, dtype=np.float32)
        rows = np.arange(n)
        by_cos = np.nanargmax(sims, axis=1) if self.model is not None and n else np.zeros(n, int)
        by_hash = distances.argmin(axis=1) if n else np.zeros(0, int)
        return {"cosine": sims[rows, by_cos].astype(np.float32), "cosine_match": by_cos,
                "cosine_match_hash_distance": distances[rows, by_cos],
                "hash_distance": distances[rows, by_hash], "hash_match": by_hash,
                "hash_match_cosine": sims[rows, by_hash].astype(np.float32)}

    def _distances(self, images: list[Image.Image]) -> np.ndarray:
        """``[len(images), evaluation images]`` hash distances, each set's in the frame it
        holds its images in (`frame_phash`; the nearest if it has several)."""
        hashes: dict[Frame, np.ndarray] = {}  # the pool's, per frame
        ends = [*self._offsets[1:], len(self.labels)]
        blocks = []
        for start, end, frames in zip(self._offsets, ends, self._frames):
            block = None
            for frame in frames:
                if frame not in hashes:
                    hashes[frame] = np.array([frame_phash(im, frame) for im in images],
                                             dtype=np.uint64)
                found = hamming(hashes[frame], self.eval_hashes[start:end])
                block = found if block is None else np.minimum(block, found)
            blocks.append(block)
        return np.concatenate(blocks, axis=1)

    def decide(self, items: PoolItems, columns: dict[str, np.ndarray]) -> Decision:
        """Drop every item whose cosine reaches ``threshold`` or hash distance is within
        ``hash_distance``; list each match with a thumbnail of the evaluation image."""
        thr, max_dist = self.spec.threshold, self.spec.hash_distance
        cosine, distance = columns["cosine"], columns["hash_distance"]
        by_cos = cosine >= thr if thr is not None else np.zeros(len(items), bool)
        by_hash = distance <= max_dist if max_dist is not None else np.zeros(len(items), bool)
        keep = ~(by_cos | by_hash)
        reasons: list[str | None] = [None] * len(items)
        matches = []
        for i in np.flatnonzero(~keep):
            if by_cos[i]:
                m, sim, dist = (int(columns["cosine_match"][i]), float(cosine[i]),
                                int(columns["cosine_match_hash_distance"][i]))
            else:
                m, sim, dist = (int(columns["hash_match"][i]),
                                float(columns["hash_match_cosine"][i]), int(distance[i]))
            evidence = []
            if by_cos[i]:
                evidence.append("cosine {} >= {}".format(*told_apart(sim, thr)))
            if by_hash[i]:
                evidence.append(f"hash distance {dist} <= {max_dist}")
            reasons[i] = f"near duplicate of evaluation image {self.labels[m]} ({', '.join(evidence)})"
            matches.append({"key": items.keys[i], "match": self.labels[m],
                            "similarity": None if np.isnan(sim) else round(sim, 4),
                            "hash_distance": dist, "match_image": str(self._thumbnail(m))})
        return Decision(keep, reasons, scores=cosine if thr is not None else None,
                        threshold=thr, report={"matches": matches,
                                               "eval_images": len(self.labels)})

    def _thumbnail(self, index: int) -> Path:
        """A PNG of evaluation image ``index`` in the step's work folder (written once)."""
        assert self.work is not None, "prepare() first"
        path = self.work / "eval_images" / f"{index}.png"
        if not path.exists():
            s = int(np.searchsorted(self._offsets, index, side="right")) - 1
            image = _pil(self._eval_images[s][index - self._offsets[s]])
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        return path
