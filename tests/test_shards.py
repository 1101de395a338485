"""WebDataset shards: writer layout, round trip, rank x worker split, shuffle, exact resume,
corrupt samples, the `cliplab data shard` command."""

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.cli import main
from cliplab.data.shards import (ShardLoader, ShardStream, collate_samples, load_shards,
                                 write_shards)
from cliplab.data.sources import as_pairs, load_source
from cliplab.data.types import ImageTextPairs, LabelledImages
from cliplab.errors import DataError
from tests.stamped import assert_stamped, now
from tests.tar_files import png_bytes, write_tar
from tests.warned import warned


@pytest.fixture(scope="module")
def shapes():
    return load_source({"source": "shapes", "n": 53, "seed": 3, "image_size": 32})


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, shapes):
    """53 shapes scenes in 9 shards (8 of 6 samples, one of 5), lossless."""
    out = tmp_path_factory.mktemp("shards") / "shapes"
    write_shards(shapes, out, samples_per_shard=6, image_format="png", progress=False)
    return out




# ---- writer ------------------------------------------------------------------------------------

def test_writer_layout_counts_and_metadata(shard_dir, shapes):
    index = json.loads((shard_dir / "index.json").read_text())
    assert [s["name"] for s in index["shards"]] == [f"{i:05d}.tar" for i in range(9)]
    assert [s["count"] for s in index["shards"]] == [6] * 8 + [5]
    assert index["total"] == 53 and index["source"] is None
    assert json.loads((shard_dir / "00008_stats.json").read_text())["count"] == 5
    # OpenCLIP's loader takes the counts from sizes.json beside the shards
    assert json.loads((shard_dir / "sizes.json").read_text()) == {
        s["name"]: s["count"] for s in index["shards"]}
    with tarfile.open(shard_dir / "00001.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000006.json").read())
        txt = tar.extractfile("000000006.txt").read().decode()
    assert names[:3] == ["000000006.json", "000000006.png", "000000006.txt"]
    assert len(names) == 18
    assert meta["captions"] == shapes.captions[6] and txt == shapes.captions[6][0]
    assert meta["group"] == int(shapes.groups[6]) and meta["source_key"].endswith(":6")


def test_round_trip_png_is_identical(shard_dir, shapes):
    pairs = load_source({"source": "shards", "path": str(shard_dir)})
    assert isinstance(pairs, ImageTextPairs) and len(pairs) == 53
    assert torch.equal(pairs.images, shapes.images)
    assert pairs.captions == shapes.captions
    assert torch.equal(pairs.groups, shapes.groups)
    assert pairs.skipped.total == 0


def test_a_callers_progress_setting_reaches_the_shards_read_bar(shard_dir, capsys):
    spec = {"source": "shards", "path": str(shard_dir)}
    load_source(spec, progress=False)
    assert "read shards" not in capsys.readouterr().err
    load_source({**spec, "progress": True}, progress=False)  # the spec's own wins
    assert "read shards" in capsys.readouterr().err


def test_round_trip_labelled_grayscale_png_and_jpg(tmp_path):
    digits = load_source({"source": "digits", "split": "test"})
    digits = digits.subset(torch.arange(40))
    started = now()
    write_shards(digits, tmp_path / "png", samples_per_shard=16, image_format="png", progress=False)
    finished = now()
    back = load_source({"source": "shards", "path": str(tmp_path / "png"), "progress": False})
    assert isinstance(back, LabelledImages)  # classification stages take it
    assert back.images.shape == (40, 8, 8, 1) and torch.equal(back.images, digits.images)
    assert torch.equal(back.labels, digits.labels)
    assert back.classnames == digits.classnames and back.templates == digits.templates
    pairs = as_pairs(back)
    assert torch.equal(pairs.groups, digits.labels)
    assert pairs.captions[0] == [t.format(digits.classnames[int(digits.labels[0])])
                                 for t in digits.templates]
    index = json.loads((tmp_path / "png" / "index.json").read_text())
    assert index["classnames"] == digits.classnames
    assert_stamped(index, started, finished)  # which cliplab wrote the set, and when
    write_shards(digits, tmp_path / "jpg", image_format="jpg", quality=95, progress=False)
    lossy = load_source({"source": "shards", "path": str(tmp_path / "jpg"), "progress": False})
    error = (lossy.images.float() - digits.images.float()).abs().mean()
    assert 0 < error < 8  # JPEG: close, not equal


def test_labelled_shards_carry_the_class_as_webdataset_reads_it_and_reshard_alike(tmp_path):
    """``KEY.cls`` beside the image, as webdataset's and CLIP_benchmark's readers take a class;
    a set sharded again keeps its name (it became ``digits-test-pairs-pairs``)."""
    import webdataset as wds

    digits = load_source({"source": "digits", "split": "test"}).subset(torch.arange(12))
    write_shards(digits, tmp_path / "dg", samples_per_shard=12, image_format="png", progress=False)
    read = wds.WebDataset(str(tmp_path / "dg" / "00000.tar"), shardshuffle=False)
    assert [int(cls) for cls, in read.to_tuple("cls")] == digits.labels.tolist()
    assert main(["data", "shard", "--source", str(tmp_path / "dg"), "--out", str(tmp_path / "dg2"),
                 "--format", "png", "--no-progress"]) == 0
    names = [json.loads((tmp_path / d / "index.json").read_text())["name"] for d in ("dg", "dg2")]
    assert names == ["digits-test-pairs", "digits-test-pairs"]


def test_shards_of_classes_without_captions_point_to_the_clip_benchmark_reader(tmp_path):
    (tmp_path / "cls").mkdir()
    write_tar(tmp_path / "cls" / "00000.tar",
              [(k, {"png": png_bytes(np.zeros((8, 8, 3), np.uint8)), "cls": b"1"}) for k in "ab"])
    with pytest.raises(DataError, match=r"class_only=2\); its samples hold a class \(KEY.cls\) "
                                        r"and no caption: read such a set as \{source: "
                                        r"clip-benchmark"):
        load_shards(tmp_path / "cls", progress=False)


