"""Built-in sources and the pair/hold-out helpers."""

import gzip
import json
import re
import struct

import numpy as np
import pytest
import torch

from cliplab.cli import main
from cliplab.data.digits import load_digits
from cliplab.data.fashion_mnist import load_fashion_mnist, read_idx
from cliplab.data.pairs import labelled_to_pairs, split_classes
from cliplab.data.sources import as_pairs, load_source
from cliplab.data.types import ImageTextPairs, LabelledImages
from cliplab.errors import ConfigError, DataError


def write_idx(path, array: np.ndarray, gz=True):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.fixture()
def fmnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_a_fashion_mnist_folder_given_from_home_is_found(fmnist_dir, monkeypatch):
    """`~/fm` as the quickstart's data.data_dir (or --data-dir=~/fm, which no shell expands)
    was "folder ~/fm does not exist"; every other path key reads `~` as home."""
    from cliplab.cli import build_parser, parse_command_line

    monkeypatch.setenv("HOME", str(fmnist_dir.parent))
    assert len(load_fashion_mnist("test", f"~/{fmnist_dir.name}")) == 10
    args = parse_command_line(build_parser(), ["quickstart", f"--data-dir=~/{fmnist_dir.name}"])
    assert args.data_dir == str(fmnist_dir)


def test_fashion_mnist_reads_idx_files_exactly(fmnist_dir):
    data = load_fashion_mnist("train", fmnist_dir)
    raw = read_idx(fmnist_dir / "train-images-idx3-ubyte.gz")
    assert data.images.shape == (30, 28, 28, 1) and data.images.dtype == torch.uint8
    assert np.array_equal(data.images[..., 0].numpy(), raw)
    assert data.labels.tolist() == [i % 10 for i in range(30)]
    assert data.classnames[6] == "shirt" and "{}" in data.templates[0]
    assert len(load_fashion_mnist("test", fmnist_dir, limit=4)) == 4
    tail = load_fashion_mnist("train", fmnist_dir, offset=2, limit=3)
    assert torch.equal(tail.images, data.images[2:5]) and torch.equal(tail.labels, data.labels[2:5])
    with pytest.raises(DataError, match="offset 99 is outside"):
        load_fashion_mnist("train", fmnist_dir, offset=99)


def test_fashion_mnist_uncompressed_files_work_too(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28)), gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2]), gz=False)
    assert load_fashion_mnist("test", tmp_path).labels.tolist() == [1, 2]


def test_missing_fashion_mnist_names_folder_and_package(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}.*dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_fashion_mnist("train", tmp_path / "nope")


def test_fashion_mnist_folder_from_the_environment(tmp_path, monkeypatch):
    """Off Debian (macOS, Windows) the IDX files live anywhere: CLIPLAB_FASHION_MNIST names
    them for every Fashion-MNIST source at once."""
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 0, 9]))
    monkeypatch.setenv("CLIPLAB_FASHION_MNIST", str(tmp_path))
    assert load_fashion_mnist("test").labels.tolist() == [4, 0, 9]
    monkeypatch.setenv("CLIPLAB_FASHION_MNIST", str(tmp_path / "nope"))
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist; .*"
                                        "CLIPLAB_FASHION_MNIST"):
        load_fashion_mnist("test")


def test_corrupt_idx_is_a_clear_error(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((3, 4, 4)), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


def test_a_truncated_or_corrupt_gzip_idx_file_is_one_line_naming_it(fmnist_dir):
    """A cut-off .gz crashed with EOFError ("Compressed file ended before ...")."""
    images = fmnist_dir / "t10k-images-idx3-ubyte.gz"
    whole = images.read_bytes()
    images.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError) as cut:
        load_fashion_mnist("test", fmnist_dir)
    assert str(cut.value) == (
        f"cannot read IDX file {images}: truncated or corrupt gzip data (EOFError: Compressed "
        "file ended before the end-of-stream marker was reached)")
    bad_crc = bytearray(whole)
    bad_crc[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
    images.write_bytes(bytes(bad_crc))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: truncated or corrupt gzip "
                       r"data \(BadGzipFile: CRC check failed"):
        read_idx(images)
    damaged = bytearray(whole)
    damaged[12:40] = bytes(28)  # inside the deflate stream
    images.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"truncated or corrupt gzip data \((error|BadGzipFile|"
                       r"EOFError)"):
        read_idx(images)
    (fmnist_dir / "short").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match="short is truncated: its header of 3 sizes is cut off"):
        read_idx(fmnist_dir / "short")


