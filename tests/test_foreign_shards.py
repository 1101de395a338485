"""Shards cliplab did not write: a ``tar`` of a folder, webdataset's ``.tar.gz``, damaged tars
without an ``index.json``, macOS's hidden members, another tool's folder and a tar added to a
cliplab folder. Each is read whole, or refused or counted in one line; never lost in silence."""

import io
import json
import tarfile

import numpy as np
import pytest

from cliplab.cli import main
from cliplab.data.collection import iter_items
from cliplab.data.shards import ShardStream, load_shards, write_shards
from cliplab.data.shards.tar_members import tar_is_whole
from cliplab.errors import DataError
from tests.tar_files import png_bytes, write_tar
from tests.warned import warned

COLOURS = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}


def _image(key: str) -> bytes:
    return png_bytes(np.full((8, 8, 3), COLOURS[key], np.uint8))


def _write_members(path, members, mode="w") -> None:
    """A tar of ``[(member name, bytes)]`` in the order given."""
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _read(stream: ShardStream) -> list[tuple[str, tuple]]:
    """``(caption, mean colour)`` of every sample the stream gives, sorted."""
    return sorted((s["caption"], tuple(s["image"].float().mean((0, 1)).round().int().tolist()))
                  for s in stream)


def _captions(stream: ShardStream) -> list[str]:
    return [caption for caption, _ in _read(stream)]


def _stream(path) -> ShardStream:
    return ShardStream(str(path), shuffle=False, rank=0, world_size=1)


def test_a_tar_of_a_folder_is_read_whole_by_every_reader(tmp_path):
    """`tar cf` of a folder lists members in directory order, a sample's parts apart: the
    stream read them as fragments (`duplicate_key`, `missing_image`, 1 of 3 samples)."""
    folder = tmp_path / "folder-tar"
    folder.mkdir()
    _write_members(folder / "00000.tar", [
        ("./a.txt", b"alpha"), ("./b.png", _image("b")), ("./a.png", _image("a")),
        ("./c.txt", b"gamma"), ("./b.txt", b"beta"), ("./c.png", _image("c"))])
    stream = _stream(folder)
    assert sum(stream.rank_sample_counts()) == 3
    assert _read(stream) == [("alpha", (255, 0, 0)), ("beta", (0, 255, 0)),
                             ("gamma", (0, 0, 255))]
    assert stream.skipped.total == 0
    pairs = load_shards(folder, progress=False)
    assert sorted(pairs.captions) == [["alpha"], ["beta"], ["gamma"]]
    assert sorted(item.caption for item in iter_items({"source": "shards", "path": str(folder)},
                                                      progress=False)) == ["alpha", "beta", "gamma"]


def test_damaged_and_empty_tars_without_an_index_are_counted_not_refused(tmp_path):
    """Without an index.json the stream counts samples from the headers up front: a tar cut
    inside a member or an empty file made that count (and a streamed pretraining) fail whole."""
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / "00000.tar").write_bytes(b"")
    write_tar(folder / "00001.tar", [(k, {"png": _image(k), "txt": k.encode()}) for k in "ab"])
    write_tar(folder / "00002.tar", [(k, {"png": _image(k), "txt": k.encode()}) for k in "abc"])
    with tarfile.open(folder / "00002.tar") as tar:
        cut = tar.getmember("c.png").offset_data + 10  # inside c's image
    (folder / "00002.tar").write_bytes((folder / "00002.tar").read_bytes()[:cut])
    stream = _stream(folder)
    assert stream.rank_sample_counts() == [0 + 2 + 3]
    assert _captions(stream) == ["a", "a", "b", "b"]
    summary = stream.skipped.summary()
    assert "00000.tar:after 0 samples (the file is empty)" in summary
    assert "00002.tar:after 2 samples (the file ends early, cut off inside a member)" in summary


def test_a_shard_deleted_after_it_was_listed_is_counted_as_lost(tmp_path):
    sets = tmp_path / "sets"
    sets.mkdir()
    for name in ("00000.tar", "00001.tar"):
        write_tar(sets / name, [(k, {"png": _image(k), "txt": k.encode()}) for k in "abc"])
    stream = _stream(sets)
    (sets / "00001.tar").unlink()
    assert stream.rank_sample_counts() == [3]  # was a FileNotFoundError traceback
    assert _captions(stream) == ["a", "b", "c"]
    assert "00001.tar:after 0 samples (read error: No such file or directory)" in \
        stream.skipped.summary()