def test_shards_read_back_labelled_only_when_every_group_is_a_listed_class(tmp_path):
    digits = load_source({"source": "digits", "split": "test"}).subset(torch.arange(30))
    digits.descriptions = [f"the handwritten digit {n}" for n in digits.classnames]
    write_shards(digits, tmp_path / "s", image_format="png", progress=False)
    spec = {"source": "shards", "path": str(tmp_path / "s"), "progress": False}
    back = load_source(spec)
    assert isinstance(back, LabelledImages) and back.descriptions == digits.descriptions
    index_file = tmp_path / "s" / "index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({**index, "classnames": index["classnames"][:3]}))
    assert isinstance(load_source(spec), ImageTextPairs)  # labels beyond the listed classes
    index_file.write_text(json.dumps({k: v for k, v in index.items() if k != "classnames"}))
    pairs = load_source(spec)
    assert isinstance(pairs, ImageTextPairs) and torch.equal(pairs.groups, digits.labels)


def test_writer_refuses_non_empty_folder_and_overwrite_replaces(tmp_path, shapes):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and no previous shard output: .*notes.txt.*"
                                        "choose a new folder$"):  # --overwrite would not do
        write_shards(shapes, out, progress=False)
    with pytest.raises(DataError, match="only a previous shard output"):  # not a shard set
        write_shards(shapes, out, overwrite=True, progress=False)
    (out / "notes.txt").unlink()
    write_shards(shapes, out, samples_per_shard=10, progress=False)
    (out / "notes.txt").write_text("mine")
    write_shards(shapes, out, samples_per_shard=10, overwrite=True, progress=False)
    write_shards(shapes, out, samples_per_shard=30, overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert (out / "notes.txt").read_text() == "mine"  # not ours: left alone


def test_overwrite_never_replaces_a_search_indexs_index_json(tmp_path, shapes):
    """A `cliplab index` folder holds an index.json too: --overwrite took it for a shard set's,
    replaced it and left the index unservable (its other files beside the shards)."""
    index = tmp_path / "idx"
    index.mkdir()
    (index / "index.json").write_text('{"format": 1, "complete": true}', encoding="utf-8")
    (index / "faiss.index").write_bytes(b"x")
    with pytest.raises(DataError, match=r"only a previous shard output; .*idx holds other "
                                        r"files \(e.g. faiss.index\)"):
        write_shards(shapes, index, overwrite=True, progress=False)
    assert (index / "index.json").read_text(encoding="utf-8") == '{"format": 1, "complete": true}'


# ---- reading, splitting, shuffling ---------------------------------------------------------------

def _keys(stream_or_loader):
    out = []
    for item in stream_or_loader:
        out.extend(item["key"] if isinstance(item["key"], list) else [item["key"]])
    return out


def test_every_sample_exactly_once_across_2_ranks_x_2_workers(shard_dir):
    all_keys = set(_keys(ShardStream(shard_dir, shuffle=False, rank=0, world_size=1)))
    assert len(all_keys) == 53
    for epoch in (0, 1):
        seen, per_rank = [], []
        for rank in (0, 1):
            stream = ShardStream(shard_dir, seed=7, shuffle_buffer=8, rank=rank, world_size=2,
                                 image_size=32)
            stream.set_epoch(epoch)
            loader = ShardLoader(stream, batch_size=4, num_workers=2)
            expected = stream.rank_sample_counts(workers=2)
            keys = _keys(loader)
            per_rank.append(len(keys))
            assert len(keys) == expected[rank]
            seen.extend(keys)
        assert len(seen) == 53 and set(seen) == all_keys
        assert sum(per_rank) == 53 and min(per_rank) > 0


def test_a_shard_replaced_since_it_was_listed_is_counted_not_taken_from_the_index(
        shard_dir, tmp_path):
    """index.json's count was trusted for a tar replaced since by one of more samples: a
    streamed epoch read 48 of 80 samples, silently. The listed size tells it apart: a whole
    tar of another size is counted (with a warning); the listed one, and a set written before
    sizes were kept, take index.json's count without opening the tar."""
    import shutil

    from cliplab.data.shards.layout import shard_sample_counts

    folder = shutil.copytree(shard_dir, tmp_path / "set")
    index = json.loads((folder / "index.json").read_text())
    assert [s["bytes"] for s in index["shards"]] == \
        [(folder / s["name"]).stat().st_size for s in index["shards"]]
    tars = sorted(folder.glob("*.tar"))
    assert shard_sample_counts(tars) == [6] * 8 + [5]
    whole = tmp_path / "one"  # all 53 samples in one tar, put in 00000.tar's place
    write_shards(load_source({"source": "shards", "path": str(shard_dir)}), whole,
                 samples_per_shard=100, image_format="png", progress=False)
    shutil.copy(whole / "00000.tar", folder / "00000.tar")
    with pytest.warns(UserWarning, match=r"00000.tar: not the shard index.json lists"):
        assert shard_sample_counts(tars) == [53] + [6] * 7 + [5]
    for shard in index["shards"]:
        del shard["bytes"]  # as sets written before the sizes were kept
    (folder / "index.json").write_text(json.dumps(index))
    assert shard_sample_counts(tars) == [6] * 8 + [5]


def test_shard_split_is_a_partition_and_counts_match(shard_dir):
    stream = ShardStream(shard_dir, seed=1, rank=0, world_size=3)
    for workers in (1, 2, 4):
        ids = [i for r in range(3) for w in range(workers)
               for i in stream.stream_shards(0, r, w, workers)]
        assert sorted(ids) == list(range(9))
    assert sum(stream.rank_sample_counts(workers=2)) == 53


def test_stream_counts_shuffle_the_shards_once_per_epoch(shard_dir, monkeypatch):
    """Streamed training asks the counts every step: each (rank, worker) stream shuffled the
    whole shard list again (seconds a step for 10k shards on 64 ranks x 8 workers). The
    counts equal each stream's shards' counts, worked out one stream at a time."""
    from cliplab.data.shards.stream import shard_sample_counts

    stream = ShardStream(shard_dir, seed=1, rank=0, world_size=3)
    per_shard = shard_sample_counts(stream.shards)
    by_stream = [[sum(per_shard[i] for i in stream.stream_shards(0, r, w, 2)) for w in range(2)]
                 for r in range(3)]
    shuffles = []
    real = ShardStream.shard_order
    monkeypatch.setattr(ShardStream, "shard_order",
                        lambda self, epoch: shuffles.append(epoch) or real(self, epoch))
    for _ in range(50):
        assert stream.stream_sample_counts(workers=2) == by_stream
    assert shuffles == [0]
    stream.set_epoch(1)
    stream.stream_sample_counts(workers=2)
    stream.stream_sample_counts(workers=4)
    assert shuffles == [0, 1, 1]


def test_shuffle_is_deterministic_per_seed_and_epoch(shard_dir):
    def order(seed, epoch):
        stream = ShardStream(shard_dir, seed=seed, shuffle_buffer=10, rank=0, world_size=1)
        stream.set_epoch(epoch)
        return _keys(stream)

    a = order(0, 0)
    assert a == order(0, 0)
    assert a != order(0, 1) and a != order(1, 0)
    assert sorted(a) == sorted(order(0, 1))
    unshuffled = _keys(ShardStream(shard_dir, shuffle=False, rank=0, world_size=1))
    assert unshuffled == sorted(unshuffled) and a != unshuffled


def test_in_process_pass_advances_the_epoch(shard_dir):
    stream = ShardStream(shard_dir, seed=0, rank=0, world_size=1)
    first = _keys(stream)
    assert stream.epoch == 1
    second = _keys(stream)
    fresh = ShardStream(shard_dir, seed=0, rank=0, world_size=1)
    fresh.set_epoch(1)
    assert second == _keys(fresh) and second != first


def test_caption_modes(shard_dir, shapes):
    first = next(iter(ShardStream(shard_dir, shuffle=False, caption="first")))
    assert first["caption"] == shapes.captions[0][0] and first["group"] == int(shapes.groups[0])
    every = next(iter(ShardStream(shard_dir, shuffle=False, caption="all")))
    assert every["caption"] == shapes.captions[0]
    assert every["image"].dtype == torch.uint8 and every["image"].shape == (32, 32, 3)

    def picks(seed, epoch):
        stream = ShardStream(shard_dir, shuffle=False, caption="random", seed=seed)
        stream.set_epoch(epoch)
        return [s["caption"] for s in stream]

    a = picks(0, 0)
    assert a == picks(0, 0) and a != picks(0, 1)
    assert all(c in caps for c, caps in zip(a, shapes.captions))


def test_brace_pattern_and_missing_shard(shard_dir):
    keys = _keys(ShardStream(f"{shard_dir}/{{00000..00002}}.tar", shuffle=False))
    assert len(keys) == 18 and keys[0].startswith("00000.tar:")
    with pytest.raises(DataError, match="shard not found: .*00041.tar \\(and 1 more\\)"):
        ShardStream(f"{shard_dir}/{{00041..00042}}.tar")


def test_collate_stacks_and_rejects_mixed_sizes():
    a = {"image": torch.zeros(4, 4, 3, dtype=torch.uint8), "caption": "x", "key": "s:a", "group": 2}
    b = {"image": torch.ones(4, 4, 3, dtype=torch.uint8), "caption": "y", "key": "s:b", "group": None}
    batch = collate_samples([a, b])
    assert batch["image"].shape == (2, 4, 4, 3) and batch["group"].tolist() == [2, -1]
    assert batch["caption"] == ["x", "y"] and batch["key"] == ["s:a", "s:b"]
    c = {**b, "image": torch.zeros(5, 4, 3, dtype=torch.uint8), "key": "s:c"}
    with pytest.raises(DataError, match="s:c is \\(5, 4, 3\\).*image_size"):
        collate_samples([a, c])


def test_image_size_resizes_so_mixed_sizes_batch(tmp_path):
    rng = np.random.default_rng(0)
    write_tar(tmp_path / "00000.tar", [
        (f"k{i}", {"png": png_bytes(rng.integers(0, 256, (8 + i, 10, 3), dtype=np.uint8)),
                   "txt": b"a caption"}) for i in range(4)])
    with pytest.raises(DataError, match="differ in size"):
        list(ShardLoader(ShardStream(tmp_path, shuffle=False), batch_size=4))
    batch = next(iter(ShardLoader(ShardStream(tmp_path, shuffle=False, image_size=6), batch_size=4)))
    assert batch["image"].shape == (4, 6, 6, 3)


# ---- resume -------------------------------------------------------------------------------------

def _batches(loader, limit=None):
    out = []
    for batch in loader:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def _stream(shard_dir, **kw):
    return ShardStream(shard_dir, seed=5, shuffle_buffer=10, rank=0, world_size=1, **kw)


@pytest.mark.parametrize("cut", [1, 4, 11])
def test_resume_with_workers_equals_uninterrupted(shard_dir, tmp_path, cut):
    """Worker 0 reads 5 shards (29 or 30 samples), worker 1 reads 4: with batches of 4 the
    streams end at different times, so late cuts resume after one worker is exhausted."""
    full = _batches(ShardLoader(_stream(shard_dir), batch_size=4, num_workers=2))
    assert sum(len(b["key"]) for b in full) == 53 and len(full) == 8 + 6

    first = ShardLoader(_stream(shard_dir), batch_size=4, num_workers=2)
    head = _batches(first, limit=cut)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = ShardLoader(_stream(shard_dir), batch_size=4, num_workers=2)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    tail = _batches(resumed)

    assert [b["key"] for b in head + tail] == [b["key"] for b in full]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(head + tail, full))
    assert resumed.stream.epoch == 1  # the resumed pass finished the epoch