def test_cli_shard_of_a_truncated_fashion_mnist_gz_is_one_line(fmnist_dir, tmp_path_factory,
                                                               capsys):
    images = fmnist_dir / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])
    assert main(["data", "shard", "--data", "fashion-mnist", "data.split=test",
                 "data.limit=5", f"data.data_dir={fmnist_dir}", "--no-progress",
                 "--out", str(tmp_path_factory.mktemp("out") / "fm")]) == 2
    assert capsys.readouterr().err == (
        f"cliplab: error: data: cannot read IDX file {images}: truncated or corrupt gzip data "
        "(EOFError: Compressed file ended before the end-of-stream marker was reached)\n")


def test_digits_split_is_stratified_and_disjoint():
    train, test = load_digits("train"), load_digits("test")
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (8, 8, 1) and train.images.max() == 255
    assert set(test.labels.tolist()) == set(range(10))


def test_load_digits_called_with_an_unknown_split_is_a_data_error():
    """A Python call's bad split is a DataError naming the splits (was a KeyError)."""
    with pytest.raises(DataError) as err:
        load_digits(split="val")
    assert str(err.value) == "digits split must be 'all', 'train' or 'test', not 'val'"


def test_digits_upsampled_as_a_source_option():
    small, big = load_digits("test"), load_source({"source": "digits", "split": "test",
                                                   "image_size": 28})
    assert big.images.shape == (len(small), 28, 28, 1) and big.images.dtype == torch.uint8
    assert torch.equal(big.labels, small.labels)
    # bilinear upsampling keeps each image's overall brightness (mean within 3 grey levels)
    assert (big.images.float().mean((1, 2, 3)) - small.images.float().mean((1, 2, 3))).abs() \
        .max() < 3


def test_holdout_and_pairs(fmnist_dir):
    data = load_fashion_mnist("train", fmnist_dir)
    seen, held = split_classes(data, ["Shirt", "Sneaker", "Bag"])
    assert not set(seen.labels.tolist()) & {6, 7, 8}
    assert set(held.labels.tolist()) == {6, 7, 8}
    pairs = labelled_to_pairs(seen)
    assert len(pairs) == len(seen) and torch.equal(pairs.groups, seen.labels)
    first = int(seen.labels[0])
    assert pairs.captions[0] == [t.format(seen.descriptions[first]) for t in seen.templates]
    assert seen.classnames[first] in pairs.captions[0][0]
    with pytest.raises(DataError, match="unknown class 'Hat'"):
        split_classes(data, ["Hat"])


def test_load_source_by_spec(fmnist_dir):
    data = load_source({"source": "fashion-mnist", "data_dir": str(fmnist_dir),
                        "holdout": ["bag"]})
    assert 8 not in data.labels.tolist()
    pairs = as_pairs(load_source({"source": "shapes", "n": 6, "image_size": 32}))
    assert len(pairs) == 6
    with pytest.raises(ConfigError, match="unknown data source 'imagenet'"):
        load_source({"source": "imagenet"})
    with pytest.raises(ConfigError, match="unknown option"):
        load_source({"source": "digits", "splt": "train"})
    # shapes' options are named like any source's (not a TypeError of an inner function)
    with pytest.raises(ConfigError, match=r"^unknown option 'nn' for shapes \(valid: .*\bn\b.*; "
                                          r"for any source: .*\bshift\b"):
        load_source({"source": "shapes", "nn": 3})
    assert load_source({"source": "shapes", "attribute": "color", "n": 5}).classnames


