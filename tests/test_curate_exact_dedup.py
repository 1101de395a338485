"""The `exact_dedup` step: planted exact duplicates (by pixels, by normalised caption, by both)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cliplab.curate.steps.base import PoolBatch, PoolItems, StepContext
from cliplab.curate.steps.exact_dedup import (ExactDedup, Spec, caption_hash, image_hash,
                                               normalise_caption)


def image(value: int, size=(8, 8)) -> Image.Image:
    return Image.fromarray(np.full((*size[::-1], 3), value, dtype=np.uint8))


def run(tmp_path, images, captions, **options):
    step = ExactDedup(Spec(step="exact_dedup", **options))
    step.prepare(StepContext(work=tmp_path))
    keys = [f"k{i}" for i in range(len(images))]
    # two chunks, as the engine maps them, concatenated in pool order
    half = len(keys) // 2
    parts = [step.map(PoolBatch(keys[a:b], captions[a:b], images[a:b]))
             for a, b in ((0, half), (half, len(keys)))]
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return step.decide(PoolItems(keys, captions), cols)


def test_identical_pixels_are_duplicates_and_the_first_is_kept(tmp_path):
    images = [image(10), image(20), image(10), image(10, (8, 4)), image(20), image(30)]
    d = run(tmp_path, images, ["a", "b", "c", "d", "e", "f"])
    assert d.keep.tolist() == [True, True, False, True, False, True]
    assert d.reasons[2] == "exact duplicate of k0 (identical image)"
    assert d.reasons[4] == "exact duplicate of k1 (identical image)"
    assert d.report["clusters"] == [["k0", "k2"], ["k1", "k4"]]


def test_hash_is_of_decoded_pixels_not_of_the_encoding(tmp_path):
    a = image(40)
    b = Image.open(_png_roundtrip(tmp_path, a, optimize=True))
    assert image_hash(a) == image_hash(b)
    assert image_hash(a) != image_hash(image(41))
    assert image_hash(image(0, (4, 2))) != image_hash(image(0, (2, 4)))  # size counts


def _png_roundtrip(tmp_path, im, **kw):
    path = tmp_path / "x.png"
    im.save(path, **kw)
    return path


def test_captions_are_normalised_before_comparison(tmp_path):
    assert normalise_caption("  A Dog,  on   the GRASS! ") == "a dog on the grass"
    captions = ["A dog on grass.", "a  dog on GRASS", "a cat", "a dog on grass"]
    images = [image(1), image(2), image(3), image(1)]
    d = run(tmp_path, images, captions, match="caption")
    assert d.keep.tolist() == [True, False, True, False]
    assert d.reasons[1] == "exact duplicate of k0 (identical caption (normalised))"
    d = run(tmp_path, images, captions, match="pair")
    assert d.keep.tolist() == [True, True, True, False]
    assert d.report["clusters"] == [["k0", "k3"]]


def test_pair_needs_the_caption_too(tmp_path):
    images = [image(5), image(5)]
    captions = ["a red square", "a blue circle"]
    assert run(tmp_path, images, captions, match="pair").keep.tolist() == [True, True]
    assert run(tmp_path, images, captions, match="image").keep.tolist() == [True, False]


def test_hashes_are_stored_in_64_bytes_and_a_cached_str_chunk_decides_alike(tmp_path):
    """A hash column holds the hex digest as ASCII bytes (a str column took 256 bytes a hash,
    two per item even when only captions are compared); a chunk an earlier version cached as
    str, concatenated with new ones on a resumed run, decides as before."""
    step = ExactDedup(Spec(step="exact_dedup", match="pair"))
    images, captions = [image(1), image(2), image(1), image(1)], ["a", "b", "a", "c"]
    columns = step.map(PoolBatch(["k0", "k1", "k2", "k3"], captions, images))
    assert all(c.itemsize <= 64 for c in columns.values())
    unhashed = ExactDedup(Spec(step="exact_dedup", match="caption")).map(
        PoolBatch(["k0"], ["a"], None))
    assert unhashed["image_hash"].itemsize <= 1
    old = {"image_hash": np.array([image_hash(im) for im in images[:2]], dtype="<U64"),
           "caption_hash": np.array([caption_hash(c) for c in captions[:2]], dtype="<U64")}
    mixed = {k: np.concatenate([old[k], columns[k][2:]]) for k in old}
    for cols in (columns, mixed):
        d = step.decide(PoolItems(["k0", "k1", "k2", "k3"], captions), cols)
        assert d.keep.tolist() == [True, True, False, True]
        assert d.reasons[2] == "exact duplicate of k0 (identical image and caption)"


def test_each_row_is_told_its_first_equal_row_by_sorting_not_a_dict(monkeypatch):
    """`first_equal` (a stable sort of positions, ~30 bytes a row where a dict of the hashes
    held ~250) finds the first row equal in every column, as a dict of the rows did, across
    blocks of compared neighbours, for bytes and str columns."""
    from cliplab.curate.steps import exact_dedup

    rng = np.random.default_rng(0)
    for compared in (1, 3, 65_536):
        monkeypatch.setattr(exact_dedup, "COMPARED_AT_ONCE", compared)
        for n in (0, 1, 50):
            a = np.array([f"{v:064x}".encode() for v in rng.integers(0, 4, n)], dtype="S64")
            b = np.array([f"{v}" for v in rng.integers(0, 3, n)], dtype="U64")
            for columns in ([a], [b], [a, b]):
                seen: dict = {}
                expected = [seen.setdefault(tuple(c[i] for c in columns), i) for i in range(n)]
                assert exact_dedup.first_equal(columns).tolist() == expected