def test_gzipped_tars_read_whole_beside_plain_ones_and_index_refuses_them(tmp_path):
    """webdataset reads ``.tar.gz`` shards: every one was called cut off (its end marker
    looked for in the compressed bytes), and a folder's were left out without a word."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_tar(folder / "00000.tar", [("a", {"png": _image("a"), "txt": b"alpha"})])
    _write_members(folder / "00001.tar.gz", [("b.png", _image("b")), ("b.txt", b"beta"),
                                             ("c.png", _image("c")), ("c.txt", b"gamma")],
                   mode="w:gz")
    assert tar_is_whole(folder / "00001.tar.gz")
    stream = _stream(folder)
    assert stream.rank_sample_counts() == [3]
    assert _captions(stream) == ["alpha", "beta", "gamma"]
    assert stream.skipped.total == 0 and "read only in part" not in stream.skipped.summary()
    with pytest.raises(DataError, match=r"00001.tar.gz is gzip-compressed: index and curate "
                                        r"read images in place and need plain .tar shards"):
        list(iter_items({"source": "shards", "path": str(folder)}, progress=False))


def test_hidden_members_of_a_macos_tar_are_no_samples(tmp_path):
    folder = tmp_path / "mac"
    folder.mkdir()
    _write_members(folder / "00000.tar", [("./._a.png", b"\0\5\x16\7"), ("./a.png", _image("a")),
                                          ("./a.txt", b"alpha")])
    items = list(iter_items({"source": "shards", "path": str(folder)}, progress=False))
    assert [item.caption for item in items] == ["alpha"]
    stream = _stream(folder)
    assert stream.rank_sample_counts() == [1] and _captions(stream) == ["alpha"]


def test_overwrite_never_deletes_another_tools_shards(tmp_path):
    """img2dataset's folder (tars, ``_stats.json``, ``.parquet``; no cliplab index.json): its
    tars were deleted and its parquet files left describing shards that were gone."""
    theirs = tmp_path / "img2dataset"
    theirs.mkdir()
    write_tar(theirs / "00000.tar", [("000000000", {"png": _image("a"), "txt": b"alpha"})])
    (theirs / "00000_stats.json").write_text("{}", encoding="utf-8")
    (theirs / "00000.parquet").write_bytes(b"PAR1")
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    assert main(["data", "shard", "--source", "digits", "--out", str(theirs),
                 "--overwrite", "--no-progress"]) == 2
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before


def test_a_tar_its_folders_index_does_not_list_is_warned_of(tmp_path, recwarn):
    sets = tmp_path / "sets"
    pairs = load_shards(_one_tar(tmp_path), progress=False)
    write_shards(pairs, sets, samples_per_shard=2, image_format="png", progress=False)
    (sets / "00007.tar").write_bytes((sets / "00000.tar").read_bytes())
    warned(recwarn)
    assert _captions(_stream(sets)) == ["a", "b", "c"]
    assert f"{sets}: 1 tar file(s) not listed in its index.json are not read (00007.tar)" in \
        warned(recwarn)


def _one_tar(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    write_tar(folder / "00000.tar", [(k, {"png": _image(k), "txt": k.encode()}) for k in "abc"])
    return folder


def test_index_json_of_a_written_set_names_every_shard_it_reads(tmp_path, recwarn):
    """The check above warns of nothing in a set as written."""
    sets = tmp_path / "sets"
    write_shards(load_shards(_one_tar(tmp_path), progress=False), sets, samples_per_shard=2,
                 image_format="png", progress=False)
    names = [e["name"] for e in json.loads((sets / "index.json").read_text())["shards"]]
    assert names == ["00000.tar", "00001.tar"]
    warned(recwarn)
    _stream(sets)
    assert warned(recwarn) == ""


@pytest.mark.parametrize("theirs", [
    {"version": 2, "shards": [{"raw_data": {"basename": "shard.00000.mds"}, "samples": 3}]},
    {"wids_version": 1, "name": "x", "shardlist": [{"url": "00000.tar", "nsamples": 3}]}])
def test_another_tools_index_json_is_no_shard_list(tmp_path, recwarn, theirs):
    """MosaicML's and wids' files share the name: a KeyError traceback, or a refusal."""
    folder = _one_tar(tmp_path)
    (folder / "index.json").write_text(json.dumps(theirs), encoding="utf-8")
    warned(recwarn)
    assert _captions(_stream(folder)) == ["a", "b", "c"]
    assert len(list(iter_items({"source": "shards", "path": str(folder)}, progress=False))) == 3
    assert f"{folder / 'index.json'} is not a cliplab shard index" in warned(recwarn)


def test_overwrite_removes_the_old_sets_files_and_nothing_else(tmp_path):
    sets, pairs = tmp_path / "sets", load_shards(_one_tar(tmp_path), progress=False)
    write_shards(pairs, sets, samples_per_shard=2, image_format="png", progress=False)
    mine = {"originals_backup.tar": b"keep", "experiment_stats.json": b"{}", "notes.txt": b"n"}
    for name, data in mine.items():
        (sets / name).write_bytes(data)
    write_shards(pairs, sets, samples_per_shard=3, image_format="png", overwrite=True,
                 progress=False)
    assert {name: (sets / name).read_bytes() for name in mine} == mine
    assert not (sets / "00001.tar").exists() and (sets / "00000.tar").exists()


def test_a_shard_deleted_while_index_reads_it_fails_its_items_not_the_run(tmp_path):
    """`cliplab index` ended in a FileNotFoundError traceback (a caption read at listing)."""
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("00000.tar", "00001.tar"):
        write_tar(folder / name, [(k, {"png": _image(k), "txt": k.encode()}) for k in "abc"])
    items = iter_items({"source": "shards", "path": str(folder)}, progress=False)
    first = next(items)
    (folder / "00000.tar").unlink()
    rest = list(items)
    assert first.caption == "a" and [item.caption for item in rest] == ["", "", "a", "b", "c"]
    for item in rest[:2]:
        with pytest.raises(FileNotFoundError):
            item.read()
    assert rest[2].read().size == (8, 8)


def test_a_cut_tar_of_a_folder_keeps_its_whole_samples_and_a_gzipped_one_is_refused(tmp_path):
    """The regrouped reader lost every sample of a cut tar (its headers listed first failed
    whole), and read a ``.tar.gz`` in quadratic time (decompressed anew per sample)."""
    folder = tmp_path / "cut"
    folder.mkdir()
    members = [(f"{k}.png", _image(k)) for k in "abc"] + [(f"{k}.txt", k.encode() * 600)
                                                          for k in "abc"]
    _write_members(folder / "00000.tar", members)
    with tarfile.open(folder / "00000.tar") as tar:
        cut = tar.getmember("c.txt").offset_data + 10
    (folder / "00000.tar").write_bytes((folder / "00000.tar").read_bytes()[:cut])
    stream = _stream(folder)
    assert _captions(stream) == ["a" * 600, "b" * 600]
    assert "00000.tar:after 2 samples (the file ends early, cut off inside a member)" in \
        stream.skipped.summary()
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    _write_members(zipped / "00000.tar.gz", members, mode="w:gz")
    stream = _stream(zipped)
    assert _captions(stream) == []
    assert ("00000.tar.gz:after 0 samples (its samples' members lie apart (a `tar` of a "
            "folder), which a gzip-compressed tar cannot be read in") in stream.skipped.summary()


def test_a_shard_pattern_with_unbalanced_braces_is_one_line(tmp_path, capsys):
    assert main(["data", "shard", "--source", "shards", f"data.path={tmp_path}/{{00000..00001",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "Unbalanced braces: '" + f"{tmp_path}/{{00000..00001'; a pattern is "
        "DIR/{00000..00009}.tar")
    with pytest.raises(DataError, match=r"^shard pattern .*: Unbalanced braces"):
        _stream(f"{tmp_path}/{{00000..00001")


def test_shards_of_an_unknown_count_are_read_into_one_tensor_without_a_second_copy(
        tmp_path, monkeypatch):
    """A count not known up front (a tar cut short) made the images' room 1024: past it they
    went to a list that `torch.stack` copied whole, the set held twice at the end."""
    import torch

    import cliplab.data.images as images_module

    folder = tmp_path / "foreign"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (1100, 2, 3, 3), dtype=np.uint8)
    for shard in range(2):
        write_tar(folder / f"{shard:05d}.tar",
                  [(f"{i:04d}", {"png": png_bytes(arrays[i]), "txt": str(i).encode()})
                   for i in range(shard * 550, shard * 550 + 550)])
    known = load_shards(folder, progress=False)

    def unknown(self, *args, **kwargs):
        raise DataError("a tar cut short")

    def no_stack(*args, **kwargs):
        raise AssertionError("the images were copied whole by torch.stack")
    monkeypatch.setattr(ShardStream, "rank_sample_counts", unknown)
    monkeypatch.setattr(torch, "stack", no_stack)
    monkeypatch.setattr(images_module, "stack_images", no_stack)
    pairs = load_shards(folder, progress=False)
    assert torch.equal(pairs.images, torch.from_numpy(arrays))
    assert torch.equal(pairs.images, known.images) and pairs.captions == known.captions
