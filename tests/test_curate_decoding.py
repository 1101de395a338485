"""Which pool images `cliplab curate` decodes: only for the steps that look at them (given their
config), each image file once per chunk however many rows name it, with results identical to
decoding every image for every step; and the totals of the "read pool" and index bars."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cliplab.config import validate
from cliplab.curate import pipeline as pipeline_module
from cliplab.curate import pool as pool_module
from cliplab.curate.config import CurateConfig
from cliplab.curate.pipeline import run_curation
from cliplab.curate.steps.clip_score import ClipScore
from cliplab.provenance import without_provenance

CAPTION_STEPS = [{"step": "basic", "min_words": 2, "blocklist": ["spam"]},
                 {"step": "exact_dedup", "match": "caption"},
                 {"step": "balance", "vocabulary": ["dog", "cat", "bird"], "t": 2}]
IMAGE_STEPS = [{"step": "basic", "name": "sizes", "min_words": 2, "min_image_side": 20},
               {"step": "exact_dedup", "name": "same_pixels", "match": "image"},
               {"step": "balance", "vocabulary": ["dog", "cat", "bird"], "t": 3}]
# files: four photos (b is a pixel copy of a as another file, c is small), one unreadable
FILES = {"a.jpg": ((48, 32), (200, 30, 30)), "b.png": None, "c.png": ((12, 40), (10, 200, 10)),
         "d.jpg": ((40, 40), (20, 20, 220))}
ANIMALS = ["dog", "cat", "bird", "fish"]
N_ROWS = 40


def photo_manifest(root: Path) -> Path:
    """A manifest of ``N_ROWS`` rows naming a few image files again and again (plus a broken
    file and a missing one, dropped at read), captions repeating, some blocklisted or short."""
    root.mkdir()
    for name, spec in FILES.items():
        if spec is not None:
            size, colour = spec
            Image.new("RGB", size, colour).save(root / name)
    Image.open(root / "a.jpg").save(root / "b.png")  # the same pixels as a.jpg, another file
    (root / "broken.jpg").write_bytes(b"no jpeg at all")
    names = list(FILES) + ["broken.jpg", "gone.png"]
    lines = ["image,caption"]
    for i in range(N_ROWS):
        name = names[i % 4] if i % 13 else names[4 + (i // 13) % 2]
        caption = f"a {ANIMALS[i % 4]} number {i % 7}" if i % 5 else ANIMALS[i % 4]
        if i % 11 == 3:
            caption += " spam"
        lines.append(f"{name},{caption}")
    manifest = root / "pool.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def config(data, steps, **kw) -> CurateConfig:
    return validate(CurateConfig, {"data": data, "steps": steps, "chunk_size": 7,
                                   "output": {"format": "manifest"}, **kw}, "test")


@pytest.fixture
def decodes(monkeypatch):
    """Every image the steps' batches decode (`open_image` as the pool calls it)."""
    opened: list[str] = []
    original = pool_module.open_image

    def counting(location, work, key=None):
        opened.append(location["file"])
        return original(location, work, key)
    monkeypatch.setattr(pool_module, "open_image", counting)
    return opened


def outcome(out: Path) -> dict:
    """What a run decided: the summary without timings, every drop with its step and reason,
    and the kept items (the output manifest)."""
    summary = without_provenance(  # not when
        json.loads((out / "summary.json").read_text(encoding="utf-8")))
    steps = [{k: v for k, v in s.items() if k != "seconds"} for s in summary.pop("steps")]
    dropped = [(d["key"], d["step"], d["reason"],
                None if math.isnan(d["score"]) else d["score"])
               for d in pq.read_table(out / "dropped.parquet").to_pylist()]
    kept = pq.read_table(out / summary["output"]["path"]).to_pylist()
    decisions = {p.parent.name: json.loads(p.read_text())
                 for p in sorted((out / "steps").glob("*/decision.json"))}
    for d in decisions.values():
        d.pop("seconds")
    return {"summary": summary, "steps": steps, "dropped": dropped, "kept": kept,
            "decisions": decisions}


