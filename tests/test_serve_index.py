"""`cliplab index`: sources with their original files, skipped files, resume after a kill,
refusals, --add, the FAISS index choice and tuning."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from cliplab.cli import main
from cliplab.data.shapes import load_shapes
from cliplab.data.types import SkipReport
from cliplab.errors import CliplabError, ConfigError, DataError, ModelError
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.fingerprints import embedding_identity
from cliplab.serve import build as build_module
from cliplab.serve import faiss_index
from cliplab.serve.index import SearchIndex
from cliplab.serve.store import MetadataStore
from tests.ports import free_port
from tests.serve_helpers import SHAPES, build, direct_image_embeddings, index_config, save_tiny_model
from tests.stamped import assert_stamped, now
from tests.warned import warned

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def test_in_memory_source_stores_pngs_and_embeds_like_the_model(model_dir, tmp_path):
    record = build(model_dir, SHAPES, tmp_path / "idx", chunk=16)
    assert record["count"] == 40 and record["skipped"]["total"] == 0
    assert record["faiss"]["type"] == "Flat"  # exact below 100k vectors
    index = SearchIndex(tmp_path / "idx")
    data = load_shapes(n=40, seed=3, kinds=["single"], image_size=32)
    row = index.items([7])[7]
    assert row["caption"] == data.captions[7][0] and row["meta"]["captions"] == data.captions[7]
    stored = np.asarray(Image.open(index.image_source(row)["file"]))
    assert np.array_equal(stored, data.images[7].numpy())
    expected = direct_image_embeddings(DualEncoder.load(model_dir), data.images)
    assert np.allclose(np.asarray(index.vectors), expected, atol=1e-5)


def _image_folder(root):
    root.mkdir()
    data = load_shapes(n=6, seed=1, kinds=["single"], image_size=32)
    for i in range(6):
        sub = root / ("reds" if i % 2 else "others")
        sub.mkdir(exist_ok=True)
        Image.fromarray(data.images[i].numpy()).save(sub / f"img_{i}.png")
    (root / "others" / "broken.png").write_bytes(b"not a png at all")
    (root / "notes.txt").write_text("not an image")
    return data


def test_image_folder_skips_and_lists_unreadable_files(model_dir, tmp_path):
    _image_folder(tmp_path / "photos")
    record = build(model_dir, str(tmp_path / "photos"), tmp_path / "idx")
    assert record["count"] == 6 and record["skipped"]["total"] == 2
    assert record["skipped"]["counts"] == {"not_an_image": 1, "unreadable_image": 1}
    index = SearchIndex(tmp_path / "idx")
    skipped = dict(index.store.skipped())
    assert skipped["others/broken.png"].startswith("unreadable_image")
    assert skipped["notes.txt"].startswith("not_an_image: notes.txt: not an image")
    rows = index.items(range(6)).values()
    assert {r["key"] for r in rows} == {f"{'reds' if i % 2 else 'others'}/img_{i}.png"
                                        for i in range(6)}
    for r in rows:  # served from the original file, no copy
        assert index.image_source(r)["file"] == str((tmp_path / "photos" / r["key"]).resolve())
        assert r["meta"]["folder"] in ("reds", "others")


def test_index_json_lists_a_few_skipped_keys_of_each_reason_and_meta_sqlite_all(
        model_dir, tmp_path, monkeypatch):
    """index.json listed every skipped key, and a server parses it whole: a million broken
    links made it tens of MB. It lists `SKIPPED_KEYS_LISTED` of each reason and counts the
    rest; meta.sqlite's table `skipped` keeps every key."""
    monkeypatch.setattr(build_module, "SKIPPED_KEYS_LISTED", 2)
    _image_folder(tmp_path / "photos")
    rows = [json.dumps({"image": f"photos/reds/img_{i}.png", "caption": "red"}) for i in (1, 3)]
    rows += [json.dumps({"image": f"photos/gone_{i}.png", "caption": "gone"}) for i in range(5)]
    rows.append(json.dumps({"image": "photos/notes.txt", "caption": "text"}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows), encoding="utf-8")
    record = build(model_dir, str(tmp_path / "m.jsonl"), tmp_path / "idx")
    skipped = record["skipped"]
    assert skipped["total"] == 6
    assert skipped["counts"] == {"missing_file": 5, "unreadable_image": 1}
    assert len(skipped["keys"]["missing_file"]) == 2
    assert len(skipped["keys"]["unreadable_image"]) == 1
    assert skipped["keys_not_listed"] == 3
    written = (tmp_path / "idx" / "index.json").read_text(encoding="utf-8")
    assert json.loads(written)["skipped"] == skipped
    read_back = SkipReport.from_dict(skipped)  # its counts whole, not the listed keys'
    assert read_back.total == 6 and read_back.to_dict(2) == skipped
    assert len(SearchIndex(tmp_path / "idx").store.skipped()) == 6