@pytest.mark.parametrize("spec, message", [
    # each was a traceback (KeyError, sklearn's or torch's error) or, for limit -1, 59 999
    # images taken without a word
    ({"source": "digits", "split": "bad"}, "split: expected 'all', 'train' or 'test', got 'bad'"),
    ({"source": "digits", "split": "train", "test_fraction": 0},
     "test_fraction: expected greater than 0, got 0"),
    ({"source": "digits", "image_size": 0}, "image_size: expected greater than 0, got 0"),
    ({"source": "fashion-mnist", "limit": -1},
     "limit: expected greater than or equal to 0, got -1"),
    ({"source": "shapes", "n": 4, "seed": -1}, "seed: expected greater than or equal to 0, got -1"),
    ({"source": "shapes", "attribute": "size"},
     "attribute: expected 'shape' or 'color', got 'size'"),
    ({"source": "image-folder", "path": ".", "image_size": -2},
     "image_size: expected greater than 0, got -2"),
])
def test_a_bad_option_value_is_named_before_loading(spec, message):
    with pytest.raises(ConfigError) as err:
        load_source(spec, progress=False, where="data.test")
    assert str(err.value) == f"data.test.{message}"


def test_a_missing_required_option_is_named_not_a_type_error():
    with pytest.raises(ConfigError) as err:
        load_source({"source": "manifest"}, where="data.train")
    assert str(err.value) == ("data.train: manifest needs the option path (e.g. {source: "
                              "manifest, path: ...})")
    with pytest.raises(ConfigError, match=r"^clip-benchmark needs the option root \(e\.g\. "):
        load_source({"source": "clip-benchmark", "root": None})


def test_official_and_prompt_class_names_both_work():
    from cliplab.data.fashion_mnist import canonical_name

    assert canonical_name("T-shirt/top") == "t-shirt"
    assert canonical_name("Ankle boot") == "ankle boot" == canonical_name("ankle boot")
    assert canonical_name("Hat") == "Hat"


def toy_source(n: int = 4) -> LabelledImages:
    """A source defined outside cliplab, registered by one line in the test below."""
    images = torch.arange(n * 2 * 2, dtype=torch.uint8).reshape(n, 2, 2, 1)
    return LabelledImages(images, torch.arange(n) % 2, ["even", "odd"], ["a {} number."],
                          name="toy")


def test_a_new_source_is_one_registry_line(monkeypatch):
    from cliplab.data import sources
    from cliplab.data.collection import source_spec

    monkeypatch.setitem(sources.SOURCES, "toy", "tests.test_data_sources:toy_source")
    data = load_source({"source": "toy", "n": 6, "holdout": ["odd"], "shift": "invert"})
    assert data.labels.tolist() == [0, 0, 0] and data.name == "toy-invert"
    assert data.images[:, 0, 0, 0].tolist() == [255, 247, 239]  # 255 - [0, 8, 16]
    with pytest.raises(ConfigError,
                       match=r"^unknown option 'm' for toy \(valid: n; for any source: "):
        load_source({"source": "toy", "m": 1})
    assert source_spec("toy") == {"source": "toy"}


def test_a_folder_named_like_a_path_source_is_that_folder(tmp_path, monkeypatch):
    """`--data shards` for a folder called shards: the bare name of a source that needs a path
    names no data, so the folder wins; a source complete by name stays the built-in one."""
    from cliplab.data.collection import source_spec

    monkeypatch.chdir(tmp_path)
    assert source_spec("shards") == {"source": "shards"}  # no such folder: the source
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"")
    assert source_spec("shards") == {"source": "shards", "path": "shards"}
    (tmp_path / "digits").mkdir()
    assert source_spec("digits") == {"source": "digits"}


def test_a_folder_of_photos_beside_a_stray_archive_is_refused_naming_both_spellings(tmp_path):
    """Any `.tar` made a folder a shard folder: a photo folder with one archive in it was
    indexed as that archive's members, its photos silently unread. Shards and images (or
    sub-folders) together are refused, naming how to say which; shards alone stay shards."""
    from cliplab.data.collection import source_spec

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"")
    (tmp_path / "shards" / "00000_stats.json").write_text("{}")
    assert source_spec(str(tmp_path / "shards"))["source"] == "shards"
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.JPG").write_bytes(b"")
    (photos / "old.tar").write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{photos} holds .tar shards \(old.tar\) and images "
                                        rf"\(a.JPG\): say which it is, --data image-folder "
                                        rf"data.path={photos} or --data shards"):
        source_spec(str(photos))
    (photos / "a.JPG").unlink()
    (photos / "2024").mkdir()  # a folder beside shards is no matter (logs, __MACOSX) ...
    (photos / "2024" / ".hidden.jpg").write_bytes(b"")
    assert source_spec(str(photos))["source"] == "shards"
    (photos / "2024" / "b.png").write_bytes(b"")  # ... unless it holds images
    with pytest.raises(DataError, match=r"and images \(2024/\)"):
        source_spec(str(photos))