def test_resume_in_process_and_at_epoch_end(shard_dir):
    full = _keys(_stream(shard_dir))
    stream = _stream(shard_dir)
    it = iter(stream)
    head = [next(it)["key"] for _ in range(20)]
    state = stream.state_dict()
    resumed = _stream(shard_dir)
    resumed.load_state_dict(state)
    assert head + _keys(resumed) == full

    done = _stream(shard_dir)
    _keys(done)  # a whole epoch: the state points at the start of epoch 1
    after = _stream(shard_dir)
    after.load_state_dict(done.state_dict())
    again = _stream(shard_dir)
    again.set_epoch(1)
    assert after.epoch == 1 and _keys(after) == _keys(again)


def test_resume_needs_same_workers_and_shards(shard_dir):
    loader = ShardLoader(_stream(shard_dir), batch_size=4, num_workers=2)
    _batches(loader, limit=2)
    other = ShardLoader(_stream(shard_dir), batch_size=4, num_workers=1)
    other.load_state_dict(loader.state_dict())
    with pytest.raises(DataError, match="saved with 2"):
        _batches(other)
    fewer = ShardStream(f"{shard_dir}/{{00000..00003}}.tar", seed=5, rank=0, world_size=1)
    with pytest.raises(DataError, match="shards"):
        fewer.load_state_dict(loader.state_dict())