def test_caption_only_steps_decode_no_image(tmp_path, decodes):
    manifest = photo_manifest(tmp_path / "pool")
    summary = run_curation(config(str(manifest), CAPTION_STEPS), tmp_path / "out", progress=False)
    assert [s["step"] for s in summary["steps"]] == ["read", "basic", "exact_dedup", "balance"]
    assert all(s["in"] > 0 for s in summary["steps"])  # every step saw items
    assert decodes == []  # before: every record decoded again for each of the three steps


def readable_files_per_chunk(manifest: Path, chunk_size: int = 7) -> list[set[str]]:
    """The distinct readable image files the rows of each chunk of the pool name."""
    names = [line.split(",")[0] for line in manifest.read_text().splitlines()[1:]]
    readable = {n for n in names if n in FILES}
    return [{str((manifest.parent / n).resolve()) for n in names[s:s + chunk_size] if n in readable}
            for s in range(0, len(names), chunk_size)]


def test_a_step_that_needs_images_decodes_each_file_once_per_chunk(tmp_path, decodes):
    manifest = photo_manifest(tmp_path / "pool")
    steps = [{"step": "basic", "min_image_side": 20},
             {"step": "balance", "vocabulary": ["dog"], "t": 100}]
    summary = run_curation(config(str(manifest), steps), tmp_path / "out", progress=False)
    assert summary["steps"][1]["in"] == N_ROWS - 4  # 4 rows name the broken or missing file
    chunks = readable_files_per_chunk(manifest)
    # basic: each readable file once per chunk (not once per row); balance: none
    assert sorted(decodes) == sorted(f for files in chunks for f in files)
    assert len(decodes) < N_ROWS - 4


@pytest.mark.parametrize("steps", [CAPTION_STEPS, IMAGE_STEPS, CAPTION_STEPS + IMAGE_STEPS[:2]],
                         ids=["caption-steps", "image-steps", "mixed"])
def test_results_equal_those_with_every_image_decoded_for_every_step(tmp_path, monkeypatch,
                                                                     steps):
    manifest = photo_manifest(tmp_path / "pool")
    run_curation(config(str(manifest), steps), tmp_path / "lazy", progress=False)
    monkeypatch.setattr(pool_module, "needs_images", lambda step: True)  # the old behaviour
    run_curation(config(str(manifest), steps), tmp_path / "eager", progress=False)
    lazy, eager = outcome(tmp_path / "lazy"), outcome(tmp_path / "eager")
    assert lazy == eager
    assert len(lazy["dropped"]) > 2 and lazy["summary"]["kept"] > 0  # something was decided
    reasons = {r for _, _, r, _ in lazy["dropped"]}
    assert any("unreadable image" in r for r in reasons)  # still dropped at read
    if steps is IMAGE_STEPS:
        assert any("min_image_side" in r for r in reasons)
        assert any("identical image" in r for r in reasons)


def test_the_ray_engine_decodes_only_for_steps_that_need_images(tmp_path, decodes, monkeypatch):
    """The Ray engine's actor maps chunks through the same batch loader (run here in process
    with the stand-in `ray` of the Ray engine's tests)."""
    import sys

    from tests.test_curate_ray_engine import FakeRay

    monkeypatch.setitem(sys.modules, "ray", FakeRay(initialized=True))
    manifest = photo_manifest(tmp_path / "pool")
    run_curation(config(str(manifest), CAPTION_STEPS, engine="ray"), tmp_path / "ray",
                 progress=False)
    assert decodes == []
    steps = IMAGE_STEPS[:1] + CAPTION_STEPS
    run_curation(config(str(manifest), steps, engine="ray"), tmp_path / "ray2", progress=False)
    # only the first step decodes: each readable file once per chunk
    assert sorted(decodes) == sorted(f for files in readable_files_per_chunk(manifest)
                                     for f in files)
    ray = outcome(tmp_path / "ray2")
    run_curation(config(str(manifest), steps), tmp_path / "local", progress=False)
    assert ray == outcome(tmp_path / "local")