def test_a_home_folder_in_a_data_value_is_the_home_folder(tmp_path, monkeypatch):
    """`data: ~/photos` (a config's string, or `--data=~/photos`, which no shell expands) was
    "unknown data", though the folder exists and the mapping form read it."""
    from cliplab.data.collection import source_spec

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "photos").mkdir()
    (tmp_path / "m.csv").write_text("image,caption\n")
    assert source_spec("~/photos") == {"source": "image-folder", "path": str(tmp_path / "photos")}
    assert source_spec("~/m.csv") == {"source": "manifest", "path": str(tmp_path / "m.csv")}
    with pytest.raises(DataError, match="^~/nope does not exist"):
        source_spec("~/nope")

def test_classes_keeps_those_classes_relabelled_in_the_given_order(fmnist_dir):
    full = load_fashion_mnist("train", fmnist_dir)
    novel = load_source({"source": "fashion-mnist", "data_dir": str(fmnist_dir),
                         "classes": ["bag", "Shirt"]})
    assert novel.classnames == [full.classnames[8], full.classnames[6]]
    assert novel.descriptions == [full.descriptions[8], full.descriptions[6]]
    # the 30 toy images have labels 0..9 three times: bag (8) -> 0, shirt (6) -> 1
    assert novel.labels.tolist() == [1, 0, 1, 0, 1, 0]
    assert torch.equal(novel.images[1], full.images[8])
    with pytest.raises(DataError, match="unknown class 'hat'"):
        load_source({"source": "fashion-mnist", "data_dir": str(fmnist_dir), "classes": ["hat"]})
    with pytest.raises(DataError, match="twice"):
        load_source({"source": "fashion-mnist", "data_dir": str(fmnist_dir),
                     "classes": ["bag", "Bag"]})
    with pytest.raises(ConfigError, match="classes needs single-label images; 'shapes' gives "
                       "image-text pairs"):
        load_source({"source": "shapes", "n": 2, "classes": ["x"]})
    # [] kept every class, and one name was read letter by letter
    with pytest.raises(ConfigError, match=r"classes: \[\] keeps no class"):
        load_source({"source": "fashion-mnist", "data_dir": str(fmnist_dir), "classes": []})
    bag = load_source({"source": "fashion-mnist", "data_dir": str(fmnist_dir), "classes": "Bag"})
    assert bag.classnames == [full.classnames[8]] and len(bag) == 3


def test_holdout_takes_one_name_and_numbers_as_classes_does():
    """`holdout: three` was split into its letters (unknown class 't'), `holdout: [3]` a
    traceback ('int' object has no attribute 'lower'); `classes` already read both."""
    assert len(load_source({"source": "digits", "split": "test", "holdout": "three"})) == \
        len(load_source({"source": "digits", "split": "test", "holdout": ["three"]}))
    for holdout in ([3], 3):
        with pytest.raises(DataError, match=r"^data.test: unknown class '3'; classes are: zero"):
            load_source({"source": "digits", "split": "test", "holdout": holdout},
                        where="data.test")
    for bad in ({"a": 1}, True, [["zero"]]):
        for key in ("holdout", "classes"):
            with pytest.raises(ConfigError, match=rf"^{key}: expected a class name or a list of "
                               r"class names \(source 'digits'\), got "):
                load_source({"source": "digits", "split": "test", key: bad})