def test_drop_last_and_batches_per_rank(shard_dir):
    for rank in (0, 1):
        stream = ShardStream(shard_dir, seed=2, rank=rank, world_size=2)
        loader = ShardLoader(stream, batch_size=4, num_workers=2, drop_last=True)
        expected = loader.batches_per_rank()[rank]
        batches = _batches(loader)
        assert len(batches) == expected and all(len(b["key"]) == 4 for b in batches)


def test_drop_last_with_streams_smaller_than_a_batch_says_so(shard_dir, recwarn):
    """Each worker batches its own stream: when every stream is smaller than a batch,
    drop_last yields nothing, and a line on stderr says why (it was silent)."""
    stream = ShardStream(shard_dir, seed=2, rank=0, world_size=1)
    most = max(stream.stream_sample_counts(2)[0])
    loader = ShardLoader(stream, batch_size=most + 1, num_workers=2, drop_last=True)
    assert _batches(loader) == [] and loader.batches_per_rank() == [0]
    assert "fewer than batch_size" in warned(recwarn)
    _batches(ShardLoader(ShardStream(shard_dir, seed=2, rank=0, world_size=1),
                         batch_size=most, num_workers=2, drop_last=True))
    assert warned(recwarn) == ""


# ---- corrupt samples ----------------------------------------------------------------------------

@pytest.fixture()
def corrupt_dir(tmp_path):
    rng = np.random.default_rng(1)
    good = [(f"g{i}", {"png": png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
                       "txt": f"caption {i}".encode()}) for i in range(6)]
    write_tar(tmp_path / "00000.tar", good[:3] + [
        ("bad_image", {"png": b"\x89PNG not really", "txt": b"a caption"}),
        ("empty_caption", {"png": good[0][1]["png"], "txt": b"  \n"})])
    write_tar(tmp_path / "00001.tar", good[3:] + [
        ("no_image", {"txt": b"only text"}),
        ("empty_list", {"png": good[0][1]["png"], "json": b'{"captions": [""]}'})])
    return tmp_path


def test_corrupt_samples_are_skipped_and_counted(corrupt_dir):
    stream = ShardStream(corrupt_dir, shuffle=False)
    keys = _keys(stream)
    assert keys == [f"00000.tar:g{i}" for i in range(3)] + [f"00001.tar:g{i}" for i in range(3, 6)]
    assert stream.skipped.counts == {"unreadable_image": 1, "empty_caption": 2, "missing_image": 1}
    assert stream.skipped.keys["unreadable_image"] == ["00000.tar:bad_image"]
    assert sorted(stream.skipped.keys["empty_caption"]) == ["00000.tar:empty_caption",
                                                           "00001.tar:empty_list"]


def test_skips_inside_workers_reach_the_main_process(corrupt_dir):
    stream = ShardStream(corrupt_dir, shuffle=False)
    loader = ShardLoader(stream, batch_size=2, num_workers=2, drop_last=True)
    assert len(_keys(loader)) == 4  # each worker's third good sample is dropped with drop_last
    assert stream.skipped.total == 4 and stream.skipped.counts["empty_caption"] == 2
    pairs = load_source({"source": "shards", "path": str(corrupt_dir), "progress": False})
    assert len(pairs) == 6 and pairs.skipped.total == 4 and pairs.groups is None