def test_manifest_columns_become_metadata(model_dir, tmp_path):
    data = _image_folder(tmp_path / "photos")
    lines = [json.dumps({"image": f"photos/reds/img_{i}.png", "caption": data.captions[i][0],
                         "license": "cc-by", "rank": i}) for i in (1, 3, 5)]
    lines.append(json.dumps({"image": "photos/missing.png", "caption": "gone"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    record = build(model_dir, str(tmp_path / "m.jsonl"), tmp_path / "idx")
    assert record["count"] == 3 and record["skipped"]["total"] == 1
    row = SearchIndex(tmp_path / "idx").items([1])[1]
    assert row["caption"] == data.captions[3][0]
    assert row["meta"] == {"caption": data.captions[3][0], "license": "cc-by", "rank": 3}
    # the skip names the file line to look at (the key counts data rows: a CSV's row 4 is
    # its line 5)
    (tmp_path / "m.csv").write_text("image,caption\nphotos/reds/img_1.png,one\n"
                                    "photos/reds/img_3.png,two\nphotos/reds/img_5.png,three\n"
                                    "photos/missing.png,gone\n")
    build(model_dir, str(tmp_path / "m.csv"), tmp_path / "idx_csv")
    [(key, reason)] = SearchIndex(tmp_path / "idx_csv").store.skipped()
    assert key == "m.csv:4:photos/missing.png"
    assert reason.startswith("missing_file: m.csv line 5: ")


def test_shards_are_served_from_their_tar(model_dir, tmp_path):
    from cliplab.data.shards import write_shards

    data = load_shapes(n=12, seed=2, kinds=["single"], image_size=32)
    write_shards(data, tmp_path / "shards", samples_per_shard=5, image_format="png", progress=False)
    record = build(model_dir, str(tmp_path / "shards"), tmp_path / "idx")
    assert record["count"] == 12
    index = SearchIndex(tmp_path / "idx")
    for i in (0, 6, 11):
        source = index.image_source(index.items([i])[i])
        with open(source["tar"], "rb") as f:
            f.seek(source["offset"])
            image = Image.open(__import__("io").BytesIO(f.read(source["size"])))
            assert np.array_equal(np.asarray(image.convert("RGB")), data.images[i].numpy())
    assert index.items([4])[4]["caption"] == data.captions[4][0]



def test_a_truncated_shard_keeps_what_it_holds_and_counts_the_loss(model_dir, tmp_path, capsys):
    """A shard cut short (a copy that stopped) gives its samples before the cut, the same
    ones the training and evaluation reader keeps, one skip saying how far it got, and one per
    sample lost (index.json counts 6), as that reader counts them."""
    from cliplab.data.shards import write_shards
    from cliplab.data.shards.read import load_shards

    data = load_shapes(n=12, seed=2, kinds=["single"], image_size=32)
    write_shards(data, tmp_path / "shards", samples_per_shard=6, image_format="png",
                 progress=False)
    first = tmp_path / "shards" / "00000.tar"
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    read = load_shards(tmp_path / "shards", progress=False)
    out = tmp_path / "idx"
    assert main(["index", "--model", str(model_dir), "--data", str(tmp_path / "shards"),
                 "--out", str(out), "--no-progress"]) == 0
    index = SearchIndex(out)
    keys = [index.items([i])[i]["key"] for i in range(index.count)]
    assert 6 < len(keys) < 12 and len(keys) == len(read)  # the 6 of 00001.tar and some of 00000
    assert keys[-6:] == [f"00001.tar:{k:09d}" for k in range(6, 12)]
    # the cut left the fourth sample without its image: lost with the two after it, in
    # both readers
    skipped = dict(index.store.skipped())
    assert read.skipped.counts == {"truncated_shard": 1, "cut_off": 3}
    assert set(skipped) == {"00000.tar", "00000.tar:sample 4 of 6", "00000.tar:sample 5 of 6",
                            "00000.tar:sample 6 of 6"}
    assert skipped["00000.tar:sample 6 of 6"].startswith("cut_off: ")
    assert skipped["00000.tar"].startswith(
        f"truncated_shard: 00000.tar: read {len(keys) - 6} of 6 samples, then:")
    record = json.loads((out / "index.json").read_text())
    # as every command's skip record: the lost samples, the shard read in part apart
    assert record["skipped"] == {"total": 3, "shards_read_in_part": 1,
                                 "counts": {"truncated_shard": 1, "cut_off": 3},
                                 "keys": {"truncated_shard": ["00000.tar"], "cut_off": [
                                     f"00000.tar:sample {i} of 6" for i in (4, 5, 6)]}}
    assert "each is listed with its reason in " \
        f"{out / 'meta.sqlite'} (table skipped)" in capsys.readouterr().err

class Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise runs (not even `except Exception`)."""


def _killed_build(monkeypatch, adds: int, *args, **kwargs) -> None:
    """``build(*args, **kwargs)`` killed (`Killed`) once ``adds`` chunks' rows are committed to
    meta.sqlite, the last one's progress record never written."""
    real_add, calls = MetadataStore.add, []

    def add_then_die(self, rows, skipped=()):
        real_add(self, rows, skipped)
        calls.append(1)
        if len(calls) == adds:
            raise Killed

    monkeypatch.setattr(MetadataStore, "add", add_then_die)
    with pytest.raises(Killed):
        build(*args, **kwargs)
    monkeypatch.setattr(MetadataStore, "add", real_add)


def test_a_killed_run_is_refused_then_resumed_to_the_same_index(model_dir, tmp_path,
                                                                 monkeypatch, capsys):
    build(model_dir, SHAPES, tmp_path / "whole", chunk=8)
    # rows of chunk 3 committed, its progress record never written
    _killed_build(monkeypatch, 3, model_dir, SHAPES, tmp_path / "idx", chunk=8)

    assert not (tmp_path / "idx").exists()
    with pytest.raises(DataError, match="not built yet.*run the same command again"):
        SearchIndex(tmp_path / "idx")
    with pytest.raises(DataError, match="half-built"):
        SearchIndex(tmp_path / "idx.partial")
    progress = json.loads((tmp_path / "idx.partial" / "progress.json").read_text())
    assert progress["count"] == 16  # two chunks recorded; the third is dropped on resume

    with pytest.raises(ConfigError, match="half-built index of another"):
        build(model_dir, {**SHAPES, "seed": 4}, tmp_path / "idx", chunk=8)
    capsys.readouterr()
    record = build(model_dir, SHAPES, tmp_path / "idx", chunk=8)
    assert record["count"] == 40 and not (tmp_path / "idx.partial").exists()
    assert (f"index: resuming the stopped run in {tmp_path / 'idx.partial'} (16 items "
            "embedded)") in capsys.readouterr().err
    resumed, whole = SearchIndex(tmp_path / "idx"), SearchIndex(tmp_path / "whole")
    assert np.array_equal(np.asarray(resumed.vectors), np.asarray(whole.vectors))
    assert [r["key"] for r in resumed.items(range(40)).values()] == \
        [r["key"] for r in whole.items(range(40)).values()]
    assert sorted(p.name for p in (tmp_path / "idx" / "images").iterdir()) == \
        sorted(f"{i}.png" for i in range(40))


def test_an_index_still_being_built_is_not_called_stopped(tmp_path):
    """`serve` during a first `cliplab index` build said the build was stopped and to run it
    again (which the live run's lock would refuse): a held build is said to be under way."""
    import fcntl

    (tmp_path / "idx.partial").mkdir()
    (tmp_path / "idx.partial" / "progress.json").write_text("{}", encoding="utf-8")
    with open(tmp_path / ".idx.cliplab-lock", "wb") as lock:  # as a live `cliplab index` holds
        lock.write(b"pid 4242")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for given in ("idx", "idx.partial"):
            with pytest.raises(DataError, match=r"idx is not built yet: a `cliplab index` run "
                                                r"\(pid 4242\) is building it now; serve it "
                                                r"once that run ends"):
                SearchIndex(tmp_path / given)
    with pytest.raises(DataError, match="holds a stopped `cliplab index` run"):
        SearchIndex(tmp_path / "idx")
    # another user's lock this user cannot open: maybe building, maybe left; not said to build
    from cliplab.output_lock import Holder
    from cliplab.serve import index as index_module

    unseen = Holder("uid 7", tmp_path / ".idx.cliplab-lock", sure=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(index_module, "holder_of", lambda path: unseen)
        with pytest.raises(DataError, match=r"idx is not built yet, and .*\.idx\.cliplab-lock is "
                                            r"another user's lock file \(uid 7\), which this user "
                                            r"cannot open to see whether their `cliplab index` run "
                                            r"builds it now; ask them$"):
            SearchIndex(tmp_path / "idx")


def test_killed_while_finishing_is_resumed(model_dir, tmp_path, monkeypatch):
    def die(*args, **kw):
        raise Killed

    monkeypatch.setattr(build_module.faiss_index, "write_faiss", die)
    with pytest.raises(Killed):
        build(model_dir, SHAPES, tmp_path / "idx")
    monkeypatch.undo()
    with pytest.raises(DataError, match="not built yet"):
        SearchIndex(tmp_path / "idx")
    assert build(model_dir, SHAPES, tmp_path / "idx")["count"] == 40
    assert SearchIndex(tmp_path / "idx").count == 40


def test_killed_before_the_rename_is_put_in_place_by_its_own_command_only(model_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """A kill after the index was complete but before `OUT.partial` became `OUT`: the same
    command put it in place, then failed with a KeyError traceback (exit 1); another command
    (other data) silently got the killed run's index. Now the first finishes with its summary,
    exit 0; the second is refused, naming the stopped run's data."""
    def die(*args, **kw):
        raise Killed

    photos = tmp_path / "photos"
    _image_folder(photos)  # 6 images, a broken one, a text file
    monkeypatch.setattr(build_module, "swap_in", die)
    with pytest.raises(Killed):
        build(model_dir, str(photos), tmp_path / "idx")
    monkeypatch.undo()
    assert (tmp_path / "idx.partial" / "index.json").is_file() and not (tmp_path / "idx").exists()
    with pytest.raises(ConfigError, match=r"idx.partial is a complete index of another `cliplab "
                                          rf"index` run \(data {photos}\) that stopped before it was moved"):
        build(model_dir, {**SHAPES, "n": 12}, tmp_path / "idx")
    command = ["index", "--model", str(model_dir), "--data", str(photos), "--out",
               str(tmp_path / "idx"), "--no-progress"]
    capsys.readouterr()
    assert main(command) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"index {tmp_path / 'idx'}: 6 items (2 skipped)")
    assert "skipped 2 item(s) (not_an_image=1, unreadable_image=1)" in err
    assert SearchIndex(tmp_path / "idx").count == 6 and not (tmp_path / "idx.partial").exists()

def test_add_appends_and_skips_what_is_indexed(model_dir, tmp_path):
    build(model_dir, SHAPES, tmp_path / "idx")
    with pytest.raises(ConfigError, match="already exists.*--add"):
        build(model_dir, SHAPES, tmp_path / "idx")
    more = {**SHAPES, "n": 10}  # the first 10 of the same source: shapes#0..9 again
    _image_folder(tmp_path / "photos")
    started = now()
    record = build(model_dir, str(tmp_path / "photos"), tmp_path / "idx", add=True)
    assert record["count"] == 46 and len(record["sources"]) == 2
    # an --add writes the record again: created is when the index took its last items
    assert_stamped(json.loads((tmp_path / "idx" / "index.json").read_text(encoding="utf-8")),
                   started, now())
    index = SearchIndex(tmp_path / "idx")
    assert index.items([40])[40]["key"].endswith(".png") and index.items([0])[0]["key"] == "shapes#0"
    assert np.asarray(index.vectors).shape == (46, 16)
    again = build(model_dir, more, tmp_path / "idx", add=True)  # shapes#0..9 already indexed
    assert again["count"] == 46 and again["skipped"]["total"] == 2 and \
        again["already_indexed"] == 10
    assert (tmp_path / "idx" / "images" / "39.png").is_file()


def test_add_of_a_manifest_takes_appended_rows_and_refuses_rows_moved_above(model_dir, tmp_path):
    """A manifest's items are keyed by row number and image: a row inserted above the end
    re-keyed every row below, and `--add` indexed each of their images a second time
    (silently). Rows appended at the end are added; rows moved are refused, naming the row,
    before anything is embedded, and the index stays as it was."""
    _image_folder(tmp_path / "photos")
    manifest = tmp_path / "m.csv"
    rows = ["photos/reds/img_1.png,one", "photos/reds/img_3.png,two", "photos/reds/img_5.png,three"]
    manifest.write_text("image,caption\n" + "\n".join(rows[:2]) + "\n")
    build(model_dir, str(manifest), tmp_path / "idx")
    index_json = (tmp_path / "idx" / "index.json").read_bytes()
    manifest.write_text("image,caption\n" + "\n".join([rows[2], *rows[:2]]) + "\n")
    with pytest.raises(DataError, match=r"^--add: m.csv row 1 is 'photos/reds/img_5.png' now, but "
                                        r"the index holds row 1 as 'photos/reds/img_1.png'"):
        build(model_dir, str(manifest), tmp_path / "idx", add=True)
    assert (tmp_path / "idx" / "index.json").read_bytes() == index_json
    assert not (tmp_path / "idx.partial").exists()
    manifest.write_text("image,caption\n" + "\n".join(rows[1:]) + "\n")  # row 1 removed
    with pytest.raises(DataError, match="m.csv row 1 is 'photos/reds/img_3.png' now"):
        build(model_dir, str(manifest), tmp_path / "idx", add=True)
    manifest.write_text("image,caption\n" + "\n".join(rows) + "\n")  # one appended
    record = build(model_dir, str(manifest), tmp_path / "idx", add=True)
    assert record["count"] == 3 and record["already_indexed"] == 2
    keys = [row["key"] for row in SearchIndex(tmp_path / "idx").items(range(3)).values()]
    assert keys == [f"m.csv:{i + 1}:{row.split(',')[0]}" for i, row in enumerate(rows)]
    # a skipped row (a missing file) holds its number too: removing it shifts the rows below
    manifest.write_text("image,caption\n" + "\n".join([*rows, "gone.png,lost", rows[0]]) + "\n")
    assert build(model_dir, str(manifest), tmp_path / "idx", add=True)["count"] == 4
    manifest.write_text("image,caption\n" + "\n".join([*rows, rows[0]]) + "\n")
    with pytest.raises(DataError, match="m.csv row 4 is 'photos/reds/img_1.png' now, but the "
                                        "index holds row 4 as 'gone.png'"):
        build(model_dir, str(manifest), tmp_path / "idx", add=True)

def test_adding_a_folder_again_lists_its_skips_once(model_dir, tmp_path, capsys):
    """Items the index holds are counted in the run's message, not listed as skipped; a file
    skipped before is not listed again, however often its folder is added."""
    _image_folder(tmp_path / "photos")
    build(model_dir, str(tmp_path / "photos"), tmp_path / "idx")
    for _ in range(2):
        assert main(["index", "--model", str(model_dir), "--data", str(tmp_path / "photos"),
                     "--out", str(tmp_path / "idx"), "--add", "--no-progress"]) == 0
        captured = capsys.readouterr()
        assert f"nothing to add: 6 item(s) of {(tmp_path / 'photos').resolve()} are in the " \
            "index already and 2 were skipped before" in captured.out
        assert "skipped" not in captured.err  # the index's earlier skips are not this run's
    record = json.loads((tmp_path / "idx" / "index.json").read_text(encoding="utf-8"))
    assert record["count"] == 6 and record["skipped"]["total"] == 2
    assert record["skipped"]["counts"] == {"not_an_image": 1, "unreadable_image": 1}
    index = SearchIndex(tmp_path / "idx")
    assert sorted(key for key, _ in index.store.skipped()) == ["notes.txt", "others/broken.png"]
    index.close()
    # an --add that skips something says what it skipped, not the index's total
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "bad.png").write_bytes(b"not a png either")
    shutil.copy(tmp_path / "photos" / "reds" / "img_1.png", tmp_path / "more" / "red.png")
    assert main(["index", "--model", str(model_dir), "--data", str(tmp_path / "more"),
                 "--out", str(tmp_path / "idx"), "--add", "--no-progress"]) == 0
    assert capsys.readouterr().err.startswith("skipped 1 item(s) (unreadable_image=1); ")


def _files(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Each file under ``folder`` (and the folder itself): inode, mtime and bytes."""
    files = {".": (folder.stat().st_ino, folder.stat().st_mtime_ns, b"")}
    for path in sorted(folder.rglob("*")):
        info = path.stat()
        files[str(path.relative_to(folder))] = (
            info.st_ino, info.st_mtime_ns, path.read_bytes() if path.is_file() else b"")
    return files


def test_an_add_that_finds_nothing_new_leaves_the_index_as_it_was(model_dir, tmp_path, capsys,
                                                                  monkeypatch):
    """A re-run of `--add` over a folder indexed whole (from cron, say) rebuilt the whole
    index all the same (every file rewritten, the FAISS index built again) and recorded the
    folder in `sources` once more on each run. It changes nothing now, and says so in one
    line; an --add of the folder grown adds just its new items and records it once."""
    _image_folder(tmp_path / "photos")
    build(model_dir, str(tmp_path / "photos"), tmp_path / "idx")
    before = _files(tmp_path / "idx")
    monkeypatch.setattr(faiss_index, "build_faiss", None)  # not built again
    for _ in range(2):
        assert main(["index", "--model", str(model_dir), "--data", str(tmp_path / "photos"),
                     "--out", str(tmp_path / "idx"), "--add", "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and out.startswith(f"index {tmp_path / 'idx'}: nothing to add")
        assert _files(tmp_path / "idx") == before and not (tmp_path / "idx.partial").exists()
    monkeypatch.undo()
    # other settings asked are applied, though nothing is new
    record = build(model_dir, str(tmp_path / "photos"), tmp_path / "idx", add=True,
                   index_type="hnsw")
    assert record["faiss"]["type"].startswith("HNSW") and "unchanged" not in record
    shutil.copy(tmp_path / "photos" / "reds" / "img_1.png", tmp_path / "photos" / "new.png")
    assert main(["index", "--model", str(model_dir), "--data", str(tmp_path / "photos"),
                 "--out", str(tmp_path / "idx"), "--add", "--no-progress"]) == 0
    assert "6 item(s) of the collection were in the index already" in capsys.readouterr().out
    record = json.loads((tmp_path / "idx" / "index.json").read_text(encoding="utf-8"))
    assert record["count"] == 7 and record["skipped"]["total"] == 2
    assert record["sources"] == [{"source": "image-folder",
                                  "path": str((tmp_path / "photos").resolve())}]
    index = SearchIndex(tmp_path / "idx")
    assert index.items([6])[6]["key"] == "new.png"
    index.close()


def test_a_source_added_again_with_more_items_is_recorded_once_by_its_last_spec(model_dir,
                                                                               tmp_path):
    build(model_dir, {**SHAPES, "n": 10}, tmp_path / "idx")
    record = build(model_dir, SHAPES, tmp_path / "idx", add=True)
    assert record["count"] == 40 and record["already_indexed"] == 10
    assert [source["n"] for source in record["sources"]] == [40]


def test_a_repeated_key_of_a_shard_is_listed_as_duplicate_key(model_dir, tmp_path):
    from tests.tar_files import png_bytes, write_tar

    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "s.tar",
              [(key, {"png": png_bytes(np.full((32, 32, 3), value, np.uint8)),
                      "txt": key.encode()})
               for key, value in (("a", 10), ("b", 20), ("a", 30), ("c", 40), ("c", 50))])
    record = build(model_dir, str(tmp_path / "shards"), tmp_path / "idx")
    assert record["count"] == 3 and record["skipped"]["counts"] == {"duplicate_key": 2}


def test_add_of_another_source_with_the_same_names_indexes_its_items(model_dir, tmp_path):
    """Two folders whose files share names (two cameras' IMG_0000.jpg), or the same built-in
    source with another seed, are different items: --add indexes them under keys naming
    their source; adding one of them again indexes nothing new."""
    data = load_shapes(n=6, seed=3, kinds=["single"], image_size=32)
    for folder, offset in (("cam_a", 0), ("cam_b", 3)):
        (tmp_path / folder).mkdir()
        for i in range(3):
            Image.fromarray(data.images[offset + i].numpy()).save(
                tmp_path / folder / f"IMG_{i:04d}.png")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        build(model_dir, "cam_a", tmp_path / "idx")  # a relative path, recorded resolved
    finally:
        os.chdir(cwd)
    record = build(model_dir, str(tmp_path / "cam_b"), tmp_path / "idx", add=True)
    assert record["count"] == 6 and record["skipped"]["total"] == 0
    keys = [r["key"] for r in SearchIndex(tmp_path / "idx").items(range(6)).values()]
    assert keys[:3] == ["IMG_0000.png", "IMG_0001.png", "IMG_0002.png"]
    assert keys[3:] == [f"{(tmp_path / 'cam_b').resolve()}|IMG_{i:04d}.png" for i in range(3)]
    for again in ("cam_a", "cam_b"):
        record = build(model_dir, str(tmp_path / again), tmp_path / "idx", add=True)
        assert record["count"] == 6
    # the first source added again from another working folder, by a relative path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    try:
        assert build(model_dir, "../cam_a", tmp_path / "idx", add=True)["count"] == 6
    finally:
        os.chdir(cwd)
    other_seed = build(model_dir, {**SHAPES, "n": 4, "seed": 9}, tmp_path / "idx", add=True)
    assert other_seed["count"] == 10
    assert SearchIndex(tmp_path / "idx").count == 10


def test_add_to_an_older_index_recording_a_relative_source_refuses_another_folder(
        model_dir, tmp_path, monkeypatch):
    """Indexes built before sources were resolved recorded `cam_a` as typed: an --add of the
    same folder from elsewhere resolved it there, took the collection for a second source and
    indexed every image again (24 items became 48). From the folder it was built in, --add
    works as before; from elsewhere it is one line saying so."""
    data = load_shapes(n=3, seed=3, kinds=["single"], image_size=32)
    (tmp_path / "cam_a").mkdir()
    for i in range(3):
        Image.fromarray(data.images[i].numpy()).save(tmp_path / "cam_a" / f"IMG_{i:04d}.png")
    build(model_dir, str(tmp_path / "cam_a"), tmp_path / "idx")
    record = json.loads((tmp_path / "idx" / "index.json").read_text(encoding="utf-8"))
    record["sources"][0]["path"] = "cam_a"  # as an older cliplab wrote it
    (tmp_path / "idx" / "index.json").write_text(json.dumps(record), encoding="utf-8")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"^--add: the index records its first source as the "
                       r"relative path 'cam_a' \(an older index\), which is not here: run --add "
                       r"from the folder the index was built in, or rebuild the index$"):
        build(model_dir, str(tmp_path / "cam_a"), tmp_path / "idx", add=True)
    assert SearchIndex(tmp_path / "idx").count == 3
    monkeypatch.chdir(tmp_path)
    assert build(model_dir, str(tmp_path / "cam_a"), tmp_path / "idx", add=True)["count"] == 3


def _edited_copy(model_dir: Path, folder: Path, file: str, edit) -> Path:
    """A copy of ``model_dir`` (the same weights) with one JSON file edited by ``edit``."""
    shutil.copytree(model_dir, folder)
    data = json.loads((folder / file).read_text())
    edit(data)
    (folder / file).write_text(json.dumps(data))
    return folder


def test_add_and_search_refuse_a_model_that_embeds_otherwise(model_dir, tmp_path):
    """Other weights are refused; so are the same weights with other preprocessing, tower
    settings or text pooling (they embed otherwise: the index would mix two embedding spaces
    and search one with the other), by `--add`, `check_model` and serve's recorded model."""
    from cliplab.serve.run import open_app

    build(model_dir, SHAPES, tmp_path / "idx")
    index = SearchIndex(tmp_path / "idx")
    index.check_model(DualEncoder.load(model_dir))  # the same model passes
    other = save_tiny_model(tmp_path / "other", seed=1)
    mean = _edited_copy(model_dir, tmp_path / "mean", "cliplab.json",
                        lambda m: m["preprocess"].update(mean=[0.2, 0.2, 0.2]))
    act = _edited_copy(model_dir, tmp_path / "act", "config.json",
                       lambda c: c["vision_config"].update(hidden_act="gelu"))
    eps = _edited_copy(model_dir, tmp_path / "eps", "config.json",
                       lambda c: c["text_config"].update(layer_norm_eps=0.5))
    for folder, differs in [(other, "other weights"),
                            (mean, r"the same weights but another image preprocessing mean "
                                   r"\(\[0.5, 0.5, 0.5\] then, \[0.2, 0.2, 0.2\] now\)"),
                            (act, r"the same weights but another image tower setting hidden_act "
                                  r"\(\"quick_gelu\" then, \"gelu\" now\)"),
                            (eps, r"the same weights but another text tower setting "
                                  r"layer_norm_eps \(1e-05 then, 0.5 now\)")]:
        with pytest.raises(ConfigError, match=f"built with model .*; this one has {differs}"):
            build(folder, SHAPES, tmp_path / "idx", add=True)
        with pytest.raises(ModelError, match=f"the given model has {differs}"):
            index.check_model(DualEncoder.load(folder))
    assert SearchIndex(tmp_path / "idx").count == SHAPES["n"]  # nothing was added
    # a recorded model folder changed in place since: serve asks for --model
    shutil.rmtree(model_dir)
    shutil.copytree(act, model_dir)
    with pytest.raises(ModelError, match="now has the same weights but another image tower "
                       "setting hidden_act.*pass --model"):
        open_app(str(tmp_path / "idx"))


def test_an_index_without_a_model_identity_is_checked_by_its_weights(model_dir, tmp_path,
                                                                      recwarn):
    """Indexes written before the identity was kept still open and take `--add`, by weights,
    and the --add says so, as serve does (it served them without a word); a record of another
    version (a later cliplab's) reads as none."""
    build(model_dir, SHAPES, tmp_path / "idx")
    record = json.loads((tmp_path / "idx" / "index.json").read_text(encoding="utf-8"))
    del record["embedding_identity"]
    (tmp_path / "idx" / "index.json").write_text(json.dumps(record), encoding="utf-8")
    mean = _edited_copy(model_dir, tmp_path / "mean", "cliplab.json",
                        lambda m: m["preprocess"].update(mean=[0.2, 0.2, 0.2]))
    SearchIndex(tmp_path / "idx").check_model(DualEncoder.load(mean))
    warned(recwarn)
    added = build(model_dir, {**SHAPES, "seed": 9}, tmp_path / "idx", add=True)
    assert added["count"] == 2 * SHAPES["n"] and added["embedding_identity"] is None
    assert "only the weights were checked" in warned(recwarn)
    from cliplab.serve.run import open_app

    open_app(str(tmp_path / "idx"), model=str(mean))  # (the copy warns of its processor file)
    assert [line for line in warned(recwarn).splitlines(True) if line.startswith("serve:")] == [(
        f"serve: {tmp_path / 'idx'} keeps no record of its model's "
        "preprocessing and tokenizer (an older index): only the weights were checked, and image "
        "searches may differ from what this cliplab would embed; rebuild it to have them "
        "checked\n")]
    build(model_dir, SHAPES, tmp_path / "new")
    record = json.loads((tmp_path / "new" / "index.json").read_text())
    record["embedding_identity"]["version"] = 99
    (tmp_path / "new" / "index.json").write_text(json.dumps(record))
    SearchIndex(tmp_path / "new").check_model(DualEncoder.load(mean))


def _as_an_older_cliplab_wrote_it(folder: Path) -> dict:
    """The folder's index.json rewritten in the shape cliplab wrote before 2026-12-07: format
    1, the skipped rows' count plus ``skipped_reasons``, the model identity as ``towers``."""
    record = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    skipped = record.pop("skipped")
    old = {**record, "format": 1, "towers": record.pop("embedding_identity"),
           "skipped": sum(skipped["counts"].values()), "skipped_reasons": skipped["counts"]}
    (folder / "index.json").write_text(json.dumps(old), encoding="utf-8")
    return old


def test_index_json_keeps_every_commands_names(model_dir, tmp_path):
    """index.json records what it skipped as every command does (`SkipReport.to_dict`: a
    bare count beside ``skipped_reasons`` broke ``d["skipped"]["total"]``) and its model's
    embedding identity as eval results do (``embedding_identity``, not ``towers``), as
    format 2: it kept format 1, so a cliplab from before read the new shape as its own (an
    --add crashed leaving idx.partial, serve checked only the weights). That cliplab refuses
    any index.json whose format is not 1 (`record.get("format") != 1`, in one line): the new
    number is what makes it refuse a new index cleanly."""
    _image_folder(tmp_path / "photos")
    started = now()
    build(model_dir, str(tmp_path / "photos"), tmp_path / "idx")
    record = json.loads((tmp_path / "idx" / "index.json").read_text(encoding="utf-8"))
    assert_stamped(record, started, now())  # which cliplab built it, and when
    assert record["format"] == 2
    assert record["skipped"] == {"total": 2, "counts": {"not_an_image": 1, "unreadable_image": 1},
                                 "keys": {"not_an_image": ["notes.txt"],
                                          "unreadable_image": ["others/broken.png"]}}
    assert "skipped_reasons" not in record and "towers" not in record
    assert record["embedding_identity"] == embedding_identity(DualEncoder.load(model_dir))


def test_an_index_an_older_cliplab_wrote_serves_and_takes_add(model_dir, tmp_path, capsys,
                                                              recwarn):
    """An index folder whose index.json has the older shape (a skipped count with
    ``skipped_reasons``, ``towers``) opens, serves /api/health, has its model identity
    checked still, takes `--add` (written in the current shape) and a nothing-new `--add`."""
    from fastapi.testclient import TestClient

    from cliplab.serve.app import create_app

    _image_folder(tmp_path / "photos")
    build(model_dir, str(tmp_path / "photos"), tmp_path / "idx")
    old = _as_an_older_cliplab_wrote_it(tmp_path / "idx")
    assert old["skipped"] == 2
    index = SearchIndex(tmp_path / "idx")
    assert index.record["skipped"] == {"total": 2, "counts": old["skipped_reasons"], "keys": {}}
    mean = _edited_copy(model_dir, tmp_path / "mean", "cliplab.json",
                        lambda m: m["preprocess"].update(mean=[0.2, 0.2, 0.2]))
    with pytest.raises(ModelError, match="the same weights but another image preprocessing"):
        index.check_model(DualEncoder.load(mean))  # its `towers` are still its identity
    health = TestClient(create_app(index, DualEncoder.load(model_dir))).get("/api/health")
    assert health.status_code == 200 and health.json()["count"] == 6
    index.close()
    # an --add of the same folder finds nothing new, and leaves the file as it was
    command = ["index", "--model", str(model_dir), "--out", str(tmp_path / "idx"), "--add",
               "--no-progress", "--device", "cpu"]
    assert main([*command, "--data", str(tmp_path / "photos")]) == 0
    assert "nothing to add" in capsys.readouterr().out
    assert json.loads((tmp_path / "idx" / "index.json").read_text(encoding="utf-8")) == old
    assert main([*command, "--data", "shapes", "data.n=4"]) == 0
    assert "10 items (2 skipped)" in capsys.readouterr().out
    record = json.loads((tmp_path / "idx" / "index.json").read_text(encoding="utf-8"))
    assert record["count"] == 10 and "skipped_reasons" not in record and "towers" not in record
    assert record["format"] == 2
    assert record["skipped"] == {"total": 2, "counts": old["skipped_reasons"],
                                 "keys": {"not_an_image": ["notes.txt"],
                                          "unreadable_image": ["others/broken.png"]}}
    assert record["embedding_identity"] == old["towers"]
    with pytest.raises(ConfigError, match="this one has the same weights but another image "
                       "preprocessing"):
        build(mean, SHAPES, tmp_path / "idx", add=True)


def test_a_run_an_older_cliplab_stopped_resumes(model_dir, tmp_path, monkeypatch, capsys):
    """A half-built index whose progress.json names the model identity ``towers`` (as cliplab
    before 2026-12-07 wrote it, format 1) is this command's: resumed, not refused as another
    run's. progress.json is format 2 now, as index.json; one of another format is refused."""
    _killed_build(monkeypatch, 2, model_dir, SHAPES, tmp_path / "idx", chunk=8)
    file = tmp_path / "idx.partial" / "progress.json"
    state = json.loads(file.read_text(encoding="utf-8"))
    assert state["format"] == 2
    file.write_text(json.dumps({**state, "format": 3}), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^\S+idx.partial/progress.json: format 3, not 1 or 2 "
                       r"\(another cliplab's\?\); resume it with the cliplab that stopped it, "
                       "or delete the folder$"):
        build(model_dir, SHAPES, tmp_path / "idx", chunk=8)
    state["request"]["towers"] = state["request"].pop("embedding_identity")
    file.write_text(json.dumps({**state, "format": 1}), encoding="utf-8")
    capsys.readouterr()
    record = build(model_dir, SHAPES, tmp_path / "idx", chunk=8)
    assert record["count"] == SHAPES["n"] and "resuming the stopped run" in capsys.readouterr().err
    assert record["embedding_identity"] == embedding_identity(DualEncoder.load(model_dir))


def test_the_report_refuses_an_index_record(model_dir, tmp_path, capsys):
    """`cliplab report --inputs INDEX/index.json` tabulated the record's tower settings
    (hidden_size, pad_token_id, ...) as metrics: an index's record holds no results, so it
    is refused, in either shape, naming what it is."""
    build(model_dir, SHAPES, tmp_path / "idx")
    for shape in ("current", "older"):
        if shape == "older":
            _as_an_older_cliplab_wrote_it(tmp_path / "idx")
        given = tmp_path / "idx" / "index.json"
        assert main(["report", "--inputs", str(given), "--out", str(tmp_path / "rp"),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"cliplab: error: {given}: the record of a search index "
                              "(`cliplab index`), not results; expected ") and "\n" not in err
        assert not (tmp_path / "rp" / "report.md").exists()


def test_a_setting_a_library_adds_or_drops_is_no_difference(model_dir, tmp_path):
    """The identity's settings are compared on the keys both hold: a transformers version
    that adds a generic config key (or an index that lacks one) does not refuse the model the
    index was built with, though its fingerprints differ."""
    build(model_dir, SHAPES, tmp_path / "idx")
    record = json.loads((tmp_path / "idx" / "index.json").read_text(encoding="utf-8"))
    record["embedding_identity"]["text"]["settings"]["added_by_a_new_library"] = True
    record["embedding_identity"]["text"]["fingerprint"] = "0" * 16
    del record["embedding_identity"]["image"]["settings"]["num_channels"]
    record["embedding_identity"]["image"]["fingerprint"] = "1" * 16
    (tmp_path / "idx" / "index.json").write_text(json.dumps(record), encoding="utf-8")
    SearchIndex(tmp_path / "idx").check_model(DualEncoder.load(model_dir))


@pytest.mark.parametrize("damage, message", [
    ("meta", r"meta.sqlite: not a readable index metadata database"),
    ("no fingerprint", r"index.json: lacks fingerprint; the index is damaged"),
    ("format 99", r"index.json: not the record of a complete index \(format 99, not 1 or 2: "
                  r"another cliplab's\?\); open it with the cliplab that wrote it, or rebuild "
                  r"it with `cliplab index`"),
    ("dim", r"index.json is damaged \(ValueError: invalid literal for int\(\)"),
    ("sources", r"index.json: sources must be a list of data specs, not 'oops'")])
def test_add_refuses_a_damaged_index_and_leaves_it_as_it_was(model_dir, tmp_path, damage,
                                                             message):
    """--add checked less than serve: a damaged meta.sqlite or index.json failed with a
    traceback (leaving a .partial folder), and an index of an unknown format or a wrong dim was
    rewritten as format 1. Now it is refused as serve refuses it, and nothing is written."""
    out = tmp_path / "idx"
    build(model_dir, SHAPES, out)
    record = json.loads((out / "index.json").read_text())
    if damage == "meta":
        (out / "meta.sqlite").write_bytes((out / "meta.sqlite").read_bytes()[:3000])
    else:
        record.pop("fingerprint") if damage == "no fingerprint" else record.update(
            {"format 99": {"format": 99}, "dim": {"dim": "sixteen"},
             "sources": {"sources": "oops"}}[damage])
        (out / "index.json").write_text(json.dumps(record))
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    with pytest.raises(DataError, match=rf"^--add: {out}/{message}"):
        build(model_dir, SHAPES, out, add=True)
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    assert not (tmp_path / "idx.partial").exists()


def test_a_failed_run_with_nothing_embedded_does_not_block_the_corrected_one(model_dir, tmp_path,
                                                                           monkeypatch):
    manifest = tmp_path / "bad.csv"
    manifest.write_text("caption\nno image column\n")
    with pytest.raises(CliplabError):
        build(model_dir, str(manifest), tmp_path / "idx", chunk=8)
    # refused before its first item: no half-built folder that serve calls a stopped run
    assert not (tmp_path / "idx.partial").exists()
    assert build(model_dir, SHAPES, tmp_path / "idx", chunk=8)["count"] == 40


def test_bad_index_type_and_stray_uri_fail_before_any_embedding(model_dir, tmp_path, monkeypatch):
    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before checking the options")

    monkeypatch.setattr(build_module, "_embed_collection", no_embedding)
    with pytest.raises(ConfigError, match=r"^bad FAISS index type 'hnws': could not parse "
                                          r"index string hnws; use one of"):
        build(model_dir, SHAPES, tmp_path / "a", index_type="hnws")
    # FAISS parses a graph of under 2 links, then aborts (HNSW0) or segfaults (HNSW1) adding
    for factory in ("HNSW0", "HNSW1", "IVF4_HNSW1,Flat", "HNSW1,Flat"):
        with pytest.raises(ConfigError, match=rf"^bad FAISS index type '{factory}': HNSW[01] "
                                              "links each vector to fewer than 2 others"):
            build(model_dir, SHAPES, tmp_path / "a", index_type=factory)
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()
    with pytest.raises(ConfigError, match="--uri .* add --backend milvus"):
        build(model_dir, SHAPES, tmp_path / "b", uri=str(tmp_path / "x.db"))


def test_an_untrainable_index_type_is_refused_and_the_run_finished_with_another(
        model_dir, tmp_path, monkeypatch):
    """IVF-PQ on 40 vectors cannot train its codebooks: a one-line ConfigError; the same
    command with another index type finishes the half-built index without embedding again."""
    with pytest.raises(ConfigError, match=r"^index type 'IVF16,PQ2' cannot be trained on 40 "
                                          r"vectors \(.*\); use flat or hnsw$") as caught:
        build(model_dir, SHAPES, tmp_path / "idx", index_type="ivf-pq")
    assert "\n" not in str(caught.value)

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded again")

    monkeypatch.setattr(build_module, "_embed_collection", no_embedding)
    record = build(model_dir, SHAPES, tmp_path / "idx", index_type="flat")
    assert record["count"] == 40 and record["faiss"]["type"] == "Flat"
    assert SearchIndex(tmp_path / "idx").count == 40


def test_add_keeps_the_backend_and_index_type_of_the_index(model_dir, tmp_path, capsys):
    build(model_dir, SHAPES, tmp_path / "idx", index_type="hnsw")
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["index_type"] == "hnsw"
    record = build(model_dir, {**SHAPES, "seed": 4}, tmp_path / "idx", add=True)
    assert record["count"] == 80 and record["faiss"]["type"] == "HNSW32,Flat"
    assert record["index_type"] == "hnsw"
    # the shipped recipe leaves them unset, so it keeps them too
    assert main(["index", "--config", str(CONFIGS / "index" / "collection.yaml"), "--model",
                 str(model_dir), "--data", "shapes", "--out", str(tmp_path / "idx"), "--add",
                 "--no-progress", "data.n=5", "data.seed=6", "data.image_size=32"]) == 0
    assert "85 items (0 skipped)" in capsys.readouterr().out
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["faiss"]["type"] == \
        "HNSW32,Flat"
    with pytest.raises(ConfigError, match=r"^--add: .* is a faiss index; --backend milvus "
                                          r"would leave its vectors behind") as caught:
        build(model_dir, {**SHAPES, "seed": 5}, tmp_path / "idx", add=True, backend="milvus",
              uri=str(tmp_path / "search.db"))
    assert "\n" not in str(caught.value)
    record = build(model_dir, {**SHAPES, "seed": 5}, tmp_path / "idx", add=True,
                   index_type="flat")  # given: the index type changes
    assert record["count"] == 125 and record["faiss"]["type"] == "Flat"
    assert record["index_type"] == "flat"


def test_milvus_refuses_an_index_type_before_any_embedding(model_dir, tmp_path, monkeypatch):
    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before checking the options")

    monkeypatch.setattr(build_module, "_embed_collection", no_embedding)
    with pytest.raises(ConfigError, match=r"^--index-type hnsw is for the FAISS backend"):
        build(model_dir, SHAPES, tmp_path / "idx", backend="milvus",
              uri=str(tmp_path / "search.db"), index_type="hnsw")


@pytest.mark.parametrize("backend, given, refused", [
    ("milvus", {"recall": 0.5}, r"^recall tunes the FAISS index's type and search breadth"),
    ("milvus", {"recall": 0.5, "max_memory_gb": 0.001},
     r"^recall and max_memory_gb tune the FAISS index's .* leave them out"),
    ("faiss", {"collection": "mine"}, r"^collection=mine names a Milvus collection; add "
     r"--backend milvus, or leave it out")])
def test_a_setting_of_the_other_backend_is_refused_before_any_embedding(
        backend, given, refused, model_dir, tmp_path, monkeypatch):
    """Each was accepted and did nothing: the same files, and the setting recorded nowhere."""
    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before checking the options")

    monkeypatch.setattr(build_module, "_embed_collection", no_embedding)
    uri = {"uri": str(tmp_path / "search.db")} if backend == "milvus" else {}
    with pytest.raises(ConfigError, match=refused):
        build(model_dir, SHAPES, tmp_path / "idx", backend=backend, **uri, **given)
    assert not (tmp_path / "idx").exists()


def test_index_type_follows_size_and_memory():
    assert faiss_index.choose_index_type(99_999, 512) == "Flat"
    assert faiss_index.choose_index_type(1_000_000, 512, memory_budget=24 << 30) == "IVF1024,Flat"
    assert faiss_index.choose_index_type(1_000_000, 512, memory_budget=1 << 30) == "IVF1024,PQ64"
    assert faiss_index.choose_index_type(10, 512, "hnsw") == "HNSW32,Flat"
    assert faiss_index.choose_index_type(10, 512, "IVF8,Flat") == "IVF8,Flat"
    assert faiss_index.nlist_for(4_000_000) == 2048


def _clustered(n, dim, centres, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim))
    x = means[rng.integers(0, centres, n)] + 0.5 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_tuning_reaches_the_recall_target_on_held_out_queries():
    vectors = _clustered(20_000, 32, 50)
    index = faiss_index.build_faiss(vectors, "IVF128,Flat")
    tuned = faiss_index.tune_search(index, vectors, recall_target=0.95)
    assert tuned["parameter"] == "nprobe" and tuned["recall"] >= 0.95
    queries = faiss_index.held_out_queries(vectors)
    truth = faiss_index.exact_neighbours(queries, vectors, 10)
    faiss_index.set_search_parameter(index, tuned["value"])
    assert faiss_index.recall_at_k(index.search(queries, 10)[1], truth) == \
        pytest.approx(tuned["recall"], abs=1e-4)
    if tuned["value"] > 1:  # the next smaller setting misses the target
        faiss_index.set_search_parameter(index, tuned["value"] // 2)
        assert faiss_index.recall_at_k(index.search(queries, 10)[1], truth) < 0.95
    scores, ids = faiss_index.search(index, queries[:1], 5, offset=3)
    assert ids.shape == (1, 5)


def test_exact_search_pages_like_numpy():
    vectors = _clustered(500, 16, 5)
    index = faiss_index.build_faiss(vectors, "Flat")
    q = vectors[:2]
    order = np.argsort(-(q @ vectors.T), axis=1)
    scores, ids = faiss_index.search(index, q, 4, offset=6)
    assert np.array_equal(ids, order[:, 6:10])
    _, tail = faiss_index.search(index, q, 10, offset=495)
    assert (tail[:, 5:] == -1).all()


def _hand_ivf(centres: np.ndarray, vectors: np.ndarray):
    """An IVF index over ``vectors`` whose lists are those of the given unit ``centres`` (no
    k-means: each vector sits in the list of the centre of highest inner product)."""
    import faiss

    quantizer = faiss.IndexFlatIP(centres.shape[1])
    quantizer.add(np.ascontiguousarray(centres, dtype=np.float32))
    index = faiss.IndexIVFFlat(quantizer, centres.shape[1], len(centres),
                               faiss.METRIC_INNER_PRODUCT)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def test_tuning_stops_at_the_first_breadth_that_reaches_the_target():
    """Four tight clusters along orthogonal axes, one IVF list each: a held-out query's 10
    nearest are all in its own cluster's list, so nprobe 1 already has recall 1.0."""
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:4]
    x = np.repeat(centres, 20, axis=0) + 0.05 * rng.normal(size=(80, 8))
    vectors = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    index = _hand_ivf(centres, vectors)
    tuned = faiss_index.tune_search(index, vectors, recall_target=1.0)
    assert tuned == {"parameter": "nprobe", "value": 1, "recall": 1.0}


def test_a_page_missing_only_its_last_hit_is_searched_broader():
    """List 0 (around +x) holds 2 vectors, list 1 (around -x) 10: at nprobe 1 the query +x
    gets 2 hits of 3, the last slot -1; the page comes back full, the third hit from list 1."""
    angles = np.r_[0.0, 0.1, np.pi - 0.1 * np.arange(1, 11)]
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    index = _hand_ivf(np.array([[1.0, 0.0], [-1.0, 0.0]]), vectors)
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    assert index.search(q, 3)[1].tolist() == [[0, 1, -1]]
    # cosines with +x: 1, cos 0.1, then the list-1 vector nearest +x, at pi - 1: -cos 1
    for stored in (None, vectors):
        scores, ids = faiss_index.search(index, q, 3, vectors=stored)
        assert ids.tolist() == [[0, 1, 11]]
        np.testing.assert_allclose(scores, [[1.0, np.cos(0.1), -np.cos(1.0)]], atol=1e-6)


def test_the_exact_fallback_scores_are_cosines(monkeypatch):
    vectors = _clustered(200, 16, 4)
    index = faiss_index.build_faiss(vectors, "Flat")
    monkeypatch.setattr(faiss_index, "_deep_search", lambda index, queries, depth, **_: (
        np.zeros((len(queries), depth), np.float32), np.full((len(queries), depth), -1)))
    q = vectors[:2]
    scores, ids = faiss_index.search(index, q, 5, offset=1, vectors=vectors)
    cosine = q @ vectors.T
    assert np.array_equal(ids, np.argsort(-cosine, axis=1)[:, 1:6])
    np.testing.assert_allclose(scores, np.take_along_axis(cosine, ids, axis=1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first


def test_get_many_returns_every_row_across_chunks(tmp_path):
    """1200 ids are looked up in chunks of 500: none may fall between two chunks."""
    store = MetadataStore(tmp_path / "meta.sqlite")
    store.add({"id": i, "key": f"k{i}", "caption": f"c{i}", "location": {}, "meta": {"i": i}}
              for i in range(1200))
    rows = store.get_many(range(1200))
    store.close()
    assert sorted(rows) == list(range(1200))
    assert all(rows[i]["key"] == f"k{i}" and rows[i]["meta"] == {"i": i} for i in range(1200))


@pytest.mark.parametrize("name, words", [
    ("faiss.index", "not a FAISS index FAISS can read"),
    ("meta.sqlite", "not a readable index metadata database"),
    ("vectors.npy", "not a readable NumPy array"),
])
def test_a_damaged_index_file_is_refused_at_open(model_dir, tmp_path, capsys, monkeypatch,
                                                 name, words):
    build(model_dir, SHAPES, tmp_path / "idx")
    (tmp_path / "idx" / name).write_text("garbage\n")
    opened, closed = [], []
    real_init, real_close = MetadataStore.__init__, MetadataStore.close
    monkeypatch.setattr(MetadataStore, "__init__",
                        lambda self, *a, **k: (opened.append(self), real_init(self, *a, **k))[1])
    monkeypatch.setattr(MetadataStore, "close",
                        lambda self: (closed.append(self), real_close(self))[1])
    with pytest.raises(DataError, match="rebuild it with `cliplab index`") as caught:
        SearchIndex(tmp_path / "idx")
    assert opened and closed == opened  # the refused index's database is not left open
    assert str(tmp_path / "idx" / name) in str(caught.value) and words in str(caught.value)
    assert "\n" not in str(caught.value)
    assert main(["serve", str(tmp_path / "idx")]) == 2
    assert f"cliplab: error: {tmp_path / 'idx' / name}: " in capsys.readouterr().err


def _half_faiss(folder):
    import faiss

    vectors = np.load(folder / "vectors.npy")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors[:20])
    faiss.write_index(index, str(folder / "faiss.index"))


def _other_dim_vectors(folder):
    np.save(folder / "vectors.npy", np.load(folder / "vectors.npy")[:, :8].copy())


def _fewer_rows(folder):
    import sqlite3

    with sqlite3.connect(folder / "meta.sqlite") as db:
        db.execute("DELETE FROM items WHERE id >= 30")


def _more_rows(folder):
    import sqlite3

    with sqlite3.connect(folder / "meta.sqlite") as db:
        db.execute("INSERT INTO items (id, key, caption, location, meta) "
                   "VALUES (40, 'extra', 'x', '{}', '{}')")


def _other_dim_faiss(folder):
    import faiss

    vectors = np.load(folder / "vectors.npy")
    index = faiss.IndexFlatIP(8)
    index.add(np.ascontiguousarray(vectors[:, :8]))
    faiss.write_index(index, str(folder / "faiss.index"))


def _record(folder, change):
    path = folder / "index.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize("damage, words", [
    (_half_faiss, "faiss.index: holds 20 vectors of 16 dimensions, the index 40 of 16"),
    (_other_dim_vectors, "vectors.npy: holds an array of shape (40, 8), not 40 vectors of 16"),
    (_fewer_rows, "meta.sqlite: holds 30 items, index.json says 40"),
    # more rows than counted, or the right count of vectors of another dimension
    (_more_rows, "meta.sqlite: holds 41 items, index.json says 40; the index is damaged, "
     "rebuild it with `cliplab index`"),
    (_other_dim_faiss, "faiss.index: holds 40 vectors of 8 dimensions, the index 40 of 16; the "
     "index is damaged, rebuild it with `cliplab index`"),
    (lambda f: _record(f, lambda r: []), "index.json: not the record of a complete index (not a "
     "JSON object)"),
    (lambda f: _record(f, lambda r: {**r, "complete": False}), "index.json: not the record of a "
     'complete index ("complete" is not true: an index still being written, or stopped)'),
    (lambda f: _record(f, lambda r: {k: v for k, v in r.items() if k != "backend"}),
     "index.json: lacks backend"),
    (lambda f: _record(f, lambda r: {k: v for k, v in r.items() if k != "faiss"}),
     "index.json: lacks faiss"),
    (lambda f: _record(f, lambda r: {**r, "format": 3}),
     "index.json: not the record of a complete index (format 3, not 1 or 2: another "
     "cliplab's?)"),
])
def test_index_files_that_disagree_are_refused_at_open(model_dir, tmp_path, damage, words):
    """Each file reads, but they do not belong together (a copy of another index's file, a
    half-copied one): served, they gave short results, 500s or a traceback at start."""
    build(model_dir, SHAPES, tmp_path / "idx")
    damage(tmp_path / "idx")
    with pytest.raises(DataError) as caught:
        SearchIndex(tmp_path / "idx")
    assert words in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("factory, parameter", [("HNSW32,Flat", 16), ("IVF64,Flat", 1)])
def test_deep_pages_of_an_approximate_index_are_full_and_continue_each_other(factory, parameter):
    """Pages far past what the tuned breadth reaches (efSearch 16, or one IVF list of ~50
    vectors) still hold k hits; pages searched at one breadth (depths 320..640) continue each
    other exactly, and a walk over every page shows nearly every item once."""
    vectors = _clustered(3000, 32, 30)
    index = faiss_index.build_faiss(vectors, factory)
    faiss_index.set_search_parameter(index, parameter)
    queries = faiss_index.held_out_queries(vectors, 4)
    _, deep = faiss_index.search(index, queries, 100, offset=500)
    assert deep.shape == (4, 100) and (deep >= 0).all()
    pages = [faiss_index.search(index, queries, 100, offset)[1] for offset in range(0, 3000, 100)]
    walked = np.concatenate(pages, axis=1)
    assert (walked >= 0).all()
    assert all(len(set(row)) >= 2970 for row in walked)  # overlaps only where breadth grows
    _, two_pages = faiss_index.search(index, queries, 200, offset=400)
    assert np.array_equal(two_pages, np.concatenate(pages[4:6], axis=1))


@pytest.mark.parametrize("factory", ["Flat", "HNSW32,Flat"])
def test_pages_over_tied_scores_neither_repeat_nor_lose_an_item(factory):
    """An image indexed twice ties with itself exactly; FAISS returned ties in an order that
    depends on the depth asked, so the page ending in a tie and the next repeated one copy and
    never showed the other. Ties now come in id order, and a tie across a page's end is
    fetched whole."""
    vectors = _clustered(240, 16, 6)
    copies = np.concatenate([vectors, vectors[:5], vectors[:5]])  # ids 240..249: 0..4 twice
    index = faiss_index.build_faiss(copies, factory)
    for query in copies[[0, 3, 100]]:
        whole = faiss_index.search(index, query, 30)[1][0]
        one_by_one = [faiss_index.search(index, query, 1, offset)[1][0, 0]
                      for offset in range(30)]
        assert one_by_one == whole.tolist() and len(set(whole)) == 30
    scores, ids = faiss_index.search(index, copies[0], 3)
    assert ids[0].tolist() == [0, 240, 245] and scores[0, 0] == scores[0, 2]  # in id order


def test_a_short_approximate_search_falls_back_to_the_stored_vectors(monkeypatch):
    vectors = _clustered(500, 16, 5)
    index = faiss_index.build_faiss(vectors, "HNSW32,Flat")
    search = faiss_index._deep_search

    def short(index, queries, depth, **breadth):
        scores, ids = search(index, queries, depth, **breadth)
        ids[:, 50:] = -1
        return scores, ids

    monkeypatch.setattr(faiss_index, "_deep_search", short)
    q = vectors[:2]
    order = np.argsort(-(q @ vectors.T), axis=1)
    _, ids = faiss_index.search(index, q, 10, offset=60, vectors=vectors)
    assert np.array_equal(ids, order[:, 60:70])
    _, tail = faiss_index.search(index, q, 10, offset=495, vectors=vectors)
    assert np.array_equal(tail[:, :5], order[:, 495:]) and (tail[:, 5:] == -1).all()


def test_cli_index_and_its_errors(model_dir, tmp_path, capsys):
    code = main(["index", "--model", str(model_dir), "--data", "shapes", "--out",
                 str(tmp_path / "idx"), "--no-progress", "data.n=20", "data.image_size=32"])
    assert code == 0 and "20 items (0 skipped)" in capsys.readouterr().out
    assert main(["index", "--model", str(model_dir), "--data", str(tmp_path / "nothing"),
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "nothing does not exist (no such file or folder" in capsys.readouterr().err
    assert main(["index", "--model", str(model_dir), "--data", "shapes", "--out",
                 str(tmp_path / "z"), "--no-progress", "data.n=abc"]) == 2
    assert capsys.readouterr().err.startswith("cliplab: error: the command line: data.n: ")
    assert not (tmp_path / "z").exists() and not (tmp_path / "z.partial").exists()
    assert main(["index", "--model", str(model_dir), "--data", "shapes", "--out",
                 str(tmp_path / "y"), "recall=2"]) == 2
    assert "recall" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty")]) == 2
    assert "is not an index (no index.json)" in capsys.readouterr().err


def test_serve_refuses_a_taken_port_or_a_bad_host_before_starting(model_dir, tmp_path, capsys):
    build(model_dir, SHAPES, tmp_path / "idx")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path / "idx"), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert f"cliplab: error: port {port} on 127.0.0.1 is already in use" in err
    assert "--port" in err and len(err.strip().splitlines()) == 1 and "http://" not in out
    assert main(["serve", str(tmp_path / "idx"), "--host", "no.such.host.invalid"]) == 2
    out, err = capsys.readouterr()
    assert "cliplab: error: --host no.such.host.invalid: cannot resolve it" in err
    assert "http://" not in out


def test_an_index_of_a_run_folder_keeps_serving_its_checkpoint(tmp_path):
    """The index records the checkpoint a run folder resolved to, so a newer checkpoint of the
    run does not change what serve loads; a model gone or changed asks for --model."""
    from cliplab.serve.run import open_app

    run = tmp_path / "run"
    first = save_tiny_model(run / "checkpoints" / "step-1" / "model")
    record = build(run, SHAPES, tmp_path / "idx")
    assert record["model"]["name"] == str(first.resolve())
    save_tiny_model(run / "checkpoints" / "step-2" / "model", seed=2)
    assert open_app(str(tmp_path / "idx")) is not None
    old = json.loads((tmp_path / "idx" / "index.json").read_text())
    old["model"]["name"] = str(run.resolve())  # as indexes recorded a run folder before
    (tmp_path / "idx" / "index.json").write_text(json.dumps(old))
    with pytest.raises(ModelError, match="now has other weights.*pass --model"):
        open_app(str(tmp_path / "idx"))
    assert open_app(str(tmp_path / "idx"), model=str(first)) is not None
    old["model"]["name"] = str(tmp_path / "moved")
    (tmp_path / "idx" / "index.json").write_text(json.dumps(old))
    with pytest.raises(ModelError, match="which is gone; pass --model"):
        open_app(str(tmp_path / "idx"))


def test_add_to_an_index_that_records_no_index_type_chooses_auto_again(tmp_path):
    """An index from before index_type was recorded keeps choosing by size on --add (its
    recorded factory, e.g. Flat, would pin exact search however large it grows)."""
    from cliplab.serve.build import _resolve_settings

    existing = {"backend": "faiss", "faiss": {"type": "Flat"}}
    cfg = index_config(save_tiny_model(tmp_path / "m"), SHAPES, tmp_path / "idx", add=True)
    assert _resolve_settings(cfg, existing, tmp_path / "idx").index_type == "auto"
    kept = _resolve_settings(cfg, {**existing, "index_type": "hnsw"}, tmp_path / "idx")
    assert kept.index_type == "hnsw"


@pytest.mark.parametrize("tuned", [{"value": 2048, "recall": 0.8175},
                                   {"value": 64, "recall": 0.97}])
def test_a_search_that_misses_the_recall_target_is_told(tuned, model_dir, tmp_path,
                                                         monkeypatch, capsys):
    """IVF-PQ on a small collection tuned to its widest search at recall 0.82 of the 0.95
    asked, and the run said nothing but the number; one on target prints no warning."""
    def tune_search(index, vectors, recall_target=0.95, **_):
        return {"parameter": "efSearch", **tuned}

    monkeypatch.setattr(build_module.faiss_index, "tune_search", tune_search)
    assert main(["index", "--model", str(model_dir), "--data", "shapes", "data.n=40",
                 "data.image_size=32", "--index-type", "hnsw", "--out", str(tmp_path / "idx"),
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    if tuned["recall"] < 0.95:
        assert err.strip() == (
            "cliplab: warning: index: recall 0.818 stays below the target 0.95 at the widest "
            "search (efSearch=2048): HNSW32,Flat loses neighbours on this collection; --index-type "
            "flat is exact")
    else:
        assert err == "" and "stays below the target" not in out
    recorded = json.loads((tmp_path / "idx" / "index.json").read_text())["faiss"]["recall"]
    assert recorded == tuned["recall"]


def test_add_to_a_folder_that_is_no_index_says_which_it_is(model_dir, tmp_path):
    """--add to a missing folder was called 'not a complete index': it says the folder is
    missing; a folder holding something else is still not an index."""
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=f"^--add: {missing} does not exist; an --add appends"):
        build(model_dir, SHAPES, missing, add=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=f"^--add: {tmp_path / 'other'} is not a complete index"):
        build(model_dir, SHAPES, tmp_path / "other", add=True)
    assert not missing.exists()


def test_an_opened_approximate_index_searches_at_its_tuned_breadth(model_dir, tmp_path):
    """The tuned efSearch/nprobe recorded in index.json is what serving searches with (FAISS's
    own default, efSearch 16, loses neighbours the tuning was meant to keep)."""
    import faiss

    record = build(model_dir, SHAPES, tmp_path / "idx", index_type="hnsw")
    assert record["faiss"]["parameter"] == "efSearch"
    assert faiss.downcast_index(SearchIndex(tmp_path / "idx")._faiss).hnsw.efSearch == \
        record["faiss"]["value"]
    _record(tmp_path / "idx", lambda r: {**r, "faiss": {**r["faiss"], "value": 48}})
    assert faiss.downcast_index(SearchIndex(tmp_path / "idx")._faiss).hnsw.efSearch == 48


def test_a_collection_of_unreadable_images_is_refused_as_nothing_to_index(model_dir, tmp_path):
    (tmp_path / "photos").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "photos" / name).write_bytes(b"not an image")
    with pytest.raises(DataError) as caught:
        build(model_dir, str(tmp_path / "photos"), tmp_path / "idx")
    assert str(caught.value) == (
        f"nothing to index: every item of {tmp_path / 'photos'} was skipped "
        f"(unreadable_image=2); delete {tmp_path / 'idx.partial'} after fixing the data")
    assert not (tmp_path / "idx").exists()


def test_the_memory_budget_and_recall_target_reach_the_faiss_index(model_dir, tmp_path,
                                                                    monkeypatch):
    budgets, real = [], faiss_index.choose_index_type
    monkeypatch.setattr(build_module.faiss_index, "choose_index_type",
                        lambda n, d, kind, budget=None: budgets.append(budget) or
                        real(n, d, kind, budget))
    record = build(model_dir, SHAPES, tmp_path / "idx", max_memory_gb=0.5, recall=0.9)
    assert budgets[-1] == 1 << 29  # the first call only checks the index type
    assert record["faiss"]["recall_target"] == 0.9
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["faiss"]["recall_target"] \
        == 0.9


def test_a_killed_run_with_skipped_files_resumes_to_the_whole_runs_index(model_dir, tmp_path,
                                                                          monkeypatch):
    """Chunks holding unreadable files before and at the kill: the resumed run reads each file
    once (no item read again as a duplicate) and keeps each skip once."""
    photos = tmp_path / "photos"
    photos.mkdir()
    data = load_shapes(n=6, seed=1, kinds=["single"], image_size=32)
    names = ["a0", "a1", "b0", "b1", "c0", "c1", "d0", "d1"]
    broken = {"b0", "c0"}
    for i, name in enumerate(names):
        if name in broken:
            (photos / f"{name}.png").write_bytes(b"not a png")
        else:
            Image.fromarray(data.images[i % 6].numpy()).save(photos / f"{name}.png")
    whole = build(model_dir, str(photos), tmp_path / "whole", chunk=2)
    assert (whole["count"], whole["skipped"]["total"]) == (6, 2)

    # chunk c0, c1 (one skip) committed, its progress never written
    _killed_build(monkeypatch, 3, model_dir, str(photos), tmp_path / "idx", chunk=2)
    resumed = build(model_dir, str(photos), tmp_path / "idx", chunk=2)
    assert {k: resumed[k] for k in ("count", "skipped")} == \
        {k: whole[k] for k in ("count", "skipped")}
    index = SearchIndex(tmp_path / "idx")
    assert sorted(key for key, _ in index.store.skipped()) == ["b0.png", "c0.png"]
    assert np.array_equal(np.asarray(index.vectors),
                          np.asarray(SearchIndex(tmp_path / "whole").vectors))


@pytest.fixture
def started(monkeypatch):
    """`cliplab serve` up to uvicorn: what it would have served, and where."""
    import uvicorn

    runs = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: runs.append(
        {"app": app, "host": host, "port": port}))
    return runs


def test_serve_model_option_serves_a_moved_model_with_the_upload_limit(model_dir, tmp_path,
                                                                       started, capsys):
    from fastapi.testclient import TestClient

    model = save_tiny_model(tmp_path / "model")
    build(model, SHAPES, tmp_path / "idx")
    moved = tmp_path / "moved"
    shutil.move(model, moved)
    port = free_port()
    assert main(["serve", str(tmp_path / "idx"), "--port", str(port)]) == 2
    assert "which is gone; pass --model" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "idx"), "--model", str(moved), "--port", str(port),
                 "--max-upload-mb", "2"]) == 0
    assert [(run["host"], run["port"]) for run in started] == [("127.0.0.1", port)]
    health = TestClient(started[0]["app"], base_url="http://127.0.0.1:8000").get("/api/health").json()
    assert (health["count"], health["max_upload_bytes"]) == (40, 2 << 20)
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{port}/" in out and "warning" not in out


@pytest.mark.parametrize("host, key, warned", [("0.0.0.0", None, True),
                                               ("0.0.0.0", "k", False),
                                               ("localhost", None, False)])
def test_serve_warns_of_an_open_api_beyond_loopback(model_dir, tmp_path, started, capsys,
                                                    host, key, warned):
    build(model_dir, SHAPES, tmp_path / "idx")
    flags = ["--api-key", key] if key else []
    assert main(["serve", str(tmp_path / "idx"), "--host", host, "--port", str(free_port()),
                 *flags]) == 0
    out = capsys.readouterr().err  # a warning, as every other, on stderr
    assert ("listening on" in out) == warned
    assert not warned or f"cliplab: warning: serve: listening on {host} without --api-key" in out
    assert len(started) == 1


@pytest.mark.parametrize("port", ["0", "65536"])
def test_serve_refuses_a_port_out_of_range(model_dir, tmp_path, started, capsys, port):
    build(model_dir, SHAPES, tmp_path / "idx")
    assert main(["serve", str(tmp_path / "idx"), "--port", port]) == 2
    assert f"cliplab: error: --port {port}: must be 1..65535" in capsys.readouterr().err
    assert not started


def test_a_chunk_holds_each_photo_as_the_model_takes_it(model_dir, tmp_path, monkeypatch):
    """Image files are fitted to the model's input as they are read (a chunk of 1 024 phone
    photos held them decoded whole: ~48 GB), and embed as the model embeds each whole file."""
    root = tmp_path / "photos"
    root.mkdir()
    g = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate([(60, 80), (80, 60), (48, 48), (90, 40)]):
        smooth = g.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        files.append(root / f"p{i}.png")
        Image.fromarray(smooth).save(files[-1])
    held = []
    original = build_module.embed_images
    monkeypatch.setattr(build_module, "embed_images",
                        lambda model, images, *a: held.extend(im.size for im in images)
                        or original(model, images, *a))
    build(model_dir, {"source": "image-folder", "path": str(root)}, tmp_path / "idx")
    assert held == [(16, 16)] * 4
    index = SearchIndex(tmp_path / "idx")
    by_key = {row["key"]: row["id"] for row in index.items(range(4)).values()}
    model = DualEncoder.load(model_dir)
    for file in files:
        whole = torch.from_numpy(np.asarray(Image.open(file).convert("RGB")))[None]
        want = direct_image_embeddings(model, whole)[0]
        assert np.allclose(np.asarray(index.vectors)[by_key[file.name]], want, atol=0.02)


def test_serve_warns_of_an_index_tuned_on_image_queries_only(model_dir, tmp_path, started,
                                                             capsys):
    """An HNSW/IVF index built before text queries were tuned on (no ``recalls``) is served
    with a warning saying how to tune it; a newly built one, and an exact one, without."""
    from fastapi.testclient import TestClient

    build(model_dir, SHAPES, tmp_path / "idx", index_type="hnsw")
    record_file = tmp_path / "idx" / "index.json"
    assert "recalls" in json.loads(record_file.read_text())["faiss"]
    assert main(["serve", str(tmp_path / "idx"), "--port", str(free_port())]) == 0
    assert "warning" not in capsys.readouterr().err
    record = json.loads(record_file.read_text())
    del record["faiss"]["recalls"]  # as an older cliplab wrote it
    record_file.write_text(json.dumps(record))
    assert main(["serve", str(tmp_path / "idx"), "--port", str(free_port())]) == 0
    out = capsys.readouterr().err
    assert (f"cliplab: warning: serve: {tmp_path / 'idx'}: its efSearch="
            f"{record['faiss']['value']} was tuned on image queries only") in out
    assert "build it again with `cliplab index`" in out
    head = TestClient(started[-1]["app"], base_url="http://localhost:8000").head("/api/health")  # uptime checks probe with HEAD
    assert head.status_code == 200
    build(model_dir, SHAPES, tmp_path / "flat")
    assert main(["serve", str(tmp_path / "flat"), "--port", str(free_port())]) == 0
    assert "warning" not in capsys.readouterr().out


def test_the_same_index_command_without_add_names_a_stopped_add(model_dir, tmp_path,
                                                               monkeypatch):
    """A killed --add, then the command again without --add: 'already exists; pass --add' did
    not say an --add was waiting to be finished."""
    build(model_dir, SHAPES, tmp_path / "idx", chunk=8)
    real_add = MetadataStore.add

    def die(self, rows, skipped=()):
        real_add(self, rows, skipped)
        raise Killed

    monkeypatch.setattr(MetadataStore, "add", die)
    with pytest.raises(Killed):
        build(model_dir, {**SHAPES, "seed": 5}, tmp_path / "idx", chunk=8, add=True)
    monkeypatch.setattr(MetadataStore, "add", real_add)
    with pytest.raises(ConfigError, match=(
            rf"already exists \(an index\) \(an --add to it stopped before its end: the same "
            rf"command with --add finishes it from {tmp_path / 'idx.partial'}\); pass --add")):
        build(model_dir, {**SHAPES, "seed": 5}, tmp_path / "idx", chunk=8)
    assert build(model_dir, {**SHAPES, "seed": 5}, tmp_path / "idx", chunk=8,
                 add=True)["count"] == 80


def test_serving_a_folder_that_does_not_exist_says_so(tmp_path):
    """It said the folder 'is not an index (no index.json)': a typo in the path is likelier."""
    with pytest.raises(DataError, match=rf"^{tmp_path / 'nope'} does not exist; give the folder "
                                        r"`cliplab index --out` wrote$"):
        SearchIndex(tmp_path / "nope")


def test_an_add_that_indexes_what_was_skipped_takes_it_off_the_skipped_table(tmp_path):
    """After `index --add` read an image that was unreadable before, the index still counted
    and listed it as skipped."""
    from tests.image_folders import pets_folder

    model = save_tiny_model(tmp_path / "model")
    photos = pets_folder(tmp_path / "pets", per_class=2, broken_in="cat")
    first = build(model, str(photos), tmp_path / "idx")
    assert (first["count"], first["skipped"]["total"]) == (4, 1)
    Image.new("RGB", (16, 16), "green").save(photos / "cat" / "bad.png", format="PNG")
    record = build(model, str(photos), tmp_path / "idx", add=True)
    assert (record["count"], record["skipped"]["total"]) == (5, 0)
    assert record["recovered"] == 1
    assert record["skipped"]["counts"] == {} and record["skipped_now"] == {}
    store = MetadataStore(tmp_path / "idx" / "meta.sqlite", readonly=True)
    assert store.skipped() == []
    store.close()


def test_a_damaged_shards_entries_go_once_all_its_items_are_indexed(tmp_path):
    store = MetadataStore(tmp_path / "meta.sqlite")
    rows = [{"id": i, "key": key, "caption": "", "location": {}, "meta": {}}
            for i, key in enumerate(["a.tar:0", "a.tar:1", "b.tar:0", "x"])]
    store.add(rows, [("a.tar", "truncated_shard: a.tar: read 0 of 2 samples, then: error"),
                     ("a.tar:sample 1 of 2", "cut_off: a.tar:sample 1 of 2: lost"),
                     ("b.tar:sample 2 of 3", "cut_off: b.tar:sample 2 of 3: lost"),
                     ("x", "duplicate_key: x is also an earlier item's key"),
                     ("y", "unreadable_image: y")])
    assert store.drop_recovered_skips() == 2
    assert [key for key, _ in store.skipped()] == ["b.tar:sample 2 of 3", "x", "y"]
    store.close()


def test_overwrite_replaces_an_index_and_nothing_else(model_dir, tmp_path, capsys):
    """`index --overwrite` replaces an index at --out, as curate's --overwrite replaces a pool
    (`rm -r` was the only way); a folder holding anything but an index's files (a file of the
    user's beside them or among its stored images, or no index at all) is refused untouched,
    and so is --overwrite with --add."""
    out = tmp_path / "idx"
    first = build(model_dir, SHAPES, out)
    command = ["index", "--model", str(model_dir), "--data", "shapes", "--out", str(out),
               "--no-progress", "--device", "cpu", "data.n=12", "data.seed=9"]
    assert main(command) == 2
    assert capsys.readouterr().err.strip() == (
        f"cliplab: error: --out {out} already exists (an index); pass --add to append to it "
        "or --overwrite to replace it, or choose a new --out")
    assert main([*command, "--add", "--overwrite"]) == 2  # flags named as flags
    assert capsys.readouterr().err.strip() == (
        "cliplab: error: --add appends to the index at --out and --overwrite replaces it; give "
        "one of them")
    (tmp_path / "add.yaml").write_text("add: true\n", encoding="utf-8")
    assert main([*command, "--config", str(tmp_path / "add.yaml"), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == (  # a file's keys named as keys
        f"cliplab: error: {tmp_path / 'add.yaml'} + command line: add appends to the index at "
        "--out and overwrite replaces it; give one of them")
    (tmp_path / "add.yaml").unlink()
    for foreign in (out / "notes.txt", out / "images" / "mine.jpg"):
        foreign.write_text("the user's", encoding="utf-8")
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        assert main([*command, "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"cliplab: error: --overwrite replaces only a previous index output; "
                       f"{out} holds other files (e.g. {foreign.relative_to(out)}); "
                       "choose a new folder")
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
        foreign.unlink()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("the user's", encoding="utf-8")
    assert main([*command[:6], str(tmp_path / "mine"), *command[7:], "--overwrite"]) == 2
    assert "holds other files (e.g. a.txt)" in capsys.readouterr().err
    assert (tmp_path / "mine" / "a.txt").read_text(encoding="utf-8") == "the user's"
    # a killed run into idx/sub left its lock (hidden, held by no process): cliplab's own
    (out / ".sub.cliplab-lock").write_text("pid 999999 on vm", encoding="utf-8")
    assert main([*command, "--overwrite"]) == 0
    record = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert record["count"] == 12 and record["build"] != first["build"]
    assert record["sources"] == [{"source": "shapes", "n": 12, "seed": 9}]
    assert sorted(p.name for p in (out / "images").iterdir()) == \
        sorted(f"{i}.png" for i in range(12))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "mine"]  # nothing left beside
    # an index an older cliplab wrote, and a damaged one, are replaced the same way
    _as_an_older_cliplab_wrote_it(out)
    assert main([*command[:-2], "data.n=10", "--overwrite"]) == 0
    (out / "index.json").write_text("{", encoding="utf-8")
    assert main([*command[:-2], "data.n=8", "--overwrite"]) == 0
    assert SearchIndex(out).count == 8


def test_overwrite_starts_over_from_a_stopped_run_of_another_command(model_dir, tmp_path,
                                                                     monkeypatch, capsys):
    """A half-built index of another command in OUT.partial is refused without --overwrite
    (rerun that command, or delete it) and built over with it, as curate's does."""
    _killed_build(monkeypatch, 2, model_dir, SHAPES, tmp_path / "idx", chunk=8)
    other = {**SHAPES, "seed": 4}
    with pytest.raises(ConfigError, match="half-built index of another"):
        build(model_dir, other, tmp_path / "idx", chunk=8)
    record = build(model_dir, other, tmp_path / "idx", chunk=8, overwrite=True)
    assert record["count"] == SHAPES["n"] and record["sources"][0]["seed"] == 4
    assert not (tmp_path / "idx.partial").exists()


def test_an_index_path_with_uri_characters_keeps_its_metadata_inside(model_dir, tmp_path,
                                                                      monkeypatch):
    """``#``, ``?`` and ``%`` in the index path (and a folder above it) are file-name
    characters, not parts of an SQLite URI: build, open and --add all use OUT/meta.sqlite,
    and nothing lands in the working folder."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "top #1 ?x=1" / "idx #2 %41 100% ?q"
    out.parent.mkdir()
    assert build(model_dir, {**SHAPES, "n": 6}, out)["count"] == 6
    assert (out / "meta.sqlite").is_file()
    assert SearchIndex(out).store.count() == 6
    assert build(model_dir, {**SHAPES, "n": 4, "seed": 9}, out, add=True)["count"] == 10
    assert SearchIndex(out).store.count() == 10
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_a_read_only_metadata_open_creates_no_file(tmp_path, monkeypatch):
    """A read-only open under a folder named with ``#`` reads that file, and never creates one
    (a dropped ``mode=ro`` would create an empty database beside the text before the ``#``)."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "moved #2 ?%"
    folder.mkdir()
    with pytest.raises(sqlite3.OperationalError):
        MetadataStore(folder / "meta.sqlite", readonly=True)
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []
    writer = MetadataStore(folder / "meta.sqlite")
    writer.add([{"id": 0, "key": "k", "caption": "c", "location": {}, "meta": {}}])
    writer.close()
    reader = MetadataStore(folder / "meta.sqlite", readonly=True)
    assert reader.count() == 1
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader._db.execute("DELETE FROM items")
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