def test_templates_replace_a_classification_sources_prompts():
    spec = {"source": "shapes", "attribute": "color", "n": 4, "image_size": 32}
    own = load_source(spec)
    given = load_source({**spec, "templates": ["a {} circle", "a {c} square"]})
    assert given.templates == ["a {} circle", "a {} square"] != own.templates
    assert torch.equal(given.images, own.images) and given.classnames == own.classnames
    with pytest.raises(ConfigError, match="one '{}' where the class goes; not 'a circle'"):
        load_source({**spec, "templates": ["a {} circle", "a circle"]})
    with pytest.raises(ConfigError, match="must be a non-empty list"):
        load_source({**spec, "templates": "a {} circle"})
    with pytest.raises(ConfigError, match="templates needs a classification source"):
        load_source({"source": "shapes", "n": 2, "image_size": 32, "templates": ["a {}"]})


def test_selecting_classes_keeps_what_loading_skipped(tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), "red").save(tmp_path / name / "ok.png")
    (tmp_path / "dog" / "bad.png").write_bytes(b"not a png")
    spec = {"source": "image-folder", "path": str(tmp_path), "progress": False}
    for extra in ({"classes": ["cat"]}, {"holdout": ["dog"]}):
        data = load_source({**spec, **extra})
        assert len(data) == 1 and data.skipped.total == 1
        assert data.skipped.keys == {"unreadable_image": [str(tmp_path / "dog" / "bad.png")]}