def test_basic_with_size_rules_needs_images_and_without_does_not():
    from cliplab.curate.steps.basic import Basic, Spec

    assert Basic(Spec(step="basic", min_image_side=4)).needs_images
    assert Basic(Spec(step="basic", max_aspect_ratio=3)).needs_images
    assert not Basic(Spec(step="basic", min_words=2, blocklist=["x"])).needs_images


class RecordingBar:
    """tqdm as far as the bars use it, remembering each bar's total."""

    made: list[dict] = []

    def __init__(self, *args, **kw):
        RecordingBar.made.append(kw)

    def update(self, n=1):
        pass

    def close(self):
        pass

    def __iter__(self):
        return iter(())


def test_the_read_pool_bar_has_the_manifest_s_row_count_as_total(tmp_path, monkeypatch):
    manifest = photo_manifest(tmp_path / "pool")
    RecordingBar.made = []
    monkeypatch.setattr(pipeline_module, "tqdm", RecordingBar)
    run_curation(config(str(manifest), []), tmp_path / "out", progress=True)
    read = [kw for kw in RecordingBar.made if kw.get("desc") == "read pool"]
    assert len(read) == 1 and read[0].get("total") == N_ROWS


def test_the_read_pool_bar_of_a_folder_counts_its_files(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8), (i, i, i)).save(folder / f"img_{i}.png")
    (folder / "notes.txt").write_text("not an image")  # an item that fails to read
    RecordingBar.made = []
    monkeypatch.setattr(pipeline_module, "tqdm", RecordingBar)
    run_curation(config(str(folder), []), tmp_path / "out", progress=True)
    read = [kw for kw in RecordingBar.made if kw.get("desc") == "read pool"]
    assert read[0].get("total") == 6


def test_the_index_bar_has_the_folder_s_file_count_as_total(tmp_path, monkeypatch):
    from cliplab.serve import build as build_module
    from cliplab.serve.build import build_index
    from tests.serve_helpers import index_config, save_tiny_model

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    model = save_tiny_model(tmp_path / "model")
    RecordingBar.made = []
    monkeypatch.setattr(build_module, "tqdm", RecordingBar)
    build_index(index_config(model, str(folder), tmp_path / "idx"), progress=True)
    bars = [kw for kw in RecordingBar.made if str(kw.get("desc", "")).startswith("index ")]
    assert len(bars) == 1 and bars[0].get("total") == 5


def test_reading_the_pool_decodes_each_readable_file_once(tmp_path, monkeypatch):
    """A caption manifest names an image once per caption: `read` decoded it again for every
    row. Rows naming a broken or missing file are each dropped with their own line, as before."""
    import cliplab.data.collection as collection

    opened: list[str] = []
    original = collection.open_rgb

    def counting(source):
        opened.append(str(source))
        return original(source)
    monkeypatch.setattr(collection, "open_rgb", counting)
    manifest = photo_manifest(tmp_path / "pool")
    run_curation(config(str(manifest), CAPTION_STEPS), tmp_path / "out", progress=False)
    readable = {str((manifest.parent / n).resolve()) for n in FILES}
    assert sorted(f for f in opened if f in readable) == sorted(readable)  # each once
    failing = [f for f in opened if f not in readable]
    assert len(failing) == 4  # the 4 rows of the broken and the missing file, each tried
    dropped = pq.read_table(tmp_path / "out" / "dropped.parquet").to_pylist()
    lines = sorted(d["reason"] for d in dropped if d["step"] == "read")
    assert len(lines) == 4 and len(set(lines)) == 4  # each names its own manifest line