def test_broken_and_truncated_shards_are_counted(tmp_path, shard_dir):
    data = (shard_dir / "00000.tar").read_bytes()
    full = [f"00000.tar:{i:09d}" for i in range(6)]
    for cut in (len(data) // 2, len(data) // 2 + 100, len(data) // 2 + 700):
        folder = tmp_path / str(cut)
        folder.mkdir()
        (folder / "00000.tar").write_bytes(data[:cut])
        (folder / "index.json").write_text((shard_dir / "index.json").read_text())
        stream = ShardStream(folder / "00000.tar", shuffle=False)
        keys = _keys(stream)
        assert keys == full[: len(keys)] and len(keys) < 6
        shard_reasons = {"unreadable_shard", "truncated_shard"} & set(stream.skipped.counts)
        assert len(shard_reasons) == 1, stream.skipped.to_dict()
        assert stream.skipped.keys[shard_reasons.pop()][0].startswith("00000.tar:")
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    stream = ShardStream([tmp_path / "junk.tar", shard_dir / "00001.tar"], shuffle=False)
    assert len(_keys(stream)) == 6 and stream.skipped.counts == {"unreadable_shard": 1}


def test_a_truncated_shard_without_an_index_is_counted(tmp_path, shard_dir):
    """Without index.json counts, a cut-off tar is told by its missing end-of-archive marker
    (tarfile reads up to the cut without an error); a whole one is not flagged."""
    data = (shard_dir / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "00001.tar").write_bytes((shard_dir / "00001.tar").read_bytes())
    stream = ShardStream(tmp_path, shuffle=False)
    keys = _keys(stream)
    assert 0 < sum(k.startswith("00000.tar:") for k in keys) < 6
    assert sum(k.startswith("00001.tar:") for k in keys) == 6
    # the sample the cut runs through has lost its image (missing_image), and the shard is told
    assert stream.skipped.counts["truncated_shard"] == 1
    assert set(stream.skipped.counts) <= {"truncated_shard", "missing_image"}
    assert stream.skipped.keys["truncated_shard"][0].startswith("00000.tar:")


# ---- CLI ----------------------------------------------------------------------------------------

def test_cli_writes_shards_from_a_source(tmp_path, capsys):
    out = tmp_path / "digits"
    code = main(["data", "shard", "--source", "digits", "--out", str(out), "data.split=test",
                 "--samples-per-shard", "200", "--format", "png", "--no-progress"])
    assert code == 0
    assert "wrote 540 samples in 3 shards" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert index["source"] == {"source": "digits", "split": "test"}
    assert [s["count"] for s in index["shards"]] == [200, 200, 140]


def test_cli_shards_an_image_folder_of_class_subfolders(tmp_path, capsys):
    rng = np.random.default_rng(3)
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "pets" / name / f"{i}.png")
    out = tmp_path / "shards"
    assert main(["data", "shard", "--source", str(tmp_path / "pets"), "--out", str(out),
                 "--format", "png", "--no-progress"]) == 0
    back = load_source({"source": "shards", "path": str(out), "progress": False})
    assert isinstance(back, LabelledImages) and back.classnames == ["cat", "dog"]
    assert back.labels.tolist() == [0, 0, 1, 1]


def test_shards_record_their_source_path_resolved(tmp_path, monkeypatch):
    """A relative `--source` (as typed, from the working folder) was recorded as typed: read
    from any other folder, index.json no longer named the images it was made from."""
    rng = np.random.default_rng(3)
    (tmp_path / "pets" / "cat").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        tmp_path / "pets" / "cat" / "0.png")
    monkeypatch.chdir(tmp_path)
    assert main(["data", "shard", "--source", "pets", "--out", "a", "--no-progress"]) == 0
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index["source"]["path"] == str(tmp_path / "pets")


