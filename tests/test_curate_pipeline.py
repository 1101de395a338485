"""`cliplab curate` end to end on hand-built pools: read drops named by file and line, steps in
order, outputs (shards with the original bytes, manifest, dropped.parquet, summary, report),
resumption after a kill without re-mapping finished chunks, refusals, and the CLI."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from cliplab.cli import main
from cliplab.config import load_config, validate
from cliplab.curate.config import CurateConfig
from cliplab.curate.pipeline import run_curation
from cliplab.output_folder import partial_path
from cliplab.curate.steps import registry
from cliplab.curate.steps.base import Decision, PoolBatch, PoolItems, StepContext, StepSpecBase
from cliplab.data.collection import iter_items
from cliplab.errors import CliplabError, ConfigError, DataError
from cliplab.provenance import without_provenance
from tests.stamped import assert_stamped, now
from tests.warned import warned


class BrightSpec(StepSpecBase):
    step: Literal["bright"]
    threshold: float = 100.0
    fail_on_chunk: int | None = None
    model: str | None = None  # checked and recorded by the pipeline; the step ignores it


class Bright:
    """A test step: keeps images whose mean pixel is at least ``threshold``; records every map
    call and, once, raises on the chunk holding item ``fail_on_chunk`` (a killed run)."""

    Spec = BrightSpec
    calls: list[list[str]] = []
    failed: list[bool] = []

    def __init__(self, spec):
        self.spec = spec

    def prepare(self, context: StepContext) -> None:
        (context.work / "table.txt").write_text("built in prepare")

    def map(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        Bright.calls.append(list(batch.keys))
        if self.spec.fail_on_chunk is not None and len(Bright.calls) - 1 == self.spec.fail_on_chunk \
                and not Bright.failed:
            Bright.failed.append(True)
            raise RuntimeError("killed")
        return {"mean": np.array([np.asarray(im, dtype=float).mean() for im in batch.images])}

    def decide(self, items: PoolItems, columns: dict[str, np.ndarray]) -> Decision:
        mean = columns["mean"]
        keep = mean >= self.spec.threshold
        return Decision(keep=keep, reasons=[None if k else f"mean pixel {m:.0f} below "
                                            f"{self.spec.threshold:g}" for k, m in zip(keep, mean)],
                        scores=mean, threshold=self.spec.threshold,
                        report={"files": {"table": "x"}, "note": "hello"})


@pytest.fixture(autouse=True)
def bright_step(monkeypatch):
    monkeypatch.setitem(registry.STEPS, "bright", f"{__name__}:Bright")
    Bright.calls.clear()
    Bright.failed.clear()


def make_folder(root, values):
    """An image folder: one flat-colour PNG per value (``None``: an unreadable file)."""
    root.mkdir(parents=True)
    for i, value in enumerate(values):
        path = root / f"img_{i:02d}.png"
        if value is None:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(np.full((12, 10, 3), value, dtype=np.uint8)).save(path)
    return root


def config(data, steps, **kw):
    return validate(CurateConfig, {"data": data, "steps": steps, **kw}, "test")


STEPS = [{"step": "bright", "threshold": 100}, {"step": "exact_dedup"}]
# 0..9: bright 200 (dup of 0 at 3 and 7), dark 50, unreadable
VALUES = [200, 50, 150, 200, None, 120, 50, 200, 90, 250]


def test_pool_runs_through_the_steps_and_writes_every_output(tmp_path):
    folder = make_folder(tmp_path / "pool", VALUES)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    started = now()
    summary = run_curation(config(str(folder), STEPS, chunk_size=3, examples=2),
                           tmp_path / "out", progress=False)
    assert_stamped(summary, started, now())  # which cliplab curated it, and when
    out = tmp_path / "out"
    assert [(s["name"], s["in"], s["kept"], s["dropped"]) for s in summary["steps"]] == [
        ("read", 10, 9, 1), ("bright", 9, 6, 3), ("exact_dedup", 6, 4, 2)]
    assert summary["kept"] == 4 and summary["dropped"] == 6
    dropped = pq.read_table(out / "dropped.parquet").to_pylist()
    by_key = {d["key"]: d for d in dropped}
    assert by_key["img_04.png"]["step"] == "read"
    assert by_key["img_04.png"]["reason"].startswith(f"unreadable image at {folder / 'img_04.png'}")
    assert by_key["img_01.png"] == {"key": "img_01.png", "step": "bright",
                                    "reason": "mean pixel 50 below 100", "score": 50.0,
                                    "source_key": None}  # a folder item is its own file
    assert by_key["img_07.png"]["reason"] == "exact duplicate of img_00.png (identical image)"
    assert sorted(by_key) == ["img_01.png", "img_03.png", "img_04.png", "img_06.png",
                              "img_07.png", "img_08.png"]
    # the kept shards hold the original file bytes, in pool order
    kept = list(iter_items({"source": "shards", "path": str(out / "shards")}, progress=False))
    assert [json.loads(_member(i, "json"))["source_key"] for i in kept] == \
        ["img_00.png", "img_02.png", "img_05.png", "img_09.png"]
    assert _image_bytes(kept[1]) == before["img_02.png"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # source untouched
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert (out / "steps" / "00-bright" / "work" / "table.txt").is_file()
    assert not (out / "cache").exists() and not partial_path(out).exists()
    md = (out / "report.md").read_text()
    assert "| bright | 9 | 6 | 3 |" in md and "mean pixel 50 below 100" in md
    assert "report/00-bright-scores.png" in md and (out / "report/00-bright-scores.png").is_file()
    assert "report/00-bright/drop-1.png" in md  # examples=2 thumbnails
    assert not (out / "report/00-bright/drop-2.png").exists()
    assert "duplicate clusters (1; the first is kept)" in md and "img_00.png, img_03.png, img_07.png" in md
    assert "note: \"hello\"" in md
    assert '<img src="report/00-bright/drop-0.png"' in (out / "report.html").read_text()


def test_drops_over_shards_name_the_file_each_sample_was_made_from(tmp_path):
    """dropped.parquet of a pool of shards named each drop by its shard key alone
    (``00000.tar:000000001``): which of the user's files was dropped meant opening the tar for
    its KEY.json. Its ``source_key`` column says (the file a `data shard` sample was made of)."""
    from cliplab.data.shards.from_files import write_source

    folder = make_folder(tmp_path / "pool", [200, 50, 150, 60])
    for image in folder.glob("*.png"):
        image.with_suffix(".txt").write_text(f"square {image.stem}", encoding="utf-8")
    write_source({"source": "image-folder", "path": str(folder), "captions": True},
                 tmp_path / "shards",
                 samples_per_shard=2, image_format="png", progress=False)
    run_curation(config({"source": "shards", "path": str(tmp_path / "shards")},
                        [{"step": "bright", "threshold": 100}]), tmp_path / "out", progress=False)
    dropped = pq.read_table(tmp_path / "out" / "dropped.parquet").to_pylist()
    assert [(d["key"], d["source_key"]) for d in dropped] == [
        ("00000.tar:000000001", "img_01.png"), ("00001.tar:000000003", "img_03.png")]
    assert pq.read_table(tmp_path / "out" / "dropped.parquet").column_names == [
        "key", "step", "reason", "score", "source_key"]


def test_curated_shards_of_any_folder_image_type_read_back_in_training(tmp_path):
    """Every image type a folder reader takes (GIF, TIFF, PPM, ...) stays readable in the
    curated shards (their members kept .gif/.tiff were no image to the shard reader)."""
    from cliplab.data.shards.read import load_shards

    folder = tmp_path / "pool"
    folder.mkdir()
    colours = {"a.gif": 30, "b.tiff": 90, "c.ppm": 150, "d.jpe": 200, "e.png": 250}
    for name, value in colours.items():
        image = Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8))
        image.save(folder / name, format={"jpe": "JPEG"}.get(name.rsplit(".")[-1]))
    summary = run_curation(config(str(folder), [{"step": "exact_dedup"}]), tmp_path / "out",
                           progress=False)
    assert summary["kept"] == 5
    stream = load_shards(tmp_path / "out" / "shards", progress=False)
    assert stream.skipped.total == 0 and len(stream) == 5
    means = sorted(float(image.float().mean()) for image in stream.images)
    assert np.allclose(means, sorted(colours.values()), atol=3)


def dropped_rows(out):
    """dropped.parquet's rows, NaN scores as None (NaN != NaN)."""
    return [{**r, "score": None if r["score"] != r["score"] else r["score"]}
            for r in pq.read_table(out / "dropped.parquet").to_pylist()]


def _member(item, ext):
    import tarfile

    with tarfile.open(item.location["tar"]) as tar:
        name = item.location["name"].rsplit(".", 1)[0] + "." + ext
        return tar.extractfile(name).read()


def _image_bytes(item):
    with open(item.location["tar"], "rb") as f:
        f.seek(item.location["offset"])
        return f.read(item.location["size"])


def test_a_truncated_shard_is_read_to_its_cut_and_dropped_as_such(tmp_path):
    from cliplab.data.shapes import load_shapes
    from cliplab.data.shards import write_shards

    data = load_shapes(n=12, seed=2, kinds=["single"], image_size=32)
    write_shards(data, tmp_path / "shards", samples_per_shard=6, image_format="png",
                 progress=False)
    first = tmp_path / "shards" / "00000.tar"
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    summary = run_curation(config({"source": "shards", "path": str(tmp_path / "shards")}, []),
                           tmp_path / "out", progress=False)
    drops = {d["key"]: d["reason"] for d in
             pq.read_table(tmp_path / "out/dropped.parquet").to_pylist()}
    # the cut leaves 00000.tar's fourth sample without its image: lost, as the stream reader
    # counts it, after the three whole ones; it and the two after it are each dropped as cut
    # off (index.json counts 6)
    assert summary["kept"] == 6 + 3 and summary["pool"] == summary["kept"] + 4
    assert set(drops) == {"00000.tar", "00000.tar:sample 4 of 6", "00000.tar:sample 5 of 6",
                          "00000.tar:sample 6 of 6"}
    assert drops["00000.tar:sample 4 of 6"].startswith("cut off at ")
    assert drops["00000.tar"].startswith(
        f"truncated shard at {first}: 00000.tar: read 3 of 6 samples, then:")

def test_curated_shards_of_hard_negative_twins_keep_each_samples_partner(tmp_path):
    """The kept pool's shards renumber each sample and its partner's key with it (only the
    keys partners name are held while writing): read back, every twin pair whose two samples
    were kept is a pair again, and a sample whose partner was dropped has none."""
    from cliplab.data.shapes import load_shapes_with_scenes
    from cliplab.data.shards import write_shards
    from cliplab.data.sources import load_source

    twins = load_shapes_with_scenes(n=12, seed=3, kinds=("relation",), image_size=32,
                                    counterfactuals=True)[0]
    write_shards(twins, tmp_path / "shards", samples_per_shard=10, image_format="png",
                 progress=False)
    summary = run_curation(config({"source": "shards", "path": str(tmp_path / "shards")},
                                  [{"step": "basic", "blocklist": ["below"]}]),
                           tmp_path / "out", progress=False)
    back = load_source({"source": "shards", "path": str(tmp_path / "out" / "shards"),
                        "progress": False})
    first = [c[0] if isinstance(c, list) else c for c in twins.captions]
    kept = [first.index(c[0] if isinstance(c, list) else c) for c in back.captions]
    assert 0 < summary["kept"] < len(twins.captions)
    want = [kept.index(int(twins.partners[i])) if int(twins.partners[i]) in kept else -1
            for i in kept]
    assert back.partners.tolist() == want and 0 < want.count(-1) < len(want)


