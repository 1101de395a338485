"""`cliplab data shard` of a source read from files (an image folder, a caption folder, a
manifest, a shard folder) streams: one image at a time, each at its own size, never the whole
set in memory, and the shards hold what writing the loaded set held (keys, captions, labels,
class names, templates, skip counts)."""

import io
import json
import tarfile
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.data.folder_files import with_folder_captions
from cliplab.data.shards import ShardStream, write_shards
from cliplab.data.shards.job import ShardConfig, run_shard
from cliplab.data.sources import load_source
from cliplab.data.types import ImageTextPairs, LabelledImages
from cliplab.provenance import without_provenance
from tests.tar_files import png_bytes, write_tar


def _save(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def _noise(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _shard(spec, out, **options):
    config = ShardConfig.model_validate({"data": spec, "out": str(out), **options})
    return run_shard(config, progress=False)


@pytest.fixture
def no_whole_load(monkeypatch):
    """Fail if `data shard` loads the source whole (`load_source`, or the loaders' stacking
    of the whole set), as it did before it streamed."""
    import cliplab.data.images as images
    import cliplab.data.shards.job as job

    def refuse(*args, **kwargs):
        raise AssertionError("data shard loaded the whole source into memory")
    monkeypatch.setattr(job, "load_source", refuse)
    monkeypatch.setattr(images, "stack_images", refuse)
    monkeypatch.setattr(images.ImageStack, "stacked", refuse)


def _reference(spec, out, **options):
    """Today's shards of ``spec``: the source loaded whole and written by `write_shards`."""
    spec = with_folder_captions(spec)
    data = load_source(spec, False, "data")
    return write_shards(data, out, source=spec, progress=False, **options)


def _tar_samples(out):
    """Every sample of the shard set at ``out``, in order: (json, txt, image array, ext)."""
    index = json.loads((out / "index.json").read_text())
    samples = []
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            parts = {}
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                parts.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(parts):
            p = parts[key]
            ext = next(e for e in p if e in ("jpg", "png"))
            image = np.array(Image.open(io.BytesIO(p[ext])))
            samples.append((json.loads(p["json"]), p["txt"].decode(), image, ext))
    return index, samples


def _assert_same_shards(out, ref):
    index, samples = _tar_samples(out)
    ref_index, ref_samples = _tar_samples(ref)
    # not when it was written: a run crossing a second's end made two sets differ
    assert without_provenance(index) == without_provenance(ref_index)
    assert len(samples) == len(ref_samples)
    for (meta, txt, image, ext), (ref_meta, ref_txt, ref_image, ref_ext) in zip(samples,
                                                                              ref_samples):
        assert (meta, txt, ext) == (ref_meta, ref_txt, ref_ext)
        assert np.array_equal(image, ref_image)


# ---- (1) each image at its own size ---------------------------------------------------------

def test_a_folder_of_two_aspect_ratios_is_sharded_at_each_images_own_size(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"cat/wide.png": (30, 50), "cat/tall.png": (48, 20), "dog/wide.png": (30, 50),
             "dog/square.png": (24, 24)}
    for name, (h, w) in sizes.items():
        _save(tmp_path / "pets" / name, _noise(rng, h, w))
    out = tmp_path / "shards"
    index = _shard({"source": "image-folder", "path": str(tmp_path / "pets")}, out,
                   image_format="png")
    assert index["total"] == 4 and index["classnames"] == ["cat", "dog"]
    stream = ShardStream(out, shuffle=False, caption="all", rank=0, world_size=1)
    back = {s["key"]: s for s in stream}
    _, samples = _tar_samples(out)
    by_source = {meta["source_key"]: image for meta, _, image, _ in samples}
    assert set(by_source) == set(sizes)
    for name, (h, w) in sizes.items():
        assert by_source[name].shape == (h, w, 3)  # png: lossless, at the file's own size
        assert np.array_equal(by_source[name], np.array(Image.open(tmp_path / "pets" / name)))
    assert sorted(tuple(s["image"].shape[:2]) for s in back.values()) == \
        sorted(sizes.values())


def test_a_manifest_and_a_caption_folder_of_mixed_sizes_keep_each_images_size(tmp_path):
    rng = np.random.default_rng(1)
    _save(tmp_path / "a.png", _noise(rng, 20, 40))
    _save(tmp_path / "b.png", _noise(rng, 40, 20))
    (tmp_path / "m.csv").write_text("image,caption\na.png,a wide one\nb.png,a tall one\n")
    out = tmp_path / "m"
    _shard({"source": "manifest", "path": str(tmp_path / "m.csv")}, out, image_format="png")
    _, samples = _tar_samples(out)
    assert [(txt, image.shape) for _, txt, image, _ in samples] == \
        [("a wide one", (20, 40, 3)), ("a tall one", (40, 20, 3))]

    folder = tmp_path / "captioned"
    _save(folder / "x.png", _noise(rng, 16, 36))
    (folder / "x.txt").write_text("a long strip\n")
    _save(folder / "y.png", _noise(rng, 36, 16))
    (folder / "y.txt").write_text("a tower\n")
    out = tmp_path / "c"
    index = _shard({"source": "image-folder", "path": str(folder)}, out)  # jpg, quality 95
    _, samples = _tar_samples(out)
    assert [(txt, image.shape, ext) for _, txt, image, ext in samples] == \
        [("a long strip", (16, 36, 3), "jpg"), ("a tower", (36, 16, 3), "jpg")]
    assert index["image_format"] == "jpg" and "classnames" not in index



def test_a_folder_of_images_without_sub_folders_is_sharded_as_index_reads_it(tmp_path):
    """A flat folder of images (no class folders, no captions) was refused by `data shard`
    ("no class sub-folders") though `index` and `curate` read it, captioned by file name."""
    from cliplab.data.collection import iter_items

    rng = np.random.default_rng(2)
    folder = tmp_path / "flat"
    _save(folder / "a_red_car.png", _noise(rng, 8, 8))
    _save(folder / "b.png", _noise(rng, 8, 8))
    spec = {"source": "image-folder", "path": str(folder)}
    _shard(spec, tmp_path / "s", image_format="png")
    _, samples = _tar_samples(tmp_path / "s")
    indexed = [item.caption for item in iter_items(spec)]
    assert [txt for _, txt, _, _ in samples] == indexed == ["a red car", "b"]
    assert with_folder_captions({**spec, "captions": False}) == {**spec, "captions": False}

# ---- (2) the set is never whole in memory ---------------------------------------------------

def test_sharding_a_folder_does_not_materialise_the_set(tmp_path):
    rng = np.random.default_rng(2)
    tile = _noise(rng, 256, 256)
    n = 200
    for i in range(n):
        _save(tmp_path / "pets" / ("cat" if i % 2 else "dog") / f"{i:03d}.png",
              np.roll(tile, i, axis=1))
    decoded = 256 * 256 * 3
    tracemalloc.start()
    try:
        index = _shard({"source": "image-folder", "path": str(tmp_path / "pets")},
                       tmp_path / "shards", samples_per_shard=50)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert index["total"] == n and len(index["shards"]) == 4
    assert peak < n * decoded / 5, f"peak {peak / 1e6:.1f} MB for {n * decoded / 1e6:.1f} MB of images"


def test_no_file_source_is_loaded_whole(tmp_path, no_whole_load):
    rng = np.random.default_rng(3)
    for i in range(3):
        _save(tmp_path / "pets" / "cat" / f"{i}.png", _noise(rng, 8, 8))
    _save(tmp_path / "m0.png", _noise(rng, 8, 12))
    (tmp_path / "m.jsonl").write_text('{"image": "m0.png", "caption": "one"}\n')
    assert _shard({"source": "image-folder", "path": str(tmp_path / "pets")},
                  tmp_path / "a")["total"] == 3
    assert _shard({"source": "manifest", "path": str(tmp_path / "m.jsonl")}, tmp_path / "b")["total"] == 1
    assert _shard({"source": "shards", "path": str(tmp_path / "a")}, tmp_path / "c")["total"] == 3


# ---- (3) what the shards hold is what they held ---------------------------------------------

def test_a_same_size_class_folder_gives_todays_samples_labels_and_classes(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    root = tmp_path / "pets"
    for name in ("golden_retriever", "tabby_cat", "empty_class"):
        (root / name).mkdir(parents=True)
    for i in range(5):
        _save(root / ("golden_retriever" if i % 2 else "tabby_cat") / f"{i}.jpg",
              _noise(rng, 24, 32))
    (root / "templates.txt").write_text("a photo of a {}.\nart of the {}.\n")
    (root / "notes.md").write_text("not data")
    _save(root / "loose.png", _noise(rng, 24, 32))  # outside any class folder
    spec = {"source": "image-folder", "path": str(root)}
    _reference(spec, tmp_path / "ref", image_format="jpg", quality=90)
    _stream_only(monkeypatch)
    index = _shard(spec, tmp_path / "new", image_format="jpg", quality=90)
    _assert_same_shards(tmp_path / "new", tmp_path / "ref")
    assert index["classnames"] == ["empty class", "golden retriever", "tabby cat"]
    assert index["templates"] == ["a photo of a {}.", "art of the {}."]
    back = load_source({"source": "shards", "path": str(tmp_path / "new"), "progress": False})
    ref = load_source({"source": "shards", "path": str(tmp_path / "ref"), "progress": False})
    assert isinstance(back, LabelledImages) and back.classnames == ref.classnames
    assert back.labels.tolist() == ref.labels.tolist() and back.keys == ref.keys
    assert torch.equal(back.images, ref.images)


def test_class_options_and_a_reshard_with_partners_give_todays_shards(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    root = tmp_path / "pets"
    for i in range(6):
        _save(root / ("cat", "dog", "fox")[i % 3] / f"{i}.png", _noise(rng, 8, 8))
    spec = {"source": "image-folder", "path": str(root), "classes": ["fox", "cat"],
            "templates": ["a {}"]}
    held = {"source": "image-folder", "path": str(root), "holdout": ["dog"]}
    images = torch.from_numpy(np.stack([_noise(rng, 8, 8) for _ in range(4)]))
    pairs = ImageTextPairs(images, [[" "], ["a", "b"], ["c"], ["d"]],
                           groups=torch.tensor([0, 0, 1, 1]),
                           partners=torch.tensor([-1, 2, 1, -1]))
    write_shards(pairs, tmp_path / "src", image_format="png", progress=False)
    shards = {"source": "shards", "path": str(tmp_path / "src")}
    for name, s in (("classes", spec), ("holdout", held), ("reshard", shards)):
        _reference(s, tmp_path / f"ref-{name}", image_format="png")
    _stream_only(monkeypatch)
    for name, s in (("classes", spec), ("holdout", held), ("reshard", shards)):
        _shard(s, tmp_path / f"new-{name}", image_format="png")
        _assert_same_shards(tmp_path / f"new-{name}", tmp_path / f"ref-{name}")
    _, samples = _tar_samples(tmp_path / "new-reshard")
    assert [m.get("partner_key") for m, *_ in samples] == ["000000001", "000000000", None]


def _stream_only(monkeypatch):
    import cliplab.data.shards.job as job

    def refuse(*args, **kwargs):
        raise AssertionError("data shard loaded the whole source into memory")
    monkeypatch.setattr(job, "load_source", refuse)


# ---- (4) skips are counted as before --------------------------------------------------------

def test_a_corrupt_image_and_a_missing_manifest_file_are_skipped_and_counted(tmp_path,
                                                                             monkeypatch):
    rng = np.random.default_rng(6)
    for i in range(3):
        _save(tmp_path / "img" / f"{i}.png", _noise(rng, 10, 10))
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "m.csv").write_text("image,caption\nimg/0.png,zero\nimg/bad.png,broken\n"
                                    "img/gone.png,missing\nimg/1.png,\nimg/2.png,two\n")
    root = tmp_path / "pets"
    for i in range(2):
        _save(root / "cat" / f"{i}.png", _noise(rng, 10, 10))
    (root / "cat" / "bad.png").write_bytes(b"broken")
    specs = {"manifest": {"source": "manifest", "path": str(tmp_path / "m.csv")},
             "folder": {"source": "image-folder", "path": str(root)}}
    for name, spec in specs.items():
        _reference(spec, tmp_path / f"ref-{name}")
    _stream_only(monkeypatch)
    for name, spec in specs.items():
        _shard(spec, tmp_path / f"new-{name}")
        _assert_same_shards(tmp_path / f"new-{name}", tmp_path / f"ref-{name}")
    index = json.loads((tmp_path / "new-manifest" / "index.json").read_text())
    assert index["skipped"]["counts"] == {"unreadable_image": 1, "missing_file": 1,
                                          "empty_caption": 1}
    assert index["skipped"]["keys"]["missing_file"] == ["m.csv:line 4: img/gone.png"]
    assert index["total"] == 2
    folder = json.loads((tmp_path / "new-folder" / "index.json").read_text())
    assert folder["skipped"]["keys"] == {"unreadable_image": [str(root / "cat" / "bad.png")]}


# ---- (5) a shard folder is re-sharded decoding each image once ------------------------------

def _partner_shards(folder, bad=()):
    """Two hand-written shards of 8 samples with caption groups (some none), partners (one a
    later sample's, one naming no sample); the samples at ``bad`` hold no image."""
    rng = np.random.default_rng(7)
    spec = [(0, "k1"), (0, "k0"), (None, None), (1, "k6"), (None, "gone"), (2, None),
            (1, "k3"), (None, None)]
    samples = []
    for i, (group, partner) in enumerate(spec):
        meta = {"captions": [f"caption {i}", " "], "group": group, "partner_key": partner}
        image = b"not an image" if i in bad else png_bytes(_noise(rng, 6, 6))
        samples.append((f"k{i}", {"png": image, "json": json.dumps(meta).encode()}))
    folder.mkdir(parents=True)
    write_tar(folder / "00000.tar", samples[:5])
    write_tar(folder / "00001.tar", samples[5:])
    return {"source": "shards", "path": str(folder)}


def _count_decodes(monkeypatch) -> list:
    """The names of the images decoded from now on (`open_image`'s calls), one per decode."""
    import cliplab.data.images as images

    calls, real = [], images.open_image

    def counted(source, name=None):
        calls.append(name)
        return real(source, name)
    monkeypatch.setattr(images, "open_image", counted)
    return calls


def _assert_same_files(out, ref):
    """Byte for byte the set written at ``ref`` (its index but for when and by which version
    it was written)."""
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in ref.iterdir())
    for name in names:
        if name == "index.json":
            assert without_provenance(json.loads((out / name).read_text(encoding="utf-8"))) == \
                without_provenance(json.loads((ref / name).read_text(encoding="utf-8")))
        else:
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_a_shard_folder_is_resharded_decoding_each_image_once(tmp_path, monkeypatch):
    """A first pass decoded every image only to learn the set's groups and partners, and the
    pass writing them decoded each again."""
    spec = _partner_shards(tmp_path / "src")
    decodes = _count_decodes(monkeypatch)
    with pytest.warns(UserWarning, match="1 of 5 partner_key"):
        _shard(spec, tmp_path / "new", image_format="png", samples_per_shard=3)
    assert sorted(decodes) == [f"{shard}:k{i}" for i, shard in  # each image once
                               enumerate(["00000.tar"] * 5 + ["00001.tar"] * 3)]
    _reference(spec, tmp_path / "ref", image_format="png", samples_per_shard=3)
    _assert_same_files(tmp_path / "new", tmp_path / "ref")


def test_an_unreadable_image_is_skipped_with_one_decode_where_it_changes_nothing(
        tmp_path, monkeypatch):
    root = tmp_path / "foreign"
    root.mkdir()
    rng = np.random.default_rng(8)
    write_tar(root / "00000.tar", [(f"s{i}", {"png": b"broken" if i == 3 else
                                              png_bytes(_noise(rng, 5, 5)),
                                              "txt": f"photo {i}".encode()})
                                   for i in range(6)])
    spec = {"source": "shards", "path": str(root)}
    _reference(spec, tmp_path / "ref")
    decodes = _count_decodes(monkeypatch)
    _shard(spec, tmp_path / "new")
    assert len(decodes) == 6
    _assert_same_files(tmp_path / "new", tmp_path / "ref")
    index = json.loads((tmp_path / "new" / "index.json").read_text(encoding="utf-8"))
    assert index["skipped"]["keys"] == {"unreadable_image": ["00000.tar:s3"]}


def test_unreadable_images_that_change_the_set_give_the_shards_they_gave(tmp_path):
    """Without its unreadable images a set is another (partners renumbered, new group ids, a
    classification set): the samples are read again without them, over a set written before."""
    spec = _partner_shards(tmp_path / "src", bad=(2, 5))
    _reference(spec, tmp_path / "ref", image_format="png")
    _shard(_partner_shards(tmp_path / "good"), tmp_path / "new", image_format="png")
    with pytest.warns(UserWarning, match="1 of 5 partner_key"):
        _shard(spec, tmp_path / "new", image_format="png", overwrite=True)
    _assert_same_files(tmp_path / "new", tmp_path / "ref")
    _, samples = _tar_samples(tmp_path / "new")
    assert [(m["source_key"], m["group"], m.get("partner_key")) for m, *_ in samples] == [
        ("00000.tar:k0", 0, "000000001"), ("00000.tar:k1", 0, "000000000"),
        ("00000.tar:k3", 1, "000000004"), ("00000.tar:k4", 2, None),
        ("00001.tar:k6", 1, "000000002"), ("00001.tar:k7", 3, None)]

    # a class set whose one sample of no class has an unreadable image: classes without it
    images = torch.from_numpy(np.stack([_noise(np.random.default_rng(9), 6, 6)] * 6))
    pets = LabelledImages(images, torch.tensor([0, 1, 2, 0, 1, 2]), ["cat", "dog", "fox"],
                          ["a {}"], "pets")
    write_shards(pets, tmp_path / "pets", image_format="png", progress=False)
    shard = tmp_path / "pets" / "00000.tar"
    with tarfile.open(shard) as tar:
        parts = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    parts = [(name, b"junk" if name == "000000004.png" else
              data.replace(b'"group": 1', b'"group": 7') if name == "000000004.json" else data)
             for name, data in parts]
    with tarfile.open(shard, "w") as tar:
        for name, data in parts:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    held = {"source": "shards", "path": str(tmp_path / "pets"), "holdout": ["dog"]}
    _reference(held, tmp_path / "ref-pets", image_format="png")
    _shard(held, tmp_path / "new-pets", image_format="png")
    _assert_same_files(tmp_path / "new-pets", tmp_path / "ref-pets")
    pets = (tmp_path / "new-pets" / "index.json").read_text(encoding="utf-8")
    assert json.loads(pets)["total"] == 4