def test_cli_config_manifest_by_path_and_errors(tmp_path, capsys):
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "m.csv").write_text("image,caption\n0.png,a\n1.png,\n2.png,c\n")
    config = tmp_path / "shard.yaml"
    config.write_text(f"data: {{source: manifest, path: {tmp_path / 'm.csv'}}}\n"
                      f"out: {tmp_path / 'a'}\nimage_format: png\n")
    assert main(["data", "shard", "--config", str(config), "--no-progress"]) == 0
    assert "wrote 2 samples in 1 shard " in capsys.readouterr().out
    assert main(["data", "shard", "--source", str(tmp_path / "m.csv"), "--out",
                 str(tmp_path / "b"), "--no-progress"]) == 0
    assert "skipped 1 sample: empty_caption=1" in capsys.readouterr().out
    # --data (--source is its old name) replaces the config's source and its options
    assert main(["data", "shard", "--config", str(config), "--data", "digits", "data.split=test",
                 "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert "wrote 540 samples" in capsys.readouterr().out

    assert main(["data", "shard", "--source", "nope", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cliplab: error: unknown data 'nope': not a built-in source") \
        and "\n" not in err
    assert main(["data", "shard", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "--overwrite" in err and "\n" not in err
    assert not (tmp_path / "c").exists()
    # the schema names the key path; old shapes get the new name
    for args, fragment in ((["samples_per_shard=0"], "samples_per_shard: expected greater than"),
                           (["split=test"], "unknown key split (valid: data, image_format"),
                           (["source=digits"], "renamed key 'source': use 'data.source"),
                           ([], "say where to write the shards: --out DIR")):
        out = [] if fragment.startswith("say where") else ["--out", str(tmp_path / "d")]
        assert main(["data", "shard", "--source", "digits", *out, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and "\n" not in err, err


def test_rank_and_world_size_come_from_torch_distributed(shard_dir, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    stream = ShardStream(shard_dir, seed=7)
    assert (stream.rank, stream.world_size) == (1, 2)
    explicit = ShardStream(shard_dir, seed=7, rank=1, world_size=2)
    assert _keys(stream) == _keys(explicit)


def test_data_shard_says_where_a_damaged_shard_stopped(tmp_path, capsys):
    digits = load_source({"source": "digits", "split": "test"}).subset(torch.arange(100))
    write_shards(digits, tmp_path / "whole", samples_per_shard=100, image_format="png",
                 progress=False)
    tar = tmp_path / "whole" / "00000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    assert main(["data", "shard", "--source", str(tmp_path / "whole"), "--out",
                 str(tmp_path / "again"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    index = json.loads((tmp_path / "again" / "index.json").read_text())
    kept = index["total"]
    assert 0 < kept < 100 and index["skipped"]["total"] == 100 - kept
    # the lost samples are counted (index.json gives the shard's count), the shard told apart
    assert out.strip().endswith(f"skipped {100 - kept} samples: cut_off={100 - kept}; 1 shard(s) "
                                f"read only in part (00000.tar:{kept} of 100 samples (the file "
                                "ends early))")


def test_resharding_a_truncated_shard_counts_only_lost_samples_in_the_stats(tmp_path):
    """stats.json's skipped counts lost samples, not the shard read in part as one more."""
    digits = load_source({"source": "digits", "split": "test"}).subset(torch.arange(12))
    write_shards(digits, tmp_path / "whole", samples_per_shard=6, image_format="png",
                 progress=False)
    tar = tmp_path / "whole" / "00000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    cut = load_source({"source": "shards", "path": str(tmp_path / "whole"), "progress": False})
    # the cut leaves 4 of 00000.tar's 6 samples, the fourth without its .txt (its captions
    # are in its .json); the other 2 are cut off (index.json gives the count)
    assert cut.skipped.counts == {"truncated_shard": 1, "cut_off": 2}
    index = write_shards(cut, tmp_path / "again", samples_per_shard=6, image_format="png",
                         progress=False)
    assert index["total"] == 10 and index["skipped"]["total"] == 2
    assert json.loads((tmp_path / "again" / "stats.json").read_text()) == {"count": 10,
                                                                           "skipped": 2}


def test_partner_keys_follow_the_renumbering_after_a_skipped_sample(tmp_path, shapes):
    # sample 0 has no caption and is not written: A (1) and B (2) become keys 0 and 1
    pairs = ImageTextPairs(shapes.images[:3], [[" "], ["a"], ["b"]],
                           partners=torch.tensor([-1, 2, 1]))
    write_shards(pairs, tmp_path / "s", image_format="png", progress=False)
    back = load_source({"source": "shards", "path": str(tmp_path / "s"), "progress": False})
    assert back.captions == [["a"], ["b"]] and back.partners.tolist() == [1, 0]


def test_shuffle_buffer_order_changes_with_the_epoch_within_one_shard(shard_dir):
    def order(epoch):  # one shard of 6, all in the buffer: only the buffer shuffles
        stream = ShardStream(shard_dir / "00000.tar", seed=0, shuffle_buffer=10, rank=0,
                             world_size=1)
        stream.set_epoch(epoch)
        return _keys(stream)

    a = order(0)
    assert a == order(0) and sorted(a) == sorted(order(1))
    assert a != order(1)


def test_cli_overwrite_set_in_the_config_file_replaces_the_shards(tmp_path, capsys):
    """``overwrite: true`` in the --config file holds when --overwrite is not given."""
    out = tmp_path / "shards"
    config = tmp_path / "shard.yaml"
    config.write_text(f"data: {{source: shapes, n: 8, seed: 0, image_size: 32}}\nout: {out}\n"
                      "image_format: png\noverwrite: true\n")
    assert main(["data", "shard", "--config", str(config), "--no-progress"]) == 0
    assert main(["data", "shard", "--config", str(config), "--no-progress",
                 "samples_per_shard=4"]) == 0
    assert "wrote 8 samples in 2 shards" in capsys.readouterr().out.splitlines()[-1]
    index = json.loads((out / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [4, 4]


def test_cli_quality_reaches_the_jpeg_writer(tmp_path):
    sizes = {}
    for quality in (10, 95):
        out = tmp_path / f"q{quality}"
        assert main(["data", "shard", "--source", "digits", "--out", str(out), "data.split=test",
                     f"quality={quality}", "--samples-per-shard", "200", "--no-progress"]) == 0
        with tarfile.open(out / "00000.tar") as tar:
            jpegs = [m for m in tar if m.name.endswith(".jpg")]
            sizes[quality] = sum(m.size for m in jpegs)
            assert Image.open(tar.extractfile(jpegs[0])).format == "JPEG"
    assert sizes[10] < sizes[95]


def test_sharding_a_folder_into_itself_is_refused(tmp_path):
    """By the command line's input check and by `run_shard` itself (for callers of the API)."""
    from cliplab.config import validate
    from cliplab.data.collection import source_spec
    from cliplab.data.shards.job import ShardConfig, run_shard
    from cliplab.errors import ConfigError

    pets = tmp_path / "pets" / "cat"
    pets.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(pets / "0.png")
    before = sorted(p.name for p in (tmp_path / "pets").rglob("*"))
    assert main(["data", "shard", "--source", str(tmp_path / "pets"), "--out",
                 str(tmp_path / "pets"), "--overwrite", "--no-progress"]) == 2
    config = validate(ShardConfig, {"data": source_spec(str(tmp_path / "pets")),
                                    "out": str(tmp_path / "pets"), "overwrite": True})
    with pytest.raises(ConfigError, match="is the source's own folder"):
        run_shard(config, progress=False)
    assert sorted(p.name for p in (tmp_path / "pets").rglob("*")) == before


def test_shard_patterns_naming_tars_in_the_output_folder_are_refused_as_inputs(tmp_path, shapes):
    """A brace pattern or a ``::`` list is the input as much as its folder: ``--overwrite`` once
    deleted the very shards it was reading."""
    sets = tmp_path / "sets"
    write_shards(shapes, sets, samples_per_shard=20, image_format="png", progress=False)
    before = {p.name: p.read_bytes() for p in sets.iterdir()}
    for pattern in (f"{sets}/{{00000..00002}}.tar", f"{sets}/00000.tar::{sets}/00001.tar"):
        assert main(["data", "shard", "--source", "shards", f"data.path={pattern}", "--out",
                     str(sets), "--overwrite", "--no-progress"]) == 2
    assert {p.name: p.read_bytes() for p in sets.iterdir()} == before


def test_a_shard_ending_in_a_block_that_is_no_end_marker_is_not_whole(tmp_path):
    from cliplab.data.shards.tar_members import tar_is_whole

    whole = tmp_path / "whole.tar"
    write_tar(whole, [("a", {"png": png_bytes(np.zeros((8, 8, 3), np.uint8)), "txt": b"x"})])
    with tarfile.open(whole) as tar:
        list(tar)
        end = tar.offset
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(whole.read_bytes()[:end] + b"\xff" * 1024)
    assert tar_is_whole(whole) and not tar_is_whole(damaged)


# ---- damaged shards and provenance -------------------------------------------------------------

@pytest.fixture(scope="module")
def tens(tmp_path_factory, shapes):
    """The 53 shapes scenes in 6 shards of 10 (the last of 3), lossless."""
    out = tmp_path_factory.mktemp("tens") / "tens"
    write_shards(shapes, out, samples_per_shard=10, image_format="png", progress=False)
    return out


def _cut_copy(src, dst, member: str, into: int):
    """A copy of shard folder ``src`` at ``dst`` whose ``00001.tar`` ends ``into`` bytes past
    the header start of ``member`` (512: the header whole, the data cut)."""
    import shutil

    shutil.copytree(src, dst)
    tar = dst / "00001.tar"
    with tarfile.open(tar) as archive:
        start = archive.getmember(member).offset
    tar.write_bytes(tar.read_bytes()[: start + into])
    return dst


def _metas(folder) -> list[dict]:
    """Every sample's JSON metadata of a shard folder, in order."""
    metas = []
    for name in [s["name"] for s in json.loads((folder / "index.json").read_text())["shards"]]:
        with tarfile.open(folder / name) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar
                      if m.name.endswith(".json")]
    return metas


@pytest.mark.parametrize("member, into, reason", [
    ("000000014.png", 600, "unreadable_shard"),  # inside the 5th sample's image
    ("000000014.json", 0, "truncated_shard"),  # just before the 5th sample
])
def test_a_cut_shard_keeps_every_whole_sample_and_counts_the_lost_ones(tmp_path, tens, member,
                                                                        into, reason):
    cut = _cut_copy(tens, tmp_path / "cut", member, into)
    stream = ShardStream(cut, shuffle=False, rank=0, world_size=1)
    keys = _keys(stream)
    assert [k for k in keys if k.startswith("00001.tar:")] == \
        [f"00001.tar:{i:09d}" for i in range(10, 14)]  # the 4th, 000000013, too
    assert len(keys) == 47 and stream.skipped.lost_samples == 6
    assert dict(stream.skipped.counts) == {reason: 1, "cut_off": 6}
    assert stream.skipped.keys["cut_off"] == [f"00001.tar:sample {i} of 10" for i in range(5, 11)]
    data = load_source({"source": "shards", "path": str(cut), "progress": False})
    assert len(data) == 47 and data.skipped.lost_samples == 6


def test_data_shard_counts_a_cut_shards_lost_samples_in_plain_words(tmp_path, tens, capsys):
    cut = _cut_copy(tens, tmp_path / "cut", "000000014.png", 600)
    out = tmp_path / "again"
    assert main(["data", "shard", "--source", str(cut), "--out", str(out), "--no-progress",
                 "--samples-per-shard", "10"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"wrote 47 samples in 5 shards to {out}; skipped 6 samples: cut_off=6; 1 shard(s) read "
        "only in part (00001.tar:after 4 of 10 samples (the file ends early, cut off inside a "
        "member))")
    index = json.loads((out / "index.json").read_text())
    assert index["total"] == 47 and index["skipped"]["total"] == 6
    assert index["skipped"]["shards_read_in_part"] == 1
    assert json.loads((out / "stats.json").read_text()) == {"count": 47, "skipped": 6}


def test_resharded_samples_keep_their_source_samples_key(tmp_path, tens, shapes):
    """After the lost samples of a cut shard, each sample still names its own source sample."""
    cut = _cut_copy(tens, tmp_path / "cut", "000000014.png", 600)
    write_shards(load_source({"source": "shards", "path": str(cut), "progress": False}),
                 tmp_path / "again", samples_per_shard=100, image_format="png", progress=False)
    metas = _metas(tmp_path / "again")
    source = [i for i in range(53) if not 14 <= i < 20]
    assert [m["source_key"] for m in metas] == \
        [f"{i // 10:05d}.tar:{i:09d}" for i in source]
    assert metas[14]["source_key"] == "00002.tar:000000020"
    assert metas[14]["captions"] == shapes.captions[20]
    assert metas[14]["group"] == int(shapes.groups[20])


def test_a_manifests_source_keys_name_its_rows_after_a_skipped_one(tmp_path):
    for name, colour in (("a.png", "red"), ("c.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "m.csv").write_text("image,caption\na.png,red\nb.png,broken\nc.png,blue\n")
    index = write_shards(load_source({"source": "manifest", "path": str(tmp_path / "m.csv"),
                                      "progress": False}),
                         tmp_path / "s", image_format="png", progress=False)
    assert [(m["source_key"], m["captions"]) for m in _metas(tmp_path / "s")] == \
        [("m.csv:line 2: a.png", ["red"]), ("m.csv:line 4: c.png", ["blue"])]
    assert index["skipped"]["keys"] == {"unreadable_image": ["m.csv:line 3: b.png"]}


def test_an_image_folders_source_keys_are_its_files_relative_paths(tmp_path):
    from tests.image_folders import pets_folder

    root = pets_folder(tmp_path / "imgs", per_class=2, broken_in="cat")
    write_shards(load_source({"source": "image-folder", "path": str(root), "progress": False}),
                 tmp_path / "s", image_format="png", progress=False)
    assert [m["source_key"] for m in _metas(tmp_path / "s")] == \
        ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    # a class selection keeps each image's own key
    write_shards(load_source({"source": "image-folder", "path": str(root), "classes": ["dog"],
                              "progress": False}),
                 tmp_path / "dogs", image_format="png", progress=False)
    assert [m["source_key"] for m in _metas(tmp_path / "dogs")] == ["dog/0.png", "dog/1.png"]


def test_a_subset_of_an_in_memory_set_keeps_its_samples_source_keys(tmp_path):
    digits = load_source({"source": "digits", "split": "test"})
    write_shards(digits.subset(torch.tensor([5, 2])), tmp_path / "s", image_format="png",
                 progress=False)
    assert [m["source_key"] for m in _metas(tmp_path / "s")] == [f"{digits.name}:5",
                                                                  f"{digits.name}:2"]


def test_quality_with_png_is_refused(tmp_path, capsys):
    """PNG is lossless: a quality setting would change nothing."""
    from cliplab.config import validate
    from cliplab.data.shards.job import ShardConfig
    from cliplab.errors import ConfigError

    spec = {"data": {"source": "digits", "split": "test"}, "out": str(tmp_path / "s")}
    with pytest.raises(ConfigError, match=r"^shard: quality has no effect unless image_format "
                       r"is jpg; drop it$"):
        validate(ShardConfig, {**spec, "image_format": "png", "quality": 50}, "shard")
    assert main(["data", "shard", "--source", "digits", "--out", str(tmp_path / "s"),
                 "image_format=png", "quality=50", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "quality has no effect unless image_format is jpg" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "s").exists()
    for given in ({"image_format": "png"}, {"image_format": "jpg", "quality": 50}):
        saved = validate(ShardConfig, {**spec, **given}, "shard").to_dict()
        assert validate(ShardConfig, saved, "shard").to_dict() == saved


def test_a_stopped_data_shard_run_is_never_read_as_the_whole_set(tmp_path, monkeypatch, capsys):
    """Ctrl-C half-way left closed, whole tars and no index.json: `data shard` of the folder and
    `index` read them as the complete set (6794 of 60 000 samples), exit 0. The folder is marked
    unfinished until index.json is written; readers refuse it, a re-run says to --overwrite."""
    from cliplab.data.shards import write as write_module
    from cliplab.data.shards.layout import UNFINISHED_FILE

    real_write, written = write_module.ShardSink.write, []

    def stopped(self, sample):
        if len(written) == 25:
            raise KeyboardInterrupt
        written.append(sample)
        real_write(self, sample)

    monkeypatch.setattr(write_module.ShardSink, "write", stopped)
    out = tmp_path / "shards"
    assert main(["data", "shard", "--data", "shapes", "data.n=60", "--out", str(out),
                 "--samples-per-shard", "10", "--no-progress"]) == 130
    assert (out / UNFINISHED_FILE).exists() and not (out / "index.json").exists()
    assert len(list(out.glob("*.tar"))) >= 2
    unfinished = f"{out} holds an unfinished `cliplab data shard` run"
    with pytest.raises(DataError, match=f"^{unfinished}"):
        load_source({"source": "shards", "path": str(out)})
    with pytest.raises(DataError, match=f"^{unfinished}"):
        ShardStream(str(out))
    with pytest.raises(DataError, match=f"^{unfinished}"):  # its tars named one by one
        ShardStream([str(p) for p in sorted(out.glob("*.tar"))])
    capsys.readouterr()
    for argv in (["data", "shard", "--data", str(out), "--out", str(tmp_path / "again")],
                 ["index", "--model", "tiny-clip", "--data", str(out), "--out",
                  str(tmp_path / "idx")]):
        assert main([*argv, "--no-progress"]) == 2
        assert unfinished in capsys.readouterr().err
    # the same command again: refused, saying how to start over; --overwrite finishes it
    monkeypatch.setattr(write_module.ShardSink, "write", real_write)
    again = ["data", "shard", "--data", "shapes", "data.n=60", "--out", str(out),
             "--samples-per-shard", "10", "--no-progress"]
    assert main(again) == 2
    assert capsys.readouterr().err.strip() == (
        f"cliplab: error: --out {out} holds an unfinished `cliplab data shard` run (it stopped "
        "before its end, or still runs); --overwrite starts it again")
    assert main([*again, "--overwrite"]) == 0
    assert not (out / UNFINISHED_FILE).exists()
    assert len(load_source({"source": "shards", "path": str(out)}).captions) == 60


def test_a_home_folder_in_a_path_is_the_home_folder_for_every_reader_and_data_shard(
        tmp_path, monkeypatch, shard_dir):
    """`~` in a config's paths (where no shell expands it): data shard wrote into a folder
    literally named `~` below the working folder, and a source's `path: ~/...` was "not
    found", though index and curate expanded both."""
    home, work = tmp_path / "home", tmp_path / "work"
    (home / "photos").mkdir(parents=True)
    work.mkdir()
    Image.new("RGB", (8, 8), "red").save(home / "photos" / "a.png")
    (home / "photos" / "m.csv").write_text("image,caption\na.png,a red square\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert main(["data", "shard", "--data", "~/photos/m.csv", "--out", "~/shards",
                 "--no-progress"]) == 0
    assert (home / "shards" / "index.json").is_file() and not (work / "~").exists()
    pairs = load_source({"source": "shards", "path": "~/shards", "progress": False})
    assert pairs.captions == [["a red square"]]
    manifest = load_source({"source": "manifest", "path": "~/photos/m.csv"})
    assert manifest.captions == [["a red square"]]
    monkeypatch.setenv("HOME", str(shard_dir.parent))
    assert len(ShardStream(f"~/{shard_dir.name}", shuffle=False).shards) == 9


@pytest.mark.parametrize("name", ["pp%%", "s 100% %d %s #?", "sh {a,b} {0..1}", "colon:x"])
def test_shards_land_in_the_output_folder_whatever_its_name(tmp_path, monkeypatch, capsys,
                                                           name):
    """``%`` in the folder is no part of the shard-number pattern, and a relative ``name:``
    is a folder, not a URL: the tars land in ``--out`` (a folder ``pp%`` beside ``pp%%``
    keeps its own 00000.tar), and the set reads back from that folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pp%").mkdir()
    (tmp_path / "pp%" / "00000.tar").write_bytes(b"someone else's")
    assert main(["data", "shard", "--source", "shapes", "data.n=7", "data.image_size=32",
                 "--out", name, "--samples-per-shard", "4", "--no-progress"]) == 0
    assert f"wrote 7 samples in 2 shards to {name}" in capsys.readouterr().out
    out = tmp_path / name
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert (tmp_path / "pp%" / "00000.tar").read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"pp%", name})
    assert len(_keys(ShardStream(name, shuffle=False))) == 7
    assert len(load_shards(out).captions) == 7


@pytest.mark.parametrize("folder", ["sh {a,b}", "sh {0..1}", "sh a::b"])
def test_an_existing_shard_file_is_read_as_it_is_named_not_as_a_pattern(shard_dir, tmp_path,
                                                                       folder):
    """A tar in a folder named with braces or ``::`` was expanded as a pattern: a false
    "shard not found" naming files that were never there."""
    (tmp_path / folder).mkdir()
    tar = tmp_path / folder / "00001.tar"
    tar.write_bytes((shard_dir / "00001.tar").read_bytes())
    keys = _keys(ShardStream(str(tar), shuffle=False))
    assert len(keys) == 6 and keys[0].startswith("00001.tar:")