def test_index_and_curate_read_the_same_image_member_as_training(tmp_path):
    """A shard sample with two image members, one whose only image is a GIF (an image in a
    folder, so one in a curated shard too) and one with no image: the collection reader
    (index, curate) takes the member the shard stream (training, eval) takes, and no image
    where the stream finds none."""
    import io

    from PIL import Image

    from cliplab.data.collection import iter_items
    from cliplab.data.collection import skip_reason
    from cliplab.data.shards.read import load_shards
    from tests.tar_files import png_bytes, write_tar

    red, blue = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    jpg, gif = io.BytesIO(), io.BytesIO()
    Image.fromarray(blue).save(jpg, format="JPEG", quality=100)
    Image.fromarray(red).save(gif, format="GIF")
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "s-000000.tar", [
        ("a", {"png": png_bytes(red), "jpg": jpg.getvalue(), "txt": b"two images"}),
        ("b", {"gif": gif.getvalue(), "txt": b"a gif"}),
        ("c", {"pdf": b"%PDF-1.4", "txt": b"a document"}),
    ])
    stream = load_shards(folder, progress=False)
    assert stream.captions == [["two images"], ["a gif"]] and stream.skipped.total == 1
    items = {item.key: item for item in iter_items({"source": "shards", "path": str(folder)},
                                                   progress=False)}
    pixels = np.asarray(items["s-000000.tar:a"].read())
    assert np.abs(pixels.astype(int) - stream.images[0].numpy()).max() <= 8  # the JPEG, blue
    assert np.array_equal(np.asarray(items["s-000000.tar:b"].read()), stream.images[1].numpy())
    assert np.asarray(items["s-000000.tar:b"].read())[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(OSError, match="no image member") as err:
        items["s-000000.tar:c"].read()
    # counted as the loader counts it (index said unreadable_image, data shard missing_image)
    assert skip_reason(err.value) == "missing_image" and stream.skipped.counts == {
        "missing_image": 1}


def test_an_image_without_a_caption_or_a_set_without_templates_is_refused():
    """Each would train quietly on something else: `CaptionTable` drew a caption-less image's
    positive from its neighbour's captions (past the last image: IndexError), and labelled
    images without templates became pairs of no caption at all."""
    from cliplab.data.pairs import labelled_to_pairs
    from cliplab.train.captions import CaptionTable

    images = torch.zeros((3, 4, 4, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="^image 1 has no caption: every image needs one or "
                                         "more$"):
        ImageTextPairs(images, [["a red circle"], [], ["a blue square"]])
    with pytest.raises(ValueError, match=r"^no templates: give one prompt at least"):
        LabelledImages(images, torch.tensor([0, 1, 1]), ["a", "b"], [])
    pairs = labelled_to_pairs(LabelledImages(images, torch.tensor([0, 1, 1]), ["a", "b"],
                                             ["{}", "a {}"]))
    table = CaptionTable(pairs)
    drawn = table.sample(torch.arange(3), torch.Generator().manual_seed(0))
    own = [{"a", "a a"}, {"b", "a b"}, {"b", "a b"}]  # each image's class's prompts
    assert all(table.texts[int(t)] in own[i] for i, t in enumerate(drawn))


def test_labels_outside_the_classes_are_refused():
    images = torch.zeros((3, 4, 4, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="label 3 is no class index: 3 classes, so labels "
                                         "run 0 to 2"):
        LabelledImages(images, torch.tensor([0, 3, 1]), ["a", "b", "c"], ["{}"])
    with pytest.raises(ValueError, match="label -1 is no class index"):
        LabelledImages(images, torch.tensor([0, -1, 1]), ["a", "b", "c"], ["{}"])
    assert len(LabelledImages(images, torch.tensor([0, 2, 1]), ["a", "b", "c"], ["{}"])) == 3


def test_a_damaged_shards_last_sample_is_kept_or_lost_as_the_stream_reader_does(tmp_path):
    """A tar cut after its last sample's image and captions (only a later member lost) keeps
    that sample in the collection reader (index, curate) as in the stream reader (training,
    eval); cut inside one of its members, both lose it (the collection reader dropped the
    last sample of every damaged tar)."""
    import tarfile

    from cliplab.data.collection import iter_items
    from cliplab.data.shards.read import load_shards
    from tests.tar_files import png_bytes, write_tar

    rng = np.random.default_rng(0)
    for name, kept in (("header of k2.txt", 3), ("data of k2.json", 2)):
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        tar = folder / "s-000000.tar"
        write_tar(tar, [(f"k{i}", {"png": png_bytes(rng.integers(0, 256, (8, 8, 3), np.uint8)),
                                   "json": json.dumps({"captions": [f"caption {i}"]}).encode(),
                                   "txt": f"caption {i}".encode()}) for i in range(3)])
        with tarfile.open(tar) as archive:
            member = archive.getmember(name.split()[-1])
            cut = member.offset + 100 if name.startswith("header") else member.offset_data + 5
        tar.write_bytes(tar.read_bytes()[:cut])
        stream = load_shards(folder, progress=False)
        keys = [item.key for item in iter_items({"source": "shards", "path": str(folder)},
                                                progress=False) if ":" in item.key]
        assert len(stream) == kept and keys == [f"s-000000.tar:k{i}" for i in range(kept)]
        # with a bar too (its total counted the tar's members and stopped on the cut: the
        # whole load failed where the reader keeps what it can)
        assert len(load_shards(folder, progress=True)) == kept


def test_a_repeated_key_in_a_tar_is_skipped_and_counted_not_merged(tmp_path):
    """Keys a, b, a, c, c: the later a and c are skipped as duplicate_key (they had replaced
    the first ones' parts, two samples lost without a count); parts of one sample stored apart
    (a tar of a folder, in listing order) are still one sample."""
    from cliplab.data.collection import iter_items, skip_reason
    from tests.tar_files import png_bytes, write_tar

    folder = tmp_path / "shards"
    folder.mkdir()
    samples = [(key, {"png": png_bytes(np.full((4, 4, 3), value, np.uint8)),
                      "txt": f"{key} {value}".encode()})
               for key, value in (("a", 10), ("b", 20), ("a", 30), ("c", 40), ("c", 50))]
    write_tar(folder / "s.tar", samples)
    items = list(iter_items({"source": "shards", "path": str(folder)}, progress=False))
    assert [i.key for i in items] == ["s.tar:a", "s.tar:b", "s.tar:a", "s.tar:c", "s.tar:c"]
    assert [i.caption for i in items] == ["a 10", "b 20", "", "c 40", ""]
    assert [int(np.asarray(items[k].read())[0, 0, 0]) for k in (0, 1, 3)] == [10, 20, 40]
    for k in (2, 4):
        with pytest.raises(OSError, match=r"key [ac] is also an earlier sample's in s.tar") as err:
            items[k].read()
        assert skip_reason(err.value) == "duplicate_key"
    # the shard readers (load, stream, data shard) skip them alike: they kept both before
    from cliplab.data.shards.read import load_shards
    from cliplab.data.shards.stream import ShardStream

    loaded = as_pairs(load_source({"source": "shards", "path": str(folder), "progress": False}))
    assert loaded.captions == [["a 10"], ["b 20"], ["c 40"]]
    assert loaded.skipped.counts == {"duplicate_key": 2}
    assert loaded.skipped.keys["duplicate_key"] == ["s.tar:a", "s.tar:c"]
    assert len(load_shards(folder, progress=False)) == 3
    streamed = ShardStream(folder, shuffle=False, caption="first", rank=0, world_size=1)
    assert [x["caption"] for x in streamed] == ["a 10", "b 20", "c 40"]
    assert streamed.skipped.counts == {"duplicate_key": 2}
    assert main(["data", "shard", "--data", str(folder), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    index = json.loads((tmp_path / "again" / "index.json").read_text())
    assert index["skipped"]["counts"] == {"duplicate_key": 2}
    assert index["total"] == 3
    png = {k: png_bytes(np.full((4, 4, 3), v, np.uint8)) for k, v in (("x", 1), ("y", 2))}
    write_tar(folder / "s.tar", [("x", {"png": png["x"]}), ("y", {"png": png["y"]}),
                                 ("y", {"txt": b"why"}), ("x", {"txt": b"ex"})])
    items = list(iter_items({"source": "shards", "path": str(folder)}, progress=False))
    assert [(i.key, i.caption) for i in items] == [("s.tar:x", "ex"), ("s.tar:y", "why")]


def test_a_skip_line_tells_truncated_shards_apart_from_samples():
    from cliplab.data.types import SkipReport

    report = SkipReport()
    report.add("unreadable_image", "a.tar:1")
    report.add("truncated_shard", "b.tar")
    assert report.line("zs", 10, "DATA") == ("zs: skipped 1 of 11 samples (unreadable_image=1)"
                                             ", and 1 shard(s) read only in part "
                                             "(truncated_shard=1) in DATA")
    # results.json counts as the line does (its total counted the shard as a sample)
    assert report.to_dict() == {"total": 1, "shards_read_in_part": 1,
                                "counts": {"unreadable_image": 1, "truncated_shard": 1},
                                "keys": {"unreadable_image": ["a.tar:1"],
                                         "truncated_shard": ["b.tar"]}}
    assert "shards_read_in_part" not in SkipReport().to_dict()


def test_labelled_data_made_pairs_keeps_what_loading_skipped():
    from cliplab.data.types import SkipReport

    skipped = SkipReport()
    skipped.add("unreadable_image", "cat/bad.jpg")
    data = LabelledImages(torch.zeros((2, 4, 4, 3), dtype=torch.uint8), torch.tensor([0, 1]),
                          ["cat", "dog"], ["a {}"], skipped=skipped)
    assert labelled_to_pairs(data).skipped.total == 1


def test_a_template_with_two_slots_is_refused():
    from cliplab.data.sources import check_templates

    assert check_templates(["a {} photo", "a {c}."], "toy") == ["a {} photo", "a {}."]
    with pytest.raises(ConfigError, match=r"^templates of data source 'toy': every prompt needs "
                                          r"one '\{\}' where the class goes and every other "
                                          r"brace doubled .*; not 'a \{\} of \{\}'$"):
        check_templates(["a {} photo", "a {} of {}"], "toy")


@pytest.mark.parametrize("template", ["a {0} {}", "{.x} {}", "a {} {style}", "{} {", "{{}}"])
def test_a_template_with_another_format_field_is_refused(template):
    """Counted, these hold one '{}'; formatted with a class they fail (ValueError,
    AttributeError, KeyError: a traceback from deep inside eval, adapt or pretrain) or put
    it nowhere."""
    from cliplab.data.sources import check_templates

    with pytest.raises(ConfigError, match=r"^templates of data source 'toy': every prompt needs "
                                          r"one '\{\}' where the class goes and every other "
                                          r"brace doubled \('\{\{' for a literal '\{'\); not "
                                          + re.escape(repr(template)) + "$"):
        check_templates(["a {} photo", template], "toy")
    # doubled braces are literal, '{{}}' too: the class still goes in once
    assert check_templates(["a {} of {{x}}", "show {{}} as {}"], "toy") == \
        ["a {} of {{x}}", "show {{}} as {}"]


@pytest.mark.parametrize("spec", ["data.train={source: {source: shapes}}",
                                  "data.replay={ratio: 0.3, source: {source: shapes, n: 20}}",
                                  "data.train={source: [shapes]}"])
def test_a_source_that_is_no_name_is_one_line_naming_its_key(spec, tmp_path, capsys):
    """A nested spec as `source:` (a natural misreading of `data.replay: {ratio, source: ...}`)
    crashed with `TypeError: unhashable type` in every command."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny-shapes.yaml"
    assert main(["pretrain", "--config", str(recipe), "--out", str(tmp_path / "run"),
                 "--no-progress", spec]) == 2
    err = capsys.readouterr().err
    key = spec.partition("=")[0]
    assert err.startswith(f"cliplab: error: {recipe} + command line: {key}: a data source is a "
                          "name (fashion-mnist, digits, shapes,") and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("shift", [None, "invert", "blur:1.5", "invert+blur:1", "noise:0"])
def test_shift_seed_without_a_random_shift_is_refused(shift):
    """Only a noise shift draws random numbers; its seed changes nothing elsewhere."""
    from cliplab.data.sources import check_options

    spec = {"source": "digits", "split": "test", "shift_seed": 3}
    if shift is not None:
        spec["shift"] = shift
    with pytest.raises(ConfigError, match=r"^data.test.shift_seed has no effect unless shift "
                       r"adds noise .*; drop it$"):
        check_options(spec, "data.test")
    with pytest.raises(ConfigError, match=r"^shift_seed has no effect"):
        load_source(spec)
    assert check_options({**spec, "shift_seed": 0}, "data.test")["shift_seed"] == 0


def test_shift_seed_in_a_config_names_its_data_key(tmp_path):
    from cliplab.config import validate
    from cliplab.data.shards.job import ShardConfig

    with pytest.raises(ConfigError, match=r"^shard: data: shift_seed has no effect unless "
                       r"shift adds noise"):
        validate(ShardConfig, {"data": {"source": "digits", "shift": "invert", "shift_seed": 1},
                               "out": str(tmp_path)}, "shard")
    noisy = {"data": {"source": "digits", "shift": "invert+noise:0.1", "shift_seed": 1},
             "out": str(tmp_path)}
    saved = validate(ShardConfig, noisy, "shard").to_dict()
    assert validate(ShardConfig, saved, "shard").to_dict() == saved


def test_a_manifest_of_pairs_used_as_classes_names_label_col(tmp_path):
    """A manifest with caption and label columns reads as pairs; given templates or classes,
    the error says how to read it as classes."""
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,caption,label\na.png,a red square,red\n")
    spec = {"source": "manifest", "path": str(manifest)}
    for extra in ({"templates": ["a {}"]}, {"classes": ["red"]}):
        with pytest.raises(ConfigError, match=r"gives image-text pairs \(a manifest is read as "
                                              r"classes when label_col: COLUMN names"):
            load_source({**spec, **extra})
    assert load_source({**spec, "label_col": "label", "classes": ["red"]}).classnames == ["red"]


def test_a_spec_is_recorded_with_every_path_it_names_resolved(tmp_path, monkeypatch):
    """index.json and summary.json record their source resolved; of a `::` list only the first
    pattern was, so the record read from elsewhere named shards that were not there."""
    from cliplab.data.sources import with_paths_resolved

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    spec = {"source": "shards", "path": "a/{00000..00001}.tar::~/b/{00000..00001}.tar",
            "seed": 3}
    assert with_paths_resolved(spec) == {
        "source": "shards", "seed": 3,
        "path": f"{tmp_path}/a/{{00000..00001}}.tar::{tmp_path}/home/b/{{00000..00001}}.tar"}
    assert with_paths_resolved({"source": "shards", "path": ["a.tar", "~/b.tar"]})["path"] == \
        [f"{tmp_path}/a.tar", f"{tmp_path}/home/b.tar"]