def test_steps_that_only_embed_get_files_fitted_to_their_model(tmp_path, monkeypatch):
    """clip_score / semantic_dedup / dfn embed the images and nothing else: a chunk holds each
    file as the model takes it (a chunk of 12 MP photos held 12 GB), and scores as the whole
    files do; steps that read sizes or pixels get them whole."""
    root = tmp_path / "photos"
    root.mkdir()
    g = np.random.default_rng(0)
    lines = ["image,caption"]
    for i, (h, w) in enumerate([(64, 96), (96, 64), (80, 80), (70, 120)] * 2):
        pixels = g.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(pixels).save(root / f"p{i}.png")
        lines.append(f"p{i}.png,a photo of a {ANIMALS[i % 4]}")
    (root / "pool.csv").write_text("\n".join(lines) + "\n")
    steps = [{"step": "basic", "min_image_side": 20},
             {"step": "clip_score", "model": "tiny-clip", "threshold": -1.0},
             {"step": "semantic_dedup", "model": "tiny-clip", "n_clusters": 2, "eps": 0.0001}]
    held: list[tuple[str, list]] = []
    original = pool_module.load_batch

    def recording(records, work, images=True, fit=None):
        batch = original(records, work, images, fit)
        held.append((type(fit).__name__, [im.size for im in batch.images]))
        return batch

    monkeypatch.setattr(pool_module, "load_batch", recording)
    run_curation(config(str(root / "pool.csv"), steps), tmp_path / "sizes", progress=False)
    side = 32  # tiny-clip's input
    basic, embedding = held[:2], held[2:]  # 8 rows in chunks of 7: two chunks a step
    assert all(fit == "NoneType" for fit, _ in basic)  # sizes: the files' own
    assert {size for _, sizes in basic for size in sizes} == {(96, 64), (64, 96), (80, 80),
                                                              (120, 64)}
    assert all(fit == "PreprocessConfig" and set(sizes) == {(side, side)}
               for fit, sizes in embedding)
    scores, map_scores = {}, ClipScore.map
    for run in ("fitted", "whole"):
        if run == "whole":
            monkeypatch.setattr(pool_module, "image_input", lambda step: None)  # as before
        scores[run] = []
        monkeypatch.setattr(ClipScore, "map", lambda self, batch, kept=scores[run], f=map_scores:
                            kept.append(f(self, batch)["clip_score"]) or {"clip_score": kept[-1]})
        run_curation(config(str(root / "pool.csv"), steps), tmp_path / run, progress=False)
    fitted, whole = (np.concatenate(scores[run]) for run in ("fitted", "whole"))
    assert len(fitted) == 8
    assert np.allclose(fitted, whole, atol=0.02) and not np.array_equal(fitted, whole)
    assert outcome(tmp_path / "fitted")["kept"] == outcome(tmp_path / "whole")["kept"]


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_whole_images_are_mapped_a_few_rows_at_a_time_with_the_same_results(
        tmp_path, monkeypatch, engine):
    """Steps that look at whole images (sizes, pixel hashes) are given a chunk a few rows at a
    time (a chunk of 256 phone photos held whole needed 12 GB), with the columns joined: the
    same decisions as the whole chunk at once."""
    import sys

    from tests.test_curate_ray_engine import FakeRay

    monkeypatch.setitem(sys.modules, "ray", FakeRay(initialized=True))
    manifest = photo_manifest(tmp_path / "pool")
    cfg = config(str(manifest), IMAGE_STEPS, engine=engine, chunk_size=20)
    run_curation(cfg, tmp_path / "at_once", progress=False)
    sizes, original = [], pool_module.load_batch
    monkeypatch.setattr(pool_module, "load_batch", lambda records, *a: sizes.append(
        len(records)) or original(records, *a))
    monkeypatch.setattr(pool_module, "WHOLE_IMAGE_ROWS", 3)
    run_curation(cfg, tmp_path / "few", progress=False)
    assert sizes and max(sizes) == 3 and sum(sizes) > 20  # both image steps, in threes
    assert outcome(tmp_path / "few") == outcome(tmp_path / "at_once")