def test_manifest_rows_are_dropped_with_file_and_line(tmp_path):
    folder = make_folder(tmp_path / "pool", [200, 210, 220])
    manifest = tmp_path / "pool.csv"
    manifest.write_text("image,caption\npool/img_00.png,a bright square\n"
                        "pool/img_01.png,\n,no image here\npool/missing.png,gone\n"
                        "pool/img_02.png,another one\n")
    summary = run_curation(config(str(manifest), [{"step": "exact_dedup"}],
                                  output={"format": "manifest"}), tmp_path / "out", progress=False)
    assert summary["steps"][0]["dropped"] == 3
    reasons = {d["key"]: d["reason"] for d in pq.read_table(tmp_path / "out/dropped.parquet").to_pylist()}
    assert reasons["pool.csv:2:pool/img_01.png"] == \
        f"empty caption at {manifest} line 3 ({folder / 'img_01.png'})"
    assert reasons["pool.csv:3:"].startswith(f"missing file at {manifest} line 4 (")
    assert reasons["pool.csv:4:pool/missing.png"].startswith(f"missing file at {manifest} line 5")
    kept = pq.read_table(tmp_path / "out/kept.parquet").to_pylist()
    assert [(r["image"], r["caption"]) for r in kept] == [
        (str(folder / "img_00.png"), "a bright square"), (str(folder / "img_02.png"), "another one")]
    # the written manifest is a cliplab manifest again
    again = list(iter_items({"source": "manifest", "path": str(tmp_path / "out/kept.parquet")},
                            progress=False))
    assert [i.caption for i in again] == ["a bright square", "another one"]


def test_a_killed_run_resumes_without_remapping_finished_chunks(tmp_path, capsys):
    folder = make_folder(tmp_path / "pool", VALUES)
    whole = run_curation(config(str(folder), STEPS, chunk_size=3), tmp_path / "whole", progress=False)
    Bright.calls.clear()
    flaky = [{"step": "bright", "threshold": 100, "fail_on_chunk": 2}, {"step": "exact_dedup"}]
    cfg = config(str(folder), flaky, chunk_size=3)
    with pytest.raises(RuntimeError, match="killed"):
        run_curation(cfg, tmp_path / "out", progress=False)
    assert partial_path(tmp_path / "out").is_dir() and not (tmp_path / "out").exists()
    first = [list(c) for c in Bright.calls]
    assert len(first) == 3  # chunks 0 and 1 finished, chunk 2 raised
    Bright.calls.clear()
    capsys.readouterr()
    resumed = run_curation(cfg, tmp_path / "out", progress=False)
    assert (f"curate: resuming the stopped run in {partial_path(tmp_path / 'out')} (what it "
            "finished is kept)") in capsys.readouterr().err
    # only the unfinished chunks are mapped again
    assert Bright.calls == first[2:] + [["img_09.png"]]
    assert resumed["kept"] == whole["kept"] and \
        [s["kept"] for s in resumed["steps"]] == [s["kept"] for s in whole["steps"]]
    assert dropped_rows(tmp_path / "out") == dropped_rows(tmp_path / "whole")
    a, b = (sorted((tmp_path / d / "shards").glob("*.tar")) for d in ("whole", "out"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_a_kill_while_finishing_is_finished_by_the_next_run(tmp_path, monkeypatch):
    """A kill after the summary is written, while the cache is being removed (here: one pool
    chunk already gone) or before the rename, is completed by the next run of that config —
    the same outputs as an uninterrupted run; another config is refused without --overwrite."""
    from cliplab.curate import pipeline

    folder = make_folder(tmp_path / "pool", VALUES)
    cfg = config(str(folder), STEPS, chunk_size=3)
    whole = run_curation(cfg, tmp_path / "whole", progress=False)

    def killed(work, out):
        (work / "cache" / "pool" / "000001.json").unlink()  # rmtree got this far
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_move_into_place", killed)
    with pytest.raises(KeyboardInterrupt):
        run_curation(cfg, tmp_path / "out", progress=False)
    monkeypatch.undo()
    monkeypatch.setitem(registry.STEPS, "bright", f"{__name__}:Bright")
    other = config(str(folder), [{"step": "exact_dedup"}], chunk_size=3)
    with pytest.raises(ConfigError, match="finished `cliplab curate` run of another config"):
        run_curation(other, tmp_path / "out", progress=False)
    Bright.calls.clear()
    resumed = run_curation(cfg, tmp_path / "out", progress=False)

    def timeless(summary):  # its times aside: seconds taken, and when it was written
        return {**without_provenance(summary),
                "steps": [{**s, "seconds": 0} for s in summary["steps"]]}

    assert timeless(resumed) == timeless(whole)
    assert not Bright.calls  # nothing mapped again
    assert dropped_rows(tmp_path / "out") == dropped_rows(tmp_path / "whole")
    assert not (tmp_path / "out" / "cache").exists() and not (tmp_path / "out" / "state.json").exists()
    assert not partial_path(tmp_path / "out").exists()
    assert run_curation(other, tmp_path / "out", progress=False, overwrite=True)["kept"] == 6


def test_a_damaged_cache_is_refused_not_read_short(tmp_path):
    """A pool chunk missing from a read pool would make a resumed run silently lose its items."""
    folder = make_folder(tmp_path / "pool", VALUES)
    flaky = config(str(folder), [{"step": "bright", "threshold": 100, "fail_on_chunk": 2}],
                   chunk_size=3)
    with pytest.raises(RuntimeError, match="killed"):
        run_curation(flaky, tmp_path / "out", progress=False)
    pool = partial_path(tmp_path / "out") / "cache" / "pool"
    (pool / "000003.json").unlink()
    with pytest.raises(DataError, match=r"pool is damaged: done.json counts 4 chunks, 3 are there; delete .*out.partial to start"):
        run_curation(flaky, tmp_path / "out", progress=False)


def _killed_in_the_second_step(tmp_path):
    """A run into ``tmp_path/out`` killed in its second step, once its first step decided on
    its 4 chunks (the kill comes once only): its config and work folder."""
    folder = make_folder(tmp_path / "pool", VALUES)
    steps = [{"step": "bright", "threshold": 100},
             {"step": "bright", "name": "again", "threshold": 100, "fail_on_chunk": 4}]
    cfg = config(str(folder), steps, chunk_size=3)
    with pytest.raises(RuntimeError, match="killed"):
        run_curation(cfg, tmp_path / "out", progress=False)
    return cfg, partial_path(tmp_path / "out")


def test_a_saved_decision_on_another_number_of_items_is_refused(tmp_path):
    """A resumed run refuses a step's decision.json whose keep list is not one per item
    reaching the step, rather than applying it to the wrong items."""
    cfg, work = _killed_in_the_second_step(tmp_path)
    saved = work / "steps" / "00-bright" / "decision.json"
    data = json.loads(saved.read_text())
    assert len(data["keep"]) == 9
    saved.write_text(json.dumps({**data, "keep": data["keep"][:-1]}))
    with pytest.raises(DataError) as caught:
        run_curation(cfg, tmp_path / "out", progress=False)
    assert str(caught.value) == (f"{saved} decides on 8 items, 9 reach the step; delete {work} "
                                 "to start this run over")


def test_decisions_and_pool_chunks_are_compact_json_and_indented_ones_still_resume(tmp_path):
    """A decision.json holds a list per item and a pool chunk a record per item: written
    without a line per entry (indented, a step's keep list alone was 20 MB per million items);
    one an earlier version wrote indented is read back alike by a resumed run."""
    cfg, work = _killed_in_the_second_step(tmp_path)
    saved = work / "steps" / "00-bright" / "decision.json"
    chunk = work / "cache" / "pool" / "000000.json"
    for written in (saved, chunk):
        assert "\n" not in written.read_text(encoding="utf-8").strip()
    for written in (saved, chunk):  # as an earlier version wrote them
        written.write_text(json.dumps(json.loads(written.read_text(encoding="utf-8")),
                                      indent=2), encoding="utf-8")
    resumed = run_curation(cfg, tmp_path / "out", progress=False)  # it fails once only
    whole = run_curation(cfg, tmp_path / "whole", progress=False)
    assert [s["kept"] for s in resumed["steps"]] == [s["kept"] for s in whole["steps"]]
    assert dropped_rows(tmp_path / "out") == dropped_rows(tmp_path / "whole")


def test_refusals_existing_output_other_config_and_source_folder(tmp_path):
    folder = make_folder(tmp_path / "pool", [200, 50])
    cfg = config(str(folder), STEPS)
    run_curation(cfg, tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        run_curation(cfg, tmp_path / "out", progress=False)
    assert run_curation(cfg, tmp_path / "out", progress=False, overwrite=True)["kept"] == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a `cliplab curate` output"):
        run_curation(cfg, tmp_path / "other", progress=False, overwrite=True)
    with pytest.raises(ConfigError, match=f"lies inside the input {folder}"):
        run_curation(cfg, folder / "curated", progress=False)
    with pytest.raises(ConfigError, match=f"holds the input {folder}"):  # --overwrite'd delete it
        run_curation(cfg, tmp_path, progress=False, overwrite=True)
    # a half-finished run of another config is refused
    flaky = config(str(folder), [{"step": "bright", "fail_on_chunk": 0}])
    Bright.calls.clear()
    with pytest.raises(RuntimeError):
        run_curation(flaky, tmp_path / "new", progress=False)
    with pytest.raises(ConfigError, match=r"half-finished `cliplab curate` run of another config "
                       r"\(steps \[1 item\] in the run, now \[2 items\]\)"):
        run_curation(cfg, tmp_path / "new", progress=False)
    # the keys that differ are named, a step's by its position (the first three, then a count)
    shifted = config(str(folder), [{"step": "bright", "fail_on_chunk": 0, "threshold": 90}])
    with pytest.raises(ConfigError, match=r"another config \(steps\.0\.threshold 100\.0 in the "
                       r"run, now 90\.0\); rerun"):
        run_curation(shifted, tmp_path / "new", progress=False)
    with pytest.raises(ConfigError, match=r"another config \(chunk_size 256 in the run, now 2; "
                       r"seed 0 in the run, now 5; steps\.0\.fail_on_chunk 0 in the run, now 1; "
                       r"and 1 more key\)"):
        run_curation(config(str(folder), [{"step": "bright", "fail_on_chunk": 1, "threshold": 90}],
                            chunk_size=2, seed=5),
                     tmp_path / "new", progress=False)
    assert run_curation(cfg, tmp_path / "new", progress=False, overwrite=True)["kept"] == 1
    # a run that failed before reading anything (a bad source option) does not block the next
    with pytest.raises(ConfigError, match="unknown option"):
        run_curation(config({"source": "shapes", "nn": 4}, STEPS), tmp_path / "fixed",
                     progress=False)
    assert run_curation(cfg, tmp_path / "fixed", progress=False)["kept"] == 1


def test_whole_config_is_validated_before_any_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: shapes\nsteps:\n  - {step: basic, min_words: 2}\n  - {step: exact_dedup}\n"
                    "  - {step: exact_dedup, name: again, matsh: image}\n")
    with pytest.raises(ConfigError) as err:
        load_config(CurateConfig, path)
    assert str(err.value).startswith(f"{path}: ") and "unknown key steps[2].matsh" in str(err.value)
    path.write_text("data: shapes\nsteps:\n  - {step: nope}\n")
    with pytest.raises(ConfigError, match=r"steps\[0\]: unknown curation step 'nope'"):
        load_config(CurateConfig, path)
    path.write_text("data: shapes\nsteps: [{step: exact_dedup}, {step: exact_dedup}]\n")
    with pytest.raises(ConfigError, match="two steps are named 'exact_dedup'"):
        load_config(CurateConfig, path)
    path.write_text("data: shapes\nsteps: [{step: exact_dedup, name: read}]\n")
    with pytest.raises(ConfigError, match=r"steps\[0\]: 'read' is the name of reading the pool"):
        load_config(CurateConfig, path)
    path.write_text("data: shapes\nengine: spark\n")
    with pytest.raises(ConfigError, match="engine: expected 'local' or 'ray'"):
        load_config(CurateConfig, path)
    cfg = load_config(CurateConfig, None, extra={"data": "shapes", "steps": [{"step": "basic", "min_words": 3}]})
    assert cfg.to_dict()["steps"][0]["min_words"] == 3  # each step's own keys survive


def test_a_missing_step_model_is_refused_before_the_pool_is_read(tmp_path, monkeypatch):
    """A misspelt model of a later step is named (with the step) before any item is read and
    leaves no partial folder that would block the corrected command."""
    import cliplab.curate.pipeline as pipeline

    read = []
    monkeypatch.setattr(pipeline, "_read_pool", lambda *a: read.append(1))
    steps = [{"step": "exact_dedup"},
             {"step": "clip_score", "model": "runs/nothere", "keep_top": 0.5}]
    with pytest.raises(ConfigError, match=r"steps\[1\]\.model \(clip_score\): .*runs/nothere"
                                          r".* does not exist"):
        run_curation(config("shapes", steps), tmp_path / "out", progress=False)
    assert not read and not (tmp_path / "out.partial").exists()


def test_cli_curates_and_reports_bad_keys_in_one_line(tmp_path, capsys):
    folder = make_folder(tmp_path / "pool", [200, 200, 60])
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {folder}\nsteps:\n  - {{step: exact_dedup}}\n")
    assert main(["curate", "--config", str(path), "--out", str(tmp_path / "out"),
                 "--no-progress", "chunk_size=2"]) == 0
    assert "kept 2 of 3 items (dropped 0 by read, 1 by " in capsys.readouterr().out
    path.write_text(f"data: {folder}\nsteps:\n  - {{step: exact_dedup, bogus: 1}}\n")
    assert main(["curate", "--config", str(path), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cliplab: error: ") and "steps[0].bogus" in err and "\n" not in err
    assert not (tmp_path / "out2").exists() and not partial_path(tmp_path / "out2").exists()



def test_curated_output_records_its_pool_path_resolved(tmp_path, monkeypatch):
    """summary.json and the curated shards' index.json recorded a relative `--data` as typed."""
    make_folder(tmp_path / "pool", [200, 200, 60])
    (tmp_path / "c.yaml").write_text("data: pool\nsteps:\n  - {step: exact_dedup}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["curate", "--config", "c.yaml", "--out", "out", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    index = json.loads((tmp_path / "out" / "shards" / "index.json").read_text())
    assert summary["data"]["path"] == index["source"]["path"] == str(tmp_path / "pool")
    assert "data:\n  source: image-folder\n  path: pool\n" in \
        (tmp_path / "out" / "config.yaml").read_text()  # the config as given, to run again


def test_cli_data_replaces_the_configs_whole_source(tmp_path, capsys):
    """``--data`` stands for the whole source: the config's ``n``/``seed`` (options of its
    ``shapes`` source, which an image folder does not take) are dropped, not merged in; a
    ``data.KEY=VALUE`` override then sets an option of the new source."""
    folder = make_folder(tmp_path / "pool", [200, 200, 60])
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: shapes, n: 300, seed: 0}\nsteps:\n  - {step: exact_dedup}\n")
    assert main(["curate", "--config", str(path), "--data", str(folder),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "kept 2 of 3 items" in capsys.readouterr().out
    assert main(["curate", "--config", str(path), "--data", "shapes", "data.n=5",
                 "--out", str(tmp_path / "out2"), "--no-progress"]) == 0
    assert "of 5 items" in capsys.readouterr().out

def test_process_pool_gives_the_same_result(tmp_path):
    folder = make_folder(tmp_path / "pool", VALUES)
    steps = [{"step": "exact_dedup"}]
    a = run_curation(config(str(folder), steps, chunk_size=2), tmp_path / "a", progress=False)
    b = run_curation(config(str(folder), steps, chunk_size=2, workers=2), tmp_path / "b",
                     progress=False)
    assert a["steps"][1]["kept"] == b["steps"][1]["kept"] == 6  # 200 x3, 50 x2 planted
    assert dropped_rows(tmp_path / "a") == dropped_rows(tmp_path / "b")


def test_in_memory_source_and_a_kill_while_reading_the_pool(tmp_path, monkeypatch):
    """A built-in source's images are kept as PNGs for the steps and written to the shards
    losslessly; a run killed while reading resumes from the last finished chunk."""
    import cliplab.curate.pipeline as pipeline
    from cliplab.data.sources import load_source

    real, seen, failed = pipeline.read_item, [], []

    def killed_once(item, number, work, readable=None):
        seen.append(item.key)
        if number == 4 and not failed:
            failed.append(True)
            raise RuntimeError("killed while reading")
        return real(item, number, work, readable)

    monkeypatch.setattr(pipeline, "read_item", killed_once)
    cfg = config({"source": "shapes", "n": 6, "seed": 3}, [{"step": "exact_dedup"}], chunk_size=2)
    with pytest.raises(RuntimeError, match="killed while reading"):
        run_curation(cfg, tmp_path / "out", progress=False)
    seen.clear()
    summary = run_curation(cfg, tmp_path / "out", progress=False)
    assert seen == ["shapes#4", "shapes#5"]  # chunks 0 and 1 were not read again
    assert summary["kept"] == 6
    source = load_source({"source": "shapes", "n": 6, "seed": 3})
    kept = list(iter_items({"source": "shards", "path": str(tmp_path / "out/shards")}, progress=False))
    assert [i.caption for i in kept] == [c[0] for c in source.captions]
    for item, image in zip(kept, source.images):
        assert np.array_equal(np.asarray(item.read()), image.numpy()[..., :3])


def _stopped_anew(cfg, out: Path, remove: Path) -> None:
    """Delete ``remove`` (the run so far) and run ``cfg`` into ``out`` until `Bright`'s
    ``fail_on_chunk`` kills it again: a fresh stopped run."""
    shutil.rmtree(remove)
    Bright.failed.clear()
    Bright.calls.clear()
    with pytest.raises(RuntimeError, match="killed"):
        run_curation(cfg, out, progress=False)


def _killed_once_at_item_4(read_item, message: str):
    """``read_item`` that stops the run (a RuntimeError, ``message``) the first time it reaches
    item 4: a run killed while reading its pool."""
    failed = []

    def killed_once(item, number, work, readable=None):
        if number == 4 and not failed:
            failed.append(True)
            raise RuntimeError(message)
        return read_item(item, number, work, readable)
    return killed_once


def test_a_source_changed_while_a_run_was_stopped_reading_it_is_refused(tmp_path,
                                                                         monkeypatch):
    """The resume went on reading from item count x chunk_size of the listing as it is now: a
    file added before that point was read twice, one removed made another never read. The
    last item the stopped run read must still be where it was; an unchanged folder resumes."""
    import cliplab.curate.pipeline as pipeline

    folder = make_folder(tmp_path / "pool", VALUES)
    monkeypatch.setattr(pipeline, "read_item", _killed_once_at_item_4(pipeline.read_item,
                                                                     "killed while reading"))
    cfg = config(str(folder), [{"step": "exact_dedup"}], chunk_size=2)
    with pytest.raises(RuntimeError, match="killed while reading"):
        run_curation(cfg, tmp_path / "out", progress=False)
    (folder / "img_00.png").rename(folder / "img_10.png")  # read before the stop, now later
    work = partial_path(tmp_path / "out")
    with pytest.raises(DataError, match=rf"{folder}: the source changed since the stopped run "
                       r"read it \(the last of the 4 items it read was img_03.png; the source "
                       r"now has img_04.png there\): resumed, items "
                       rf"would be read twice or never; delete {work} to start over"):
        run_curation(cfg, tmp_path / "out", progress=False)
    (folder / "img_10.png").rename(folder / "img_00.png")
    assert run_curation(cfg, tmp_path / "out", progress=False)["pool"] == 10


@pytest.mark.slow
def test_ray_engine_keeps_exactly_what_the_local_engine_keeps(tmp_path):
    ray = pytest.importorskip("ray")
    steps = [{"step": "basic", "min_words": 4}, {"step": "exact_dedup", "match": "caption"}]
    data = {"source": "shapes", "n": 60, "seed": 1}
    local = run_curation(config(data, steps, chunk_size=16), tmp_path / "local", progress=False)
    # its session files in a folder of its own, removed after (Ray's default temporary folder
    # kept one per run); short, not under tmp_path: Ray's sockets there must fit in 107 bytes
    sessions = tempfile.mkdtemp(prefix="ray-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=sessions)
    try:
        remote = run_curation(config(data, steps, chunk_size=16, engine="ray", workers=2),
                              tmp_path / "ray", progress=False)
        assert ray.is_initialized()  # the caller's own Ray: left running
    finally:
        ray.shutdown()
        shutil.rmtree(sessions, ignore_errors=True)
    assert local["steps"][1]["dropped"] > 0 and local["steps"][2]["dropped"] > 0
    assert remote["steps"] == [{**s, "seconds": r["seconds"]}
                               for s, r in zip(local["steps"], remote["steps"])]
    assert dropped_rows(tmp_path / "ray") == dropped_rows(tmp_path / "local")
    a, b = (sorted((tmp_path / d / "shards").glob("*.tar")) for d in ("local", "ray"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_report_draws_matches_and_concept_histograms(tmp_path):
    from cliplab.curate.report import shown_step, write_report

    pool = make_folder(tmp_path / "pool", [10, 200])
    records = [{"key": f"img_0{i}.png", "caption": f"c{i}", "location": {"file": str(pool / f"img_0{i}.png")},
                "meta": {}} for i in range(2)]
    step_work = Path("steps", "00-x", "work")  # what the step wrote, relative to the run folder
    decision = Decision(keep=[True, False], reasons=[None, "near duplicate of eval image"],
                        report={"matches": [{"key": "img_01.png", "match": "eval_sets[0]:x#0",
                                             "match_image": (step_work / "ref.png").as_posix(),
                                             "similarity": 0.99}],
                                "histogram_before": {"red": 5, "blue": 1},
                                "histogram_after": {"red": 2, "blue": 1},
                                "files": {"counts": (step_work / "c.json").as_posix()}})
    summary = {"data": {"source": "image-folder"}, "pool": 2, "kept": 1, "dropped": 1,
               "steps": [{"name": "read", "in": 2, "kept": 2, "dropped": 0, "seconds": 0},
                         {"name": "x", "in": 2, "kept": 1, "dropped": 1, "seconds": 0}]}
    work = tmp_path / "work"
    (work / step_work).mkdir(parents=True)
    (work / step_work / "c.json").write_text("{}")
    Image.open(pool / "img_00.png").save(work / step_work / "ref.png")
    shown = shown_step("x", decision, [r["key"] for r in records],
                       lambda at: [records[i] for i in at], examples=4)
    write_report(work, summary, [shown], [], examples=4, out=tmp_path / "final")
    md = (work / "report.md").read_text()
    assert "### matches (1)" in md and "report/00-x/match-0.png" in md and "report/00-x/match-0-ref.png" in md
    assert (work / "report/00-x/match-0-ref.png").is_file()
    assert "report/00-x-concepts.png" in md and (work / "report/00-x-concepts.png").is_file()
    assert f"| counts | {tmp_path / 'final' / step_work / 'c.json'} |" in md


def test_a_decontamination_report_shows_both_images_and_paths_outlive_the_rename(tmp_path):
    """The first 10 of 60 shapes are the evaluation set: the report draws each match's
    evaluation image beside the pool one, and decision.json's paths are relative to the run
    folder (they led into OUT.partial, which is gone once the run is renamed)."""
    shapes = {"source": "shapes", "n": 60, "seed": 3, "image_size": 32}
    steps = [{"step": "decontaminate", "eval_sets": [{**shapes, "n": 10}], "threshold": None,
              "hash_distance": 0}]
    summary = run_curation(config(shapes, steps, chunk_size=20, examples=3), tmp_path / "out",
                           progress=False)
    out = tmp_path / "out"
    assert summary["steps"][1]["dropped"] >= 10
    decision = json.loads((out / "steps/00-decontaminate/decision.json").read_text())
    for match in decision["report"]["matches"]:
        assert not Path(match["match_image"]).is_absolute()
        assert (out / match["match_image"]).is_file()
    md = (out / "report.md").read_text()
    assert all(f"report/00-decontaminate/match-{n}-ref.png" in md for n in range(3))
    assert (out / "report/00-decontaminate/match-2-ref.png").is_file()
    # hash only: no cosine, so the table shows the distance that matched
    assert "| similarity | hash distance |" in md
    assert re.search(r"\| shapes#0 \| .* \| eval_sets\\\[0\\\]:shapes#0 \| — \| 0 \|", md)


def test_a_step_no_item_reaches_runs_and_writes_an_empty_output(tmp_path, recwarn):
    """A step that drops everything leaves later steps with 0 items: the run still finishes,
    with every output written and the shards a valid set of 0 samples."""
    folder = make_folder(tmp_path / "pool", VALUES)
    summary = run_curation(config(str(folder), [{"step": "bright", "threshold": 300},
                                                {"step": "exact_dedup"}], chunk_size=3),
                           tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert [(s["name"], s["in"], s["kept"], s["dropped"]) for s in summary["steps"]] == [
        ("read", 10, 9, 1), ("bright", 9, 0, 9), ("exact_dedup", 0, 0, 0)]
    assert summary["kept"] == 0 and summary["output"]["count"] == 0
    assert len(dropped_rows(out)) == 10
    assert (out / "summary.json").is_file() and (out / "report.md").is_file()
    assert (out / "steps/01-exact_dedup/decision.json").is_file()
    assert not partial_path(out).exists()
    assert json.loads((out / "shards/index.json").read_text())["total"] == 0
    assert list(iter_items({"source": "shards", "path": str(out / "shards")},
                           progress=False)) == []
    assert "curate: nothing was kept: bright dropped the last 9 item(s)" in warned(recwarn)


def test_the_last_step_dropping_everything_writes_an_empty_shard_set(tmp_path):
    folder = make_folder(tmp_path / "pool", [200, 50])
    summary = run_curation(config(str(folder), [{"step": "bright", "threshold": 300}]),
                           tmp_path / "out", progress=False)
    assert summary["kept"] == 0
    index = json.loads((tmp_path / "out/shards/index.json").read_text())
    assert index["total"] == 0 and sum(s["count"] for s in index["shards"]) == 0
    assert list(iter_items({"source": "shards", "path": str(tmp_path / "out/shards")},
                           progress=False)) == []


def test_cli_a_pool_of_only_bad_rows_keeps_0(tmp_path, capsys):
    make_folder(tmp_path / "photos", [200])
    manifest = tmp_path / "bad.csv"
    manifest.write_text("image,caption\nnope.png,a thing\nphotos/img_00.png,\n")
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {manifest}\nsteps: [{{step: exact_dedup}}]\n"
                    "output: {format: manifest}\n")
    assert main(["curate", "--config", str(path), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "kept 0 of 2 items" in captured.out
    assert "nothing was kept: read dropped the last 2 item(s)" in captured.err
    out = tmp_path / "out"
    assert pq.read_table(out / "kept.parquet").num_rows == 0
    assert [r["step"] for r in dropped_rows(out)] == ["read", "read"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"][1] == {**summary["steps"][1], "in": 0, "kept": 0, "dropped": 0}


def test_a_manifest_without_a_caption_column_is_an_error_not_a_pool_of_drops(tmp_path):
    make_folder(tmp_path / "photos", [200])
    manifest = tmp_path / "nocap.csv"
    manifest.write_text("image,desc\nphotos/img_00.png,a cat\n")
    with pytest.raises(DataError, match=r"nocap.csv: no caption column \(looked for caption, "
                                        r"text, label, class; found: image, desc\); rename a "
                                        r"column or set the data spec's caption_col "
                                        r"\(data.caption_col=NAME with --data\)$"):
        run_curation(config(str(manifest), [{"step": "exact_dedup"}]), tmp_path / "out",
                     progress=False)
    assert list(tmp_path.glob("out*")) == []  # refused before reading: no OUT.partial left
    kept = run_curation(config({"source": "manifest", "path": str(manifest), "caption_col": "desc"},
                               [{"step": "exact_dedup"}], output={"format": "manifest"}),
                        tmp_path / "out", progress=False)
    assert kept["kept"] == 1


def test_process_pool_runs_the_language_rule(tmp_path):
    """The basic step's language identifier does not pickle; worker processes build their own
    and keep what one process keeps."""
    pytest.importorskip("langid")
    make_folder(tmp_path / "pool", [10, 20, 30, 40, 50, 60])
    manifest = tmp_path / "pool.csv"
    captions = ["a photo of a dog playing on the beach with a red ball",
                "ein Hund spielt am Strand mit einem roten Ball",
                "a small cat is sleeping on the warm sofa",
                "un chien joue sur la plage avec une balle rouge",
                "two people are riding bicycles along the river",
                "eine Katze schläft auf dem warmen Sofa"]
    manifest.write_text("image,caption\n" + "".join(
        f"pool/img_{i:02d}.png,{c}\n" for i, c in enumerate(captions)))
    steps = [{"step": "basic", "languages": ["en"]}]
    a = run_curation(config(str(manifest), steps, chunk_size=2), tmp_path / "a", progress=False)
    b = run_curation(config(str(manifest), steps, chunk_size=2, workers=2), tmp_path / "b",
                     progress=False)
    assert a["steps"][1]["kept"] == b["steps"][1]["kept"] == 3
    assert dropped_rows(tmp_path / "a") == dropped_rows(tmp_path / "b")
    assert all(r["reason"].startswith("caption language ") for r in dropped_rows(tmp_path / "b"))


def test_manifest_of_an_in_memory_source_reads_back_with_its_images(tmp_path):
    """An in-memory source's images are copied beside kept.parquet; the manifest reads back
    as the same pairs, and no path in it names the run's removed cache."""
    from cliplab.data.sources import load_source

    data = {"source": "shapes", "n": 5, "seed": 3}
    run_curation(config(data, [{"step": "exact_dedup"}], output={"format": "manifest"}),
                 tmp_path / "out", progress=False)
    out = tmp_path / "out"
    rows = pq.read_table(out / "kept.parquet").to_pylist()
    assert len(rows) == 5 and not (out / "cache").exists()
    for row in rows:
        assert (out / row["image"]).is_file()
        location = json.loads(row["location"])
        assert (out / location["stored"]).is_file() and location["stored"] == row["image"]
    again = list(iter_items({"source": "manifest", "path": str(out / "kept.parquet")},
                            progress=False))
    source = load_source(data)
    assert [i.caption for i in again] == [c[0] for c in source.captions]
    for item, image in zip(again, source.images):
        assert np.array_equal(np.asarray(item.read()), image.numpy()[..., :3])


def test_a_work_folder_of_another_seed_is_refused_not_resumed(tmp_path, monkeypatch):
    """``seed`` changes what is kept: a half-finished run, or a finished one not yet renamed,
    of seed 0 is refused by a run of seed 1 (not resumed, not moved into place as its own)."""
    from cliplab.curate import pipeline

    folder = make_folder(tmp_path / "pool", VALUES)
    steps = [{"step": "bright", "fail_on_chunk": 0}]
    with pytest.raises(RuntimeError, match="killed"):
        run_curation(config(str(folder), steps, chunk_size=3, seed=0), tmp_path / "half",
                     progress=False)
    with pytest.raises(ConfigError, match=r"half-finished `cliplab curate` run of another config "
                       r"\(seed 0 in the run, now 1\); rerun that config"):
        run_curation(config(str(folder), steps, chunk_size=3, seed=1), tmp_path / "half",
                     progress=False)
    assert not (tmp_path / "half").exists()

    def killed(work, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_move_into_place", killed)
    with pytest.raises(KeyboardInterrupt):  # finished, killed before the rename
        run_curation(config(str(folder), STEPS, chunk_size=3, seed=0), tmp_path / "done",
                     progress=False)
    monkeypatch.undo()
    monkeypatch.setitem(registry.STEPS, "bright", f"{__name__}:Bright")
    with pytest.raises(ConfigError, match=r"finished `cliplab curate` run of another config "
                       r"\(seed 0 in the run, now 1\), not yet moved"):
        run_curation(config(str(folder), STEPS, chunk_size=3, seed=1), tmp_path / "done",
                     progress=False)
    assert not (tmp_path / "done").exists() and partial_path(tmp_path / "done").is_dir()


def test_a_stopped_run_whose_step_model_changed_is_refused_not_resumed(tmp_path, capsys):
    """A step's cached scores came from its model as it was: when the folder's files change
    (a checkpoint re-exported in place) or a run folder's newest checkpoint moves on, resuming
    would mix two models in one decision. Refused, naming the step; --overwrite starts over;
    an untouched model resumes."""
    import os

    from tests.serve_helpers import save_tiny_model

    folder = make_folder(tmp_path / "pool", VALUES)
    model = save_tiny_model(tmp_path / "model")
    run = tmp_path / "run"
    save_tiny_model(run / "checkpoints" / "step-1" / "model")

    def stopped(out, model_spec):
        Bright.failed.clear()
        Bright.calls.clear()
        cfg = config(str(folder), [{"step": "bright", "fail_on_chunk": 1, "model": model_spec}],
                     chunk_size=3)
        with pytest.raises(RuntimeError, match="killed"):
            run_curation(cfg, out, progress=False)
        return cfg

    cfg = stopped(tmp_path / "out", str(model))
    stamp = (model / "config.json").stat()
    os.utime(model / "config.json", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match=rf"stopped run whose steps\[0\]\.model \({model}\) has "
                       "files rewritten, replaced or re-permissioned since it stopped: its scores "
                       "would mix two models; pass --overwrite"):
        run_curation(cfg, tmp_path / "out", progress=False)
    Bright.calls.clear()
    assert run_curation(cfg, tmp_path / "out", progress=False, overwrite=True)["pool"] == 10
    assert len(Bright.calls) == 4  # started over: every chunk mapped

    # another checkpoint of the same size copied over it, keeping the old modification time
    cfg = stopped(tmp_path / "again", str(model))
    weights = model / "model.safetensors"
    other = save_tiny_model(tmp_path / "other", seed=3) / "model.safetensors"
    stamp = weights.stat()
    assert other.stat().st_size == stamp.st_size
    weights.write_bytes(other.read_bytes())
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    with pytest.raises(ConfigError, match=r"has files rewritten, replaced or re-permissioned"):
        run_curation(cfg, tmp_path / "again", progress=False)

    cfg = stopped(tmp_path / "untouched", str(model))
    capsys.readouterr()
    Bright.calls.clear()
    run_curation(cfg, tmp_path / "untouched", progress=False)
    assert "resuming the stopped run" in capsys.readouterr().err and len(Bright.calls) == 3

    with pytest.warns(UserWarning, match="no results.json"):  # the run is still going
        cfg = stopped(tmp_path / "of_run", str(run))
    newer = save_tiny_model(run / "checkpoints" / "step-2" / "model", seed=2)
    with pytest.warns(UserWarning, match="no results.json"), pytest.raises(
            ConfigError, match=rf"steps\[0\]\.model now resolves to {newer}, not "):
        run_curation(cfg, tmp_path / "of_run", progress=False)


def test_cli_workers_reach_the_config(tmp_path, capsys):
    folder = make_folder(tmp_path / "pool", [200, 200, 60])
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {folder}\nsteps:\n  - {{step: exact_dedup}}\nworkers: 1\n")
    assert main(["curate", "--config", str(path), "--out", str(tmp_path / "out"),
                 "--workers", "2", "--no-progress", "chunk_size=2"]) == 0
    assert "kept 2 of 3 items" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["workers"] == 2


def _manifest(tmp_path, rows):
    """pool.csv beside the pool folder: one ``image,caption`` row per pair of ``rows``."""
    manifest = tmp_path / "pool.csv"
    manifest.write_text("image,caption\n" + "".join(f"{image},{caption}\n"
                                                    for image, caption in rows))
    return manifest


def test_a_caption_of_only_spaces_is_dropped_at_read_as_empty(tmp_path):
    folder = make_folder(tmp_path / "pool", [200, 210])
    manifest = _manifest(tmp_path, [("pool/img_00.png", "a bright square"),
                                    ("pool/img_01.png", '"   "')])
    summary = run_curation(config(str(manifest), [{"step": "exact_dedup"}],
                                  output={"format": "manifest"}), tmp_path / "out", progress=False)
    assert summary["steps"][0] == {**summary["steps"][0], "kept": 1, "dropped": 1}
    assert [(r["step"], r["reason"]) for r in dropped_rows(tmp_path / "out")] == [
        ("read", f"empty caption at {manifest} line 3 ({folder / 'img_01.png'})")]


CAPTION_WITH_MARKUP = "<b>x</b> & co | *y* _z_ [l](u) `c` a\\b &amp; ~~s~~"


def test_report_html_and_md_show_captions_as_written(tmp_path):
    """A caption holding HTML or Markdown is shown as written in report.html and in report.md
    as a Markdown viewer renders it (HTML allowed, as GitHub's and VS Code's): no bold, link,
    code or entity of its own, and its ``|`` does not split the table row."""
    from markdown_it import MarkdownIt

    make_folder(tmp_path / "pool", [50, 200])
    manifest = _manifest(tmp_path, [("pool/img_00.png", CAPTION_WITH_MARKUP),
                                    ("pool/img_01.png", "fine")])
    run_curation(config(str(manifest), [{"step": "bright", "threshold": 100}]),
                 tmp_path / "out", progress=False)
    shown = html.escape(CAPTION_WITH_MARKUP, quote=False)
    page = (tmp_path / "out" / "report.html").read_text()
    assert f"<td>{html.escape(CAPTION_WITH_MARKUP)}</td>" in page and "<b>x</b>" not in page
    md = (tmp_path / "out" / "report.md").read_text()
    viewer = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    rendered = viewer.render(md)
    assert f"<td>{shown}</td>" in rendered
    assert not re.search(r"<(b|em|a|code|s|del)\b", rendered)


def test_report_lists_every_read_drop_up_to_examples(tmp_path):
    make_folder(tmp_path / "pool", [200])
    manifest = _manifest(tmp_path, [("pool/img_00.png", "kept"), ("gone1.png", "a"),
                                    ("gone2.png", "b"), ("gone3.png", "c")])
    for examples, shown in ((3, 3), (5, 3), (2, 2)):
        out = tmp_path / f"out{examples}"
        run_curation(config(str(manifest), [{"step": "exact_dedup"}], examples=examples,
                            output={"format": "manifest"}), out, progress=False)
        keys = [r["key"] for r in dropped_rows(out) if r["step"] == "read"]
        assert len(keys) == 3
        md = (out / "report.md").read_text()
        assert [k for k in keys if f"| {k} | missing file at" in md] == keys[:shown]


@pytest.mark.parametrize("column", [np.zeros(2), np.zeros(4), np.array([{}, {}, {}])])
def test_a_map_column_of_another_length_or_of_objects_is_refused(tmp_path, column):
    """A step's map must give one numeric or string value per item of its chunk (a plugin's
    short column would misalign every later item's score)."""
    from cliplab.curate.engine import save_columns

    with pytest.raises(CliplabError, match=r"^step x: map column 'score' must be a numeric or "
                                           r"string array with one row per item \(3\)"):
        save_columns(tmp_path / "c.npz", {"score": column}, 3, "step x")
    assert not list(tmp_path.iterdir())
    save_columns(tmp_path / "c.npz", {"score": np.zeros(3), "key": np.array(["a", "b", "c"])},
                 3, "step x")


def test_run_curation_takes_a_plain_dict_and_names_what_is_wrong_with_one(tmp_path):
    """The Python entry point README documents failed with AttributeError on a dict, None or
    a path; it now checks a dict as a config file is checked (as run_pretrain does)."""
    folder = make_folder(tmp_path / "pool", [200, 50, 150])
    summary = run_curation({"data": str(folder), "steps": [{"step": "bright", "threshold": 100}]},
                           tmp_path / "out", progress=False)
    assert summary["kept"] == 2
    with pytest.raises(ConfigError, match=r"^the curate config: data is required; steps: "
                       r"expected a valid list, got 'basic'$"):
        run_curation({"steps": "basic"}, tmp_path / "o2")
    with pytest.raises(ConfigError, match=r"^the curate config: expected a mapping of keys "
                                          r"\(key: value\), got .c.yaml.$"):
        run_curation("c.yaml", tmp_path / "o3")


@pytest.mark.parametrize("extra, message", [
    ({"ray_address": "10.0.0.1:6379"}, r"^test: ray_address has no effect unless engine is "
     r"ray; drop it$"),
    ({"output": {"format": "manifest", "samples_per_shard": 50}},
     r"^test: output: samples_per_shard has no effect unless format is shards; drop it "
     r"\(output.samples_per_shard=null clears a recipe's\)$"),
])
def test_settings_that_change_nothing_are_refused(extra, message):
    with pytest.raises(ConfigError, match=message):
        config({"source": "digits"}, [], **extra)
    config({"source": "digits"}, [], engine="ray", ray_address="10.0.0.1:6379")
    config({"source": "digits"}, [], output={"format": "shards", "samples_per_shard": 50})


def test_a_shipped_recipe_switches_to_manifest_output_from_the_command_line():
    """configs/curate/basic.yaml sets a shard size: output.format=manifest alone is refused
    (the size would do nothing), and null clears it, as the error says."""
    from cliplab.config import load_config

    recipe = Path(__file__).resolve().parents[1] / "configs" / "curate" / "basic.yaml"
    with pytest.raises(ConfigError, match=r"samples_per_shard=null clears"):
        load_config(CurateConfig, recipe, ["output.format=manifest"])
    cfg = load_config(CurateConfig, recipe, ["output.format=manifest",
                                             "output.samples_per_shard=null"])
    assert cfg.output.format == "manifest" and cfg.output.samples_per_shard == 1000


def test_a_saved_config_of_every_changed_section_loads_again():
    """A saved config holds every key at its default, which the refusals let through."""
    steps = [{"step": "basic", "languages": ["en"], "min_language_confidence": 0.5},
             {"step": "basic", "name": "basic2"},
             {"step": "balance", "t": 5, "vocabulary": ["cat"]},
             {"step": "balance", "t": 5, "min_count": 3, "name": "balance2"},
             {"step": "decontaminate", "eval_sets": [{"source": "digits"}], "threshold": None},
             {"step": "dfn", "model": "tiny-clip", "trusted": {"source": "shapes"},
              "keep_top": 0.5}]
    for output in ({"format": "manifest"}, {"format": "shards", "samples_per_shard": 7}):
        saved = config({"source": "digits", "shift": "noise:0.1", "shift_seed": 3}, steps,
                       output=output, engine="ray", ray_address="h:1").to_dict()
        assert validate(CurateConfig, saved, "test").to_dict() == saved
        local = {**saved, "engine": "local", "ray_address": None}
        assert validate(CurateConfig, local, "test").to_dict() == local


@pytest.mark.parametrize("command", ["curate", "index"])
def test_a_missing_source_is_refused_before_a_work_folder_is_made(tmp_path, capsys, command):
    """A source path that does not exist left OUT.partial behind, which serve and a rerun then
    took for a stopped run to resume."""
    missing, out = tmp_path / "nothing.csv", tmp_path / "out"
    recipe = Path(__file__).parents[1] / "configs" / "curate" / "basic.yaml"
    args = ["--config", str(recipe)] if command == "curate" else \
        ["--model", "tiny-clip"]
    assert main([command, *args, "--data", str(missing), "--out", str(out),
                 "--no-progress"]) == 2
    assert f"manifest {missing} does not exist; check the path" in capsys.readouterr().err
    assert not partial_path(out).exists() and not out.exists()


def test_a_skip_reason_names_no_in_memory_buffer():
    """PIL names the BytesIO it could not decode (`<_io.BytesIO object at 0x7f...>`), which
    said nothing to a user; the item's key and place are named beside the message."""
    import io

    from cliplab.data.collection import skip_message

    with pytest.raises(OSError) as err:
        Image.open(io.BytesIO(b"not an image"))
    assert "BytesIO" in str(err.value) and skip_message(err.value) == "cannot identify image file"


def test_a_stopped_process_pool_drops_its_queued_chunks_and_stops_its_workers(tmp_path,
                                                                            monkeypatch):
    """Ctrl-C (or a kill, or a chunk's error) while workers map: leaving the pool waited for
    every queued chunk to be mapped, then threw the results away (a kill at chunk 1 of 1000
    waited for all 1000); later the running chunks still finished after the run had ended
    (minutes of CPU, the --out hold let go). Queued chunks are cancelled, running ones stopped."""
    import multiprocessing
    import time

    from cliplab.curate import engine
    from tests.curate_slow_step import SlowStep

    marks = tmp_path / "marks"
    marks.mkdir()
    chunks = {c: [{"key": f"k{c}", "caption": "x", "meta": {}, "location": {}}]
              for c in range(12)}

    def stopped(path, columns, n, what):
        raise KeyboardInterrupt  # the first chunk back: the user pressed Ctrl-C

    monkeypatch.setattr(engine, "save_columns", stopped)
    with pytest.raises(KeyboardInterrupt):
        engine.map_chunks(SlowStep(str(marks), 0.3), chunks, lambda c: tmp_path / f"{c}.npz",
                          tmp_path, workers=2, progress=False)
    mapped = len(list(marks.iterdir()))
    assert 1 <= mapped <= 6, mapped  # those under way when it stopped, not all 12

    # stopped when one chunk is back while the other worker maps for a minute: none maps on
    chunks = {0: [{"key": "slow", "caption": "x", "meta": {}, "location": {}}],
              1: [{"key": "quick", "caption": "x", "meta": {}, "location": {}}]}
    others = set(multiprocessing.active_children())  # not this pool's
    with pytest.raises(KeyboardInterrupt):
        engine.map_chunks(SlowStep(str(marks), 60.0, quick=("quick",)), chunks,
                          lambda c: tmp_path / f"x{c}.npz", tmp_path, workers=2, progress=False)
    for _ in range(60):  # exited by now; reaped within moments on a loaded machine
        if not set(multiprocessing.active_children()) - others:
            break
        time.sleep(0.5)
    assert set(multiprocessing.active_children()) - others == set()  # none maps on (60 s)


def test_a_worker_killed_ends_the_run_in_one_line_saying_how_to_resume(tmp_path):
    """The OOM killer (or kill -9) ended a worker: the run ended in a 60-line traceback of
    BrokenProcessPool; the chunks finished before it are kept for the resumed run."""
    from cliplab.curate import engine
    from cliplab.errors import CliplabError
    from tests.curate_slow_step import SlowStep

    marks = tmp_path / "marks"
    marks.mkdir()
    chunks = {c: [{"key": f"k{c}", "caption": "x", "meta": {}, "location": {}}]
              for c in range(4)}
    with pytest.raises(CliplabError) as died:
        engine.map_chunks(SlowStep(str(marks), 0.2, quick=("k0",), die=("k3",)), chunks,
                          lambda c: tmp_path / f"{c}.npz", tmp_path, workers=2,
                          desc="01-basic", progress=False)
    assert str(died.value) == (
        "step 01-basic: a worker process died (killed, or out of memory?); the chunks finished "
        "are kept: run the same command again to resume (with fewer --workers if memory is "
        "short)")
    assert (tmp_path / "0.npz").is_file()  # finished before the death: kept


def test_curated_shards_keep_every_caption_group_class_and_partner(tmp_path):
    """A sample's captions beyond the first, its group and its hard-negative partner reached
    the curated shards as nothing (300 samples of 800 captions and 269 groups read back as 300
    captions, no groups, in the audit). Kept now as `cliplab data shard` writes them: a partner
    renumbered, or gone with its partner; a labelled set's class too."""
    from cliplab.data.sources import load_source

    spec = {"source": "shapes", "n": 12, "seed": 2, "kinds": ["relation"],
            "counterfactuals": True}
    source = load_source(spec)
    assert (source.partners >= 0).any() and sum(map(len, source.captions)) > len(source)
    means = [float(np.asarray(im[..., :3], dtype=float).mean()) for im in source.images]
    # the dimmest image brighter than its twin: kept, its twin dropped
    threshold = min(m for i, m in enumerate(means) if m > means[int(source.partners[i])])
    kept_index = [i for i, m in enumerate(means) if m >= threshold]
    run_curation(config(spec, [{"step": "bright", "threshold": threshold}]), tmp_path / "out",
                 progress=False)
    back = load_source({"source": "shards", "path": str(tmp_path / "out/shards")})
    assert back.captions == [source.captions[i] for i in kept_index]
    assert back.groups.tolist() == [int(source.groups[i]) for i in kept_index]
    position = {i: n for n, i in enumerate(kept_index)}
    expected = [position.get(int(source.partners[i]), -1) for i in kept_index]
    assert back.partners.tolist() == expected and -1 in expected and max(expected) >= 0

    digits_spec = {"source": "digits", "split": "test", "classes": ["three", "seven"]}
    run_curation(config(digits_spec, [{"step": "bright", "threshold": 0}]),
                 tmp_path / "digits", progress=False)
    digits = load_source(digits_spec)
    samples = [json.loads(_member(item, "json")) for item in iter_items(
        {"source": "shards", "path": str(tmp_path / "digits/shards")}, progress=False)]
    assert [(s["label"], s["classname"], s["captions"], s["group"]) for s in samples] == [
        (int(label), digits.classnames[label], [digits.classnames[label]], int(label))
        for label in digits.labels]


def test_carried_captions_keep_repeats_and_read_a_manifests_json_column():
    """kept.parquet's captions column is JSON text: curating it again kept one caption. The
    scored caption leads; the others keep their order and their repeats."""
    from cliplab.curate.outputs import carried_fields

    record = {"key": "k", "caption": " a dog ", "location": {}, "meta": {
        "captions": json.dumps(["a cat", "a cat", "a dog", " "]), "group": 3}}
    assert carried_fields(record, {}) == {"captions": ["a dog", "a cat", "a cat"], "group": 3}
    record["meta"] = {"captions": "not json", "group": True}  # a flag is no group
    assert carried_fields(record, {}) == {"captions": ["a dog"], "group": None}


def test_a_partner_key_two_samples_share_names_no_partner():
    """Two source samples of one key (a foreign shard set): a partner naming it is ambiguous,
    so none (the shard reader resolves it so too), not whichever came last."""
    from cliplab.curate.outputs import carried_fields, kept_keys

    records = [{"key": f"{tar}.tar:7", "caption": "x", "location": {},
                "meta": {"key": "7"}} for tar in ("a", "b")]
    records.append({"key": "c.tar:8", "caption": "y", "location": {},
                    "meta": {"key": "8", "partner_key": "7"}})
    records.append({"key": "c.tar:9", "caption": "z", "location": {},
                    "meta": {"key": "9", "partner_key": "8"}})
    keys = kept_keys(records)
    # only the keys a partner_key names are held (a key per kept item cost ~150 bytes each):
    # "7" is two samples' (none), "8" the third's
    assert keys == {"8": "000000002"}
    assert kept_keys(records[:2]) == {}  # a pool naming no partner holds none
    assert "partner_key" not in carried_fields(records[2], keys)
    assert carried_fields(records[3], keys)["partner_key"] == "000000002"


@pytest.mark.parametrize("step, module", [
    ({"step": "basic", "languages": ["en"]}, "langid"),
    ({"step": "decontaminate", "eval_sets": [{"source": "digits", "split": "test"}],
      "threshold": None}, "imagehash"),
    ({"step": "semantic_dedup", "model": "tiny-clip"}, "faiss")])
def test_a_missing_package_is_refused_before_any_work(step, module, tmp_path, monkeypatch):
    """A step whose package is not installed failed only once the pool was read (after its
    images were cached in OUT.partial), leaving that folder behind."""
    import sys

    folder = make_folder(tmp_path / "pool", [200, 50])
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: no import finds it
    with pytest.raises(ConfigError, match=rf"steps\[1\] \({step['step']}\): .* needs {module}, "
                                          r"which is not installed: pip install 'cliplab\[curate\]'"):
        run_curation(config(str(folder), [{"step": "exact_dedup"}, step]), tmp_path / "out",
                     progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool"]


def test_every_registered_step_is_named_as_its_spec_names_it():
    """A ``STEPS`` key other than its ``Spec``'s ``step`` literal tells a user who typed the
    registered name that the name is wrong (``expected 'aspect_ratio', got 'aspect'``)."""
    import typing

    for name in registry.STEPS:
        spec = registry.step_class(name).Spec
        assert typing.get_args(spec.model_fields["step"].annotation) == (name,), name


@pytest.mark.parametrize("command", ["curate", "index"])
def test_a_collection_option_index_and_curate_do_not_read_is_named_with_the_config(
        tmp_path, capsys, command):
    """``holdout:`` on an image folder (an option of the loaders, not of index and curate's
    reader) was found only when the pool was read, as ``unknown option(s) ['holdout'] for
    reading a image-folder source (valid: ['path'])``: no file, no key, a Python list."""
    folder = make_folder(tmp_path / "pool", [200, 60])
    cfg = tmp_path / "c.yaml"
    head = "steps:\n  - {step: exact_dedup}\n" if command == "curate" else "model: tiny-clip\n"
    for data, message in [
            (f"{{source: image-folder, path: {folder}, holdout: [cow], limit: 3}}",
             "data: unknown options 'holdout', 'limit' for image-folder (index and curate "
             "read it with: path)"),
            (f"{{source: manifest, path: {folder / 'rows.csv'}, label_col: y}}",
             "data: unknown option 'label_col' for manifest (index and curate read it with: "
             "path, image_col, caption_col)"),
            (f"{{source: shards, path: {tmp_path / 'nothing'}}}",
             f"data: shards {tmp_path / 'nothing'} does not exist; check the path")]:
        cfg.write_text(f"{head}data: {data}\n", encoding="utf-8")
        assert main([command, "--config", str(cfg), "--out", str(tmp_path / "out"),
                     "--no-progress"]) == 2
        assert capsys.readouterr().err.strip() == f"cliplab: error: {cfg}: {message}"
        assert not (tmp_path / "out").exists() and not partial_path(tmp_path / "out").exists()


def test_a_caption_holding_dollar_signs_is_drawn_as_written_in_the_concept_plot(tmp_path):
    """The balance step's entries (the pool's n-grams) are tick labels: ``$x_$`` crashed the
    whole run at its report (matplotlib read it as math), ``$\\alpha$`` was drawn as α."""
    import matplotlib

    make_folder(tmp_path / "pool", [10, 20, 30, 40, 50])
    captions = ["price $x_$ today"] * 3 + ["$\\alpha$ blue circle"] * 2
    manifest = _manifest(tmp_path, [(f"pool/img_{i:02d}.png", c) for i, c in enumerate(captions)])
    run_curation(config(str(manifest), [{"step": "balance", "t": 1}]), tmp_path / "out",
                 progress=False)
    assert list((tmp_path / "out" / "report").glob("*-concepts.png"))
    assert "$x\\_$" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert matplotlib.rcParams["text.parse_math"]  # the user's own setting is left alone


def test_report_html_tables_scroll_in_their_own_box_and_fit_a_phone(tmp_path):
    """Wide tables (decontamination matches, absolute paths) made the whole page scroll
    sideways, and without a viewport tag a phone laid the page out at 980 px."""
    folder = make_folder(tmp_path / "pool", [200, 50, 200])
    run_curation(config(str(folder), STEPS), tmp_path / "out", progress=False)
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert ".scroll{overflow-x:auto" in page
    tables = page.count("<table>")
    assert tables >= 2 and page.count('<div class="scroll"><table>') == tables
    assert page.count("</table></div>") == tables


def test_a_source_file_restored_with_its_bytes_and_time_is_unchanged(tmp_path):
    """The stamp held the inode: a `cp -p` / rsync restore of the very same file (or a network
    file system remounted elsewhere) was refused as "rewritten or replaced", and only deleting
    the work went on."""
    from cliplab.curate.pool import changed_source, file_stamp

    folder = make_folder(tmp_path / "pool", VALUES)
    image = folder / "img_03.png"
    stamps = {str(image): file_stamp(str(image))}
    shutil.copy2(image, tmp_path / "copy.png")
    os.replace(tmp_path / "copy.png", image)
    assert changed_source(stamps) is None
    image.write_bytes(image.read_bytes() + b"x")
    assert changed_source(stamps) == f"{image} was rewritten or replaced"


@pytest.mark.parametrize("stopped", ["while reading", "after reading"])
def test_a_source_file_changed_while_a_run_was_stopped_is_refused(tmp_path, monkeypatch,
                                                                   stopped):
    """A file the stopped run had read, replaced by another picture under the same name: the
    resume took the steps done on the old picture and wrote the new bytes under the old
    caption. Refused, naming the file; a file moved away and back (nothing changed) resumes."""
    import cliplab.curate.pipeline as pipeline

    folder = make_folder(tmp_path / "pool", VALUES)
    steps = [{"step": "bright", "threshold": 100, "fail_on_chunk": 2}]
    if stopped == "while reading":
        monkeypatch.setattr(pipeline, "read_item",
                            _killed_once_at_item_4(pipeline.read_item, "killed"))
    cfg = config(str(folder), steps, chunk_size=2)
    with pytest.raises(RuntimeError, match="killed"):
        run_curation(cfg, tmp_path / "out", progress=False)
    done = partial_path(tmp_path / "out") / "cache" / "pool" / "done.json"
    assert done.is_file() == (stopped == "after reading")
    (folder / "img_02.png").rename(tmp_path / "away.png")  # moved away and back: unchanged
    (tmp_path / "away.png").rename(folder / "img_02.png")
    original = (folder / "img_01.png").read_bytes()
    Image.fromarray(np.full((12, 10, 3), 220, dtype=np.uint8)).save(folder / "img_01.png")
    work = partial_path(tmp_path / "out")
    with pytest.raises(DataError) as refused:
        run_curation(cfg, tmp_path / "out", progress=False)
    assert str(refused.value) == (
        f"{folder}: the source changed since the stopped run read it ({folder / 'img_01.png'} "
        "was rewritten or replaced): resumed, its items would be decided on and written partly "
        f"as they were, partly as they are; delete {work} to start over")
    (folder / "img_01.png").write_bytes(original)  # the same bytes again: still a new write
    with pytest.raises(DataError, match="img_01.png was rewritten or replaced"):
        run_curation(cfg, tmp_path / "out", progress=False)
    (folder / "img_01.png").unlink()  # while reading: the listing shifted, refused as such
    gone = "img_01.png is gone" if stopped == "after reading" else "read twice or never"
    with pytest.raises(DataError, match=gone):
        run_curation(cfg, tmp_path / "out", progress=False)
    shutil.rmtree(work)
    (folder / "img_01.png").write_bytes(original)
    Bright.failed.append(True)  # no kill this time
    assert run_curation(cfg, tmp_path / "out", progress=False)["pool"] == 10


def test_a_stopped_run_over_shards_checks_the_shards_and_an_unchanged_one_resumes(tmp_path):
    """Over a shard folder the shards are what is stamped: one rewritten is refused."""
    from cliplab.data.shards.from_files import write_source

    pool = tmp_path / "pool"
    folder = make_folder(tmp_path / "images", [200, 50, 150, 90, 250, 120])
    for image in folder.glob("*.png"):
        image.with_suffix(".txt").write_text(f"square {image.stem}", encoding="utf-8")
    write_source({"source": "image-folder", "path": str(folder), "captions": True}, pool,
                 samples_per_shard=3, image_format="png", progress=False)
    cfg = config({"source": "shards", "path": str(pool)},
                 [{"step": "bright", "threshold": 100, "fail_on_chunk": 1}], chunk_size=2)
    with pytest.raises(RuntimeError, match="killed"):
        run_curation(cfg, tmp_path / "out", progress=False)
    assert run_curation(cfg, tmp_path / "out", progress=False)["kept"] == 4  # unchanged
    _stopped_anew(cfg, tmp_path / "out", tmp_path / "out")
    shard = sorted(pool.glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes())  # rewritten in place
    with pytest.raises(DataError, match=rf"\({shard} was rewritten or replaced\)"):
        run_curation(cfg, tmp_path / "out", progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_image_that_cannot_be_read_after_the_read_step_is_one_line_naming_it(
        tmp_path, monkeypatch, capsys, workers):
    """An image read at ``read`` that a later step (or the writer) cannot read — rewritten or
    deleted under a running run — ended in a traceback naming only a BytesIO; it is one line
    naming the item and its file, saying the source changed (also from a worker process)."""
    folder = make_folder(tmp_path / "pool", [200, 50, 150])

    def prepare(self, context):  # the source changes once the pool was read
        (folder / "img_01.png").write_bytes(b"not an image any more")

    monkeypatch.setattr(Bright, "prepare", prepare)
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {folder}\nsteps:\n  - {{step: bright}}\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["curate", "--config", str(path), "--out", str(tmp_path / "out"),
                 "--no-progress", "--workers", str(workers), "chunk_size=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    work = partial_path(tmp_path / "out")
    assert err == (f"cliplab: error: item img_01.png: its image at {folder / 'img_01.png'} can "
                   "no longer be read (cannot identify image file): the source changed since "
                   f"the pool was read; put it back as it was, or delete {work} to start over")


def test_the_writers_name_an_item_whose_image_went_since_it_was_read(tmp_path):
    """write_kept reads each kept image's bytes again: a file gone or a shard cut short is a
    `SourceChanged` naming the item and where its image was."""
    from cliplab.curate.config import OutputSpec
    from cliplab.curate.outputs import write_kept
    from cliplab.curate.pool import SourceChanged

    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"x" * 100)
    records = [{"key": "a.png", "caption": "a red square", "meta": {},
                "location": {"file": str(tmp_path / "a.png")}},
               {"key": "00000.tar:k", "caption": "a red square", "meta": {},
                "location": {"tar": str(shard), "offset": 512, "size": 10, "name": "k.png"}}]
    with pytest.raises(SourceChanged, match=rf"^item a.png: its image at {tmp_path}/a.png "
                       r"can no longer be read \(No such file or directory\): the source"):
        write_kept(records, tmp_path, OutputSpec(format="shards"), {}, progress=False)
    for output in ("shards", "manifest"):  # a manifest copies an image out of its tar
        with pytest.raises(SourceChanged, match=rf"^item 00000.tar:k: its image at {shard} "
                           r"member k.png can no longer be read \(.*ends 10 bytes into the "
                           rf"member at byte 512\): the source changed since the pool was read"):
            write_kept(records[1:], tmp_path, OutputSpec(format=output), {}, progress=False)


def test_a_step_input_file_changed_while_a_run_was_stopped_is_refused(tmp_path, capsys):
    """balance decided from its entries file, then the run was killed: resumed after the file
    was edited, the output kept the decision made from the old entries, with config.yaml
    naming the new file. Refused, naming the file; --overwrite starts over (as a fresh run)."""
    entries = tmp_path / "entries.txt"
    entries.write_text("red\nyellow\n", encoding="utf-8")
    data = {"source": "shapes", "n": 24, "seed": 3}
    cfg = config(data, [{"step": "balance", "entries": str(entries), "t": 2},
                        {"step": "bright", "threshold": 0, "fail_on_chunk": 0}], chunk_size=6)
    with pytest.raises(RuntimeError, match="killed"):
        run_curation(cfg, tmp_path / "out", progress=False)
    work = partial_path(tmp_path / "out")
    assert (work / "steps" / "00-balance" / "decision.json").is_file()
    entries.write_text("square\ncross\ntriangle\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(work))} is a stopped run whose "
                       rf"steps\[0\] \(balance\) read a file that changed since "
                       rf"\({re.escape(str(entries))} holds other bytes now\): resumed, its "
                       r"decision would rest on the file as it was; pass --overwrite to start "
                       r"over$"):
        run_curation(cfg, tmp_path / "out", progress=False)
    Bright.failed.append(True)  # no kill from here on
    resumed = run_curation(cfg, tmp_path / "out", progress=False, overwrite=True)
    fresh = run_curation(cfg, tmp_path / "fresh", progress=False)
    assert resumed["steps"] == [{**s, "seconds": r["seconds"]}
                                for s, r in zip(fresh["steps"], resumed["steps"])]


def test_a_step_input_file_edited_before_the_step_started_resumes_with_it(tmp_path,
                                                                          monkeypatch):
    """Stamps are taken as a step starts: a run stopped while reading its pool, whose entries
    file is edited then, resumes and balances by the file as it now is (as a fresh run)."""
    import cliplab.curate.pipeline as pipeline

    entries = tmp_path / "entries.txt"
    entries.write_text("red\nyellow\n", encoding="utf-8")
    cfg = config({"source": "shapes", "n": 24, "seed": 3},
                 [{"step": "balance", "entries": str(entries), "t": 2}], chunk_size=2)
    monkeypatch.setattr(pipeline, "read_item", _killed_once_at_item_4(pipeline.read_item,
                                                                     "killed while reading"))
    with pytest.raises(RuntimeError, match="killed while reading"):
        run_curation(cfg, tmp_path / "out", progress=False)
    entries.write_text("square\ncross\ntriangle\n", encoding="utf-8")
    resumed = run_curation(cfg, tmp_path / "out", progress=False)
    fresh = run_curation(cfg, tmp_path / "fresh", progress=False)
    assert [s["kept"] for s in resumed["steps"]] == [s["kept"] for s in fresh["steps"]]
    assert not (tmp_path / "out" / "cache").exists()


def test_a_decontamination_set_changed_while_a_run_was_stopped_is_refused(tmp_path):
    """decontaminate's evaluation images feed its cached per-chunk matches: an image of an
    evaluation folder rewritten since the step started is refused, naming the folder; the
    suite file it names likewise; untouched, the run resumes."""
    pytest.importorskip("imagehash")
    evals = tmp_path / "evals"
    (evals / "noise").mkdir(parents=True)  # one class of two noise images (flat ones all
    rng = np.random.default_rng(0)        # hash alike: they would match the whole pool)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            evals / "noise" / f"img_0{i}.png")
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - {name: zs, task: zeroshot, data: {source: shapes, n: 4}}\n",
                     encoding="utf-8")
    steps = [{"step": "decontaminate", "eval_sets": [{"source": "image-folder",
                                                      "path": str(evals)}],
              "suite": str(suite), "threshold": None, "hash_distance": 0},
             {"step": "bright", "threshold": 0, "fail_on_chunk": 0}]
    cfg = config({"source": "shapes", "n": 10, "seed": 3}, steps, chunk_size=3)
    with pytest.raises(RuntimeError, match="killed"):
        run_curation(cfg, tmp_path / "out", progress=False)
    work = partial_path(tmp_path / "out")
    (evals / "noise" / "img_01.png").write_bytes((evals / "noise" / "img_00.png").read_bytes())
    with pytest.raises(DataError, match=rf"steps\[0\] \(decontaminate\) read a file that "
                       rf"changed since \(a file in {re.escape(str(evals))} was added, removed "
                       r"or changed \(told by size and modification time: a touch counts\)\)"):
        run_curation(cfg, tmp_path / "out", progress=False)
    _stopped_anew(cfg, tmp_path / "out", work)
    suite.write_text(suite.read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"\({re.escape(str(suite))} holds other bytes now\)"):
        run_curation(cfg, tmp_path / "out", progress=False)
    _stopped_anew(cfg, tmp_path / "out", work)
    # what its readers skip (hidden names: a Finder's .DS_Store, another run's lock) and a
    # touch of the suite, its bytes as they were, change nothing it read
    (evals / ".DS_Store").write_bytes(b"finder")
    (evals / "noise" / ".out.cliplab-lock").write_text("pid 1 on host", encoding="utf-8")
    (evals / ".hidden").mkdir()
    (evals / ".hidden" / "img_09.png").write_bytes(b"not data")
    os.utime(suite, ns=(suite.stat().st_atime_ns, suite.stat().st_mtime_ns + 10**9))
    assert run_curation(cfg, tmp_path / "out", progress=False)["pool"] == 10  # unchanged


def test_the_files_each_step_reads_are_named_for_stamping(tmp_path, monkeypatch):
    """balance's entries, dfn's trusted set and decontaminate's sets and suite (its datasets
    too) are what a resume checks, resolved as the spec is loaded; a folder's stamp moves when
    any file in it does."""
    from cliplab.curate.config import step_spec
    from cliplab.curate.inputs import changed_input, stamp_inputs

    monkeypatch.chdir(tmp_path)

    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - {name: zs, task: zeroshot, data: {source: manifest, "
                     f"path: {tmp_path / 'm.csv'}}}}}\n", encoding="utf-8")
    specs = {"balance": {"entries": "e.txt", "t": 2},
             "dfn": {"model": "tiny-clip", "keep_top": 0.5,
                     "trusted": {"source": "image-folder", "path": "trusted"}},
             "decontaminate": {"eval_sets": [{"source": "manifest", "path": "a.csv"}],
                               "suite": suite.name, "threshold": None}}  # relative
    named = {step: step_spec({"step": step, **spec}, "c.yaml", "steps[0]").input_paths()
             for step, spec in specs.items()}
    assert named == {"balance": [str(tmp_path / "e.txt")], "dfn": [str(tmp_path / "trusted")],
                     "decontaminate": [str(suite), str(tmp_path / "a.csv"),
                                       str(tmp_path / "m.csv")]}
    assert step_spec({"step": "exact_dedup"}, "c.yaml", "steps[0]").input_paths() == []
    folder = make_folder(tmp_path / "trusted", [10, 20])
    then = stamp_inputs([str(folder), "not-a-path"])
    assert list(then) == [str(folder)] and changed_input(then, [str(folder)]) is None
    (folder / "img_01.png").write_bytes(b"other")
    assert changed_input(then, [str(folder)]) == (
        f"a file in {folder} was added, removed or changed (told by size and modification "
        "time: a touch counts)")
    assert changed_input({}, [str(folder)]) == f"{folder} is new"


def test_a_step_input_file_touched_is_told_from_one_changed(tmp_path, monkeypatch):
    """A small file's stamp holds a digest of its bytes: touched (its bytes as they were) it
    is unchanged, other bytes of the same size are a change; a file over the digest limit is
    told by size and modification time alone, and the line says a touch counts. A file the
    step no longer reads, still there (a suite's relative path read from elsewhere), is not
    called gone."""
    import cliplab.curate.inputs as inputs

    small, big = tmp_path / "entries.txt", tmp_path / "big.txt"
    small.write_text("red\nyellow\n", encoding="utf-8")
    big.write_text("x" * 64, encoding="utf-8")
    monkeypatch.setattr(inputs, "DIGEST_LIMIT", 32)
    then = inputs.stamp_inputs([str(small), str(big)])

    def touch(path):
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    touch(small)
    assert inputs.changed_input(then, [str(small), str(big)]) is None
    small.write_text("red\nyellaw\n", encoding="utf-8")
    assert inputs.changed_input(then, [str(small)]) == f"{small} holds other bytes now"
    touch(big)
    assert inputs.changed_input({str(big): then[str(big)]}, [str(big)]) == (
        f"{big} has another size or modification time (a file over 0 MB is not read to "
        "compare: a touch counts)")
    assert inputs.changed_input({str(big): then[str(big)]}, [str(small)]) == (
        f"{big} is no longer one it reads; it reads {small} now")


def test_a_relative_step_file_is_resolved_as_the_config_is_loaded(tmp_path, monkeypatch):
    """balance's ``entries: entries.txt`` was kept as written and stamped against the current
    folder: the same config resumed from another folder was refused as if the first file "is
    gone" (it was there). Resolved when loaded, the request and config.yaml name the file, and
    that resume is another config's; a run stopped with the path kept as written (before this)
    resumes from its own folder."""
    for name in ("A", "B"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "entries.txt").write_text("red\nyellow\n", encoding="utf-8")
    raw = {"data": {"source": "shapes", "n": 24, "seed": 3}, "chunk_size": 6,
           "steps": [{"step": "balance", "entries": "entries.txt", "t": 2},
                     {"step": "bright", "threshold": 0, "fail_on_chunk": 0}]}
    out, entries = tmp_path / "out", tmp_path / "A" / "entries.txt"
    monkeypatch.chdir(tmp_path / "A")
    with pytest.raises(RuntimeError, match="killed"):
        run_curation(raw, out, progress=False)
    work = partial_path(out)
    state = json.loads((work / "state.json").read_text(encoding="utf-8"))
    assert state["request"]["steps"][0]["entries"] == str(entries)
    monkeypatch.chdir(tmp_path / "B")
    with pytest.raises(ConfigError, match=r"is a half-finished `cliplab curate` run of another "
                       r"config \(steps\.0\.entries '") as refused:
        run_curation(raw, out, progress=False)
    assert "is gone" not in str(refused.value)
    state["request"]["steps"][0]["entries"] = "entries.txt"  # as a run before this kept it
    (work / "state.json").write_text(json.dumps(state), encoding="utf-8")
    monkeypatch.chdir(tmp_path / "A")
    Bright.failed.append(True)  # no kill from here on
    assert run_curation(raw, out, progress=False)["pool"] == 24
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert saved["steps"][0]["entries"] == str(entries)


def test_kept_shards_land_in_an_output_folder_named_with_percent_signs(tmp_path, capsys):
    """``%`` in ``--out`` is no shard-number pattern (it was a traceback at the very end)."""
    recipe = Path(__file__).parents[1] / "configs" / "curate" / "basic.yaml"
    out = tmp_path / "cur 100% %d"
    assert main(["curate", "--config", str(recipe), "--out", str(out), "data.n=30",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert [p.name for p in (out / "shards").glob("*.tar")] == ["00000.tar"]


@pytest.mark.parametrize("output", ["manifest", "shards"])
def test_a_pool_folder_named_with_bytes_that_are_no_utf8_is_curated(tmp_path, output):
    """A folder named in Latin-1 (``data\\xff``) is read; its path cannot be a Parquet string,
    so a manifest keeps a copy of each kept image (its exact path in ``location``), and the
    dropped list and the report show the byte escaped. It was a traceback after the run."""
    folder = make_folder(tmp_path / os.fsdecode(b"data\xff"), VALUES)
    out = tmp_path / "out"
    summary = run_curation(config(str(folder), STEPS, examples=1, output={"format": output}),
                           out, progress=False)
    assert summary["kept"] == 4
    if output == "manifest":
        kept = pq.read_table(out / "kept.parquet").to_pylist()
        assert [row["image"] for row in kept] == [f"images/{n:09d}.png" for n in range(4)]
        assert json.loads(kept[1]["location"]) == {"file": str(folder / "img_02.png")}
        assert (out / kept[1]["image"]).read_bytes() == (folder / "img_02.png").read_bytes()
    reasons = {d["key"]: d["reason"] for d in pq.read_table(out / "dropped.parquet").to_pylist()}
    assert reasons["img_04.png"].startswith(f"unreadable image at {tmp_path}/data\\xff/img_04.png")
    assert f"{tmp_path}/data\\xff" in (out / "report.md").read_text(encoding="utf-8")


def test_a_step_input_that_is_a_fifo_is_stamped_without_reading_it(tmp_path):
    """A small input's stamp reads its bytes for a digest; a FIFO (or device) named as a step's
    file was read too, which waits for a writer for ever: only regular files are read."""
    import subprocess
    import sys

    fifo = tmp_path / "entries.fifo"
    os.mkfifo(fifo)
    code = ("import sys; from pathlib import Path; from cliplab.curate.inputs import path_stamp; "
            "print(len(path_stamp(Path(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "2", done.stderr  # size, mtime

