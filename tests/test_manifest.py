"""Tests of cliplab.data.manifest: CSV / JSONL / Parquet manifests, skipping bad samples, errors."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cliplab.data.manifest import ManifestDataset, load_manifest, read_manifest_rows
from cliplab.data.types import ImageTextPairs, LabelledImages
from cliplab.errors import DataError


def make_png(path: Path, width: int = 6, height: int = 4, seed: int = 0) -> np.ndarray:
    """Write a random RGB PNG and return its pixels [H, W, 3]."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as CSV, JSONL or Parquet depending on the suffix of ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def label_manifest(path: Path, labels: list) -> Path:
    """A manifest at ``path`` labelling image ``i.png`` (written beside it) with ``labels[i]``."""
    for i in range(len(labels)):
        if not (path.parent / f"{i}.png").exists():
            make_png(path.parent / f"{i}.png", seed=i)
    return write_manifest(path, [{"image": f"{i}.png", "label": label}
                                 for i, label in enumerate(labels)])


@pytest.fixture
def two_images(tmp_path: Path) -> dict[str, np.ndarray]:
    return {"images/a.png": make_png(tmp_path / "images/a.png", seed=1),
            "images/b.png": make_png(tmp_path / "images/b.png", seed=2)}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json-lines", ".parquet"])
def test_each_format_round_trips(tmp_path, two_images, suffix):
    rows = [{"image": "images/a.png", "caption": "a red thing"},
            {"image": "images/b.png", "caption": "a, \"quoted\" blue thing"}]
    path = write_manifest(tmp_path / f"manifest{suffix}", rows)
    assert read_manifest_rows(path) == rows
    data = load_manifest(path, progress=False)
    assert isinstance(data, ImageTextPairs)
    assert data.name == "manifest"
    assert data.images.dtype == torch.uint8 and data.images.shape == (2, 4, 6, 3)
    assert torch.equal(data.images[0], torch.from_numpy(two_images["images/a.png"]))
    assert torch.equal(data.images[1], torch.from_numpy(two_images["images/b.png"]))
    assert data.captions == [["a red thing"], ["a, \"quoted\" blue thing"]]
    assert data.skipped.total == 0


def test_formats_give_identical_datasets(tmp_path, two_images):
    rows = [{"path": "images/b.png", "label": "dog"}, {"path": "images/a.png", "label": "cat"}]
    loaded = [load_manifest(write_manifest(tmp_path / f"m{s}", rows), progress=False)
              for s in (".csv", ".jsonl", ".parquet")]
    for data in loaded:
        assert isinstance(data, LabelledImages)
        assert torch.equal(data.images, loaded[0].images)
        assert data.labels.tolist() == [1, 0] and data.classnames == ["cat", "dog"]


def test_relative_paths_resolve_against_manifest_folder(tmp_path, monkeypatch):
    a = make_png(tmp_path / "pics/a.png", seed=3)
    b = make_png(tmp_path / "elsewhere/b.png", seed=4)
    path = write_manifest(tmp_path / "sub/dir/m.jsonl", [
        {"filepath": "../../pics/a.png", "text": "relative"},
        {"filepath": str(tmp_path / "elsewhere/b.png"), "text": "absolute"},
    ])
    monkeypatch.chdir(tmp_path / "elsewhere")  # the working directory must not matter
    data = load_manifest(path, progress=False)
    assert torch.equal(data.images[0], torch.from_numpy(a))
    assert torch.equal(data.images[1], torch.from_numpy(b))
    assert data.captions == [["relative"], ["absolute"]]


def test_string_labels_become_sorted_classnames(tmp_path):
    for i in range(4):
        make_png(tmp_path / f"{i}.png", seed=i)
    rows = [{"image": f"{i}.png", "class": c} for i, c in enumerate(["dog", "cat", "dog", "bird"])]
    data = load_manifest(write_manifest(tmp_path / "m.csv", rows), progress=False)
    assert isinstance(data, LabelledImages)
    assert data.classnames == ["bird", "cat", "dog"]
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [2, 1, 2, 0]
    assert data.templates == ["a photo of a {}."]


def test_given_classnames_and_int_labels(tmp_path):
    for i in range(4):
        make_png(tmp_path / f"{i}.png", seed=i)
    rows = [{"image": "0.png", "label": "cat"}, {"image": "1.png", "label": "2"},
            {"image": "2.png", "label": "fish"}, {"image": "3.png", "label": ""}]
    path = write_manifest(tmp_path / "m.csv", rows)
    data = load_manifest(path, classnames=["dog", "cat", "bird"], templates=["art of a {}."],
                         progress=False)
    assert data.classnames == ["dog", "cat", "bird"] and data.templates == ["art of a {}."]
    assert data.labels.tolist() == [1, 2]
    assert data.skipped.counts == {"bad_label": 2}
    assert data.skipped.keys["bad_label"] == ["m.csv:line 4: 2.png", "m.csv:line 5: 3.png"]

    ints = write_manifest(tmp_path / "ints.jsonl", [{"image": "0.png", "label": 2},
                                                    {"image": "1.png", "label": 0}])
    # classes named by their digits, and index 1 a class no row has: told (it was silent)
    with pytest.warns(UserWarning, match=r"ints\.jsonl: integer labels without classnames: "
                      r"make 3 classes named '0'\.\.'2' .*; 1 of them \(1\) label no row; "
                      r"give classnames: "):
        data = load_manifest(ints, progress=False)
    assert data.labels.tolist() == [2, 0] and data.classnames == ["0", "1", "2"]


def test_bad_samples_are_skipped_and_reported(tmp_path):
    good_a = make_png(tmp_path / "images/a.png", seed=1)
    good_b = make_png(tmp_path / "images/b.png", seed=2)
    (tmp_path / "images/corrupt.png").write_bytes(np.random.default_rng(0).bytes(300))
    whole = (tmp_path / "images/a.png").read_bytes()
    (tmp_path / "images/truncated.png").write_bytes(whole[: len(whole) // 2])
    rows = [
        {"image": "images/a.png", "caption": "good one"},       # line 2
        {"image": "images/missing.png", "caption": "gone"},     # line 3
        {"image": "images/corrupt.png", "caption": "noise"},    # line 4
        {"image": "images/b.png", "caption": "   "},            # line 5
        {"image": "images/truncated.png", "caption": "half"},   # line 6
        {"image": "images/b.png", "caption": "good two"},       # line 7
    ]
    path = write_manifest(tmp_path / "manifest.csv", rows)
    data = load_manifest(path, progress=False)
    assert data.captions == [["good one"], ["good two"]]
    assert torch.equal(data.images, torch.from_numpy(np.stack([good_a, good_b])))
    assert data.skipped.counts == {"missing_file": 1, "unreadable_image": 2, "empty_caption": 1}
    assert data.skipped.keys == {
        "missing_file": ["manifest.csv:line 3: images/missing.png"],
        "unreadable_image": ["manifest.csv:line 4: images/corrupt.png",
                             "manifest.csv:line 6: images/truncated.png"],
        "empty_caption": ["manifest.csv:line 5: images/b.png"],
    }
    assert data.skipped.summary() == ("skipped 4 samples: empty_caption=1, missing_file=1, "
                                      "unreadable_image=2")


def test_lazy_dataset_and_try_load(tmp_path):
    pixels = make_png(tmp_path / "a.png", width=5, height=3)
    path = write_manifest(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "ok"},
                                                 {"image": "nope.png", "caption": "missing"}])
    data = ManifestDataset(path)
    assert len(data) == 2 and data.kind == "pairs"
    image, caption = data[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 3) and caption == "ok"
    assert torch.equal(image, torch.from_numpy(pixels))
    assert data.try_load(1) is None
    with pytest.raises(DataError, match="missing_file"):
        data[1]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    make_png(tmp_path / "a.png")
    path = tmp_path / "broken.jsonl"
    path.write_text('{"image": "a.png", "caption": "fine"}\n\n{"image": "a.png", "caption": oops}\n')
    with pytest.raises(DataError) as info:
        load_manifest(path, progress=False)
    message = str(info.value)
    assert "broken.jsonl" in message and "line 3" in message and "\n" not in message
    with pytest.raises(DataError, match="line 3"):
        read_manifest_rows(path)


def test_missing_column_raises(tmp_path):
    make_png(tmp_path / "a.png")
    no_image = write_manifest(tmp_path / "no_image.csv", [{"file": "a.png", "caption": "x"}])
    with pytest.raises(DataError, match=r"no_image\.csv:line 1: no image column"):
        load_manifest(no_image, progress=False)
    captions_only = write_manifest(tmp_path / "caps.csv", [{"image": "a.png", "caption": "x"}])
    with pytest.raises(DataError, match="no label column"):
        load_manifest(captions_only, kind="labelled", progress=False)
    with pytest.raises(DataError, match="'words'"):
        load_manifest(captions_only, caption_col="words", progress=False)
    neither = write_manifest(tmp_path / "neither.jsonl", [{"image": "a.png", "note": "x"}])
    # a misspelt caption column read as a missing label column
    with pytest.raises(DataError, match=r"neither.jsonl:line 1: no caption or label column "
                                        r"\(looked for caption, text, label, class; found: "
                                        r"image, note\)"):
        load_manifest(neither, progress=False)


def test_a_caption_that_is_no_text_is_skipped_not_written_as_its_repr(tmp_path):
    from cliplab.data.collection import iter_items

    for i in range(3):
        make_png(tmp_path / f"{i}.png", seed=i)
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "0.png", "caption": ["a red cat", "a cat"]},
        {"image": "1.png", "caption": {"en": "cat"}}, {"image": "2.png", "caption": 12345}]))
    data = load_manifest(path, progress=False)
    assert data.captions == [["12345"]] and dict(data.skipped.counts) == {"bad_caption": 2}
    items = list(iter_items({"source": "manifest", "path": str(path)}, progress=False))
    assert [item.caption for item in items] == ["", "", "12345"]
    with pytest.raises(DataError, match="no column 'words'"):
        list(iter_items({"source": "manifest", "path": str(path), "caption_col": "words"},
                        progress=False))


def test_custom_column_names(tmp_path):
    pixels = make_png(tmp_path / "a.png")
    path = write_manifest(tmp_path / "m.parquet", [{"img": "a.png", "desc": "custom", "caption": "no"}])
    data = load_manifest(path, image_col="img", caption_col="desc", progress=False)
    assert data.captions == [["custom"]]
    assert torch.equal(data.images[0], torch.from_numpy(pixels))


def test_bad_manifest_files_raise(tmp_path):
    with pytest.raises(DataError, match="unknown manifest format"):
        read_manifest_rows(tmp_path / "m.txt")
    with pytest.raises(DataError, match="manifest .* does not exist; check the path"):
        read_manifest_rows(tmp_path / "absent.csv")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet"):
        read_manifest_rows(tmp_path / "junk.parquet")


def test_no_usable_sample_raises(tmp_path):
    path = write_manifest(tmp_path / "allbad.csv", [{"image": "x.png", "caption": "a"},
                                                    {"image": "y.png", "caption": "b"}])
    with pytest.raises(DataError, match=r"allbad\.csv.*missing_file=2"):
        load_manifest(path, progress=False)


def test_mixed_sizes_are_resized(tmp_path):
    """Without image_size, centre squares at the median shorter side (5 of 4 and 6); the
    8x6 image was squashed to the first one's 4x4."""
    make_png(tmp_path / "small.png", width=4, height=4, seed=1)
    make_png(tmp_path / "big.png", width=8, height=6, seed=2)
    path = write_manifest(tmp_path / "m.csv", [{"image": "small.png", "caption": "s"},
                                               {"image": "big.png", "caption": "b"}])
    with pytest.warns(UserWarning, match=r"m\.csv: 2 images of 2 sizes .* 5x5 squares"):
        data = load_manifest(path, progress=False)
    assert data.images.shape == (2, 5, 5, 3)
    bilinear = Image.Resampling.BILINEAR
    small = Image.open(tmp_path / "small.png").convert("RGB").resize((5, 5), bilinear)
    assert torch.equal(data.images[0], torch.from_numpy(np.array(small)))
    big = Image.open(tmp_path / "big.png").convert("RGB").resize((7, 5), bilinear)  # 8 * 5/6
    assert torch.equal(data.images[1], torch.from_numpy(np.array(big)[:, 1:6]))

    fixed = load_manifest(path, image_size=5, progress=False)
    assert fixed.images.shape == (2, 5, 5, 3)


def test_bad_csv_quoting_names_line(tmp_path):
    path = tmp_path / "quotes.csv"
    path.write_text('image,caption\na.png,fine\na.png,"ok" trailing\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"quotes\.csv:line 3: bad CSV"):
        read_manifest_rows(path)


def test_a_record_is_named_by_its_first_line(tmp_path):
    """A quoted caption over two lines is the record of its first line; an unterminated quote
    was reported at the end of the file, not where it opened."""
    path = tmp_path / "multi.csv"
    path.write_text('image,caption\na.png,"two\nlines"\nb.png,one\n', encoding="utf-8")
    from cliplab.data.manifest import _read_table

    rows, locations, _ = _read_table(path)
    assert [r["caption"] for r in rows] == ["two\nlines", "one"]
    assert locations == ["line 2", "line 4"]
    path.write_text('image,caption\na.png,one\n\n\nb.png,"two\nlines"\n\nc.png,x,y\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"multi\.csv:line 8: 3 fields"):
        read_manifest_rows(path)
    path.write_text('image,caption\na.png,one\n\nb.png,two\n', encoding="utf-8")
    assert _read_table(path)[1] == ["line 2", "line 4"]
    path.write_text('image,caption\na.png,"never closed\nb.png,x\nc.png,y\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"multi\.csv:line 2: bad CSV"):
        read_manifest_rows(path)


def test_a_row_with_more_fields_than_the_header_names_its_line(tmp_path):
    """An unquoted comma would otherwise cut the caption short without a word."""
    path = tmp_path / "commas.csv"
    path.write_text('image,caption\na.png,"a cat, sleeping"\nb.png,a dog, running\n')
    with pytest.raises(DataError, match=r"^.*commas\.csv:line 3: 3 fields, the header names 2; "
                                        r"put a field holding commas in double quotes"):
        read_manifest_rows(path)
    path.write_text('image,caption\na.png,"a cat, sleeping"\n')
    assert read_manifest_rows(path)[0]["caption"] == "a cat, sleeping"


def test_negative_and_out_of_range_integer_labels_are_bad_labels(tmp_path):
    path = label_manifest(tmp_path / "m.csv", ["0", "1", "-1"])
    data = load_manifest(path, progress=False)
    assert data.classnames == ["0", "1"] and data.labels.tolist() == [0, 1]
    assert data.skipped.keys == {"bad_label": ["m.csv:line 4: 2.png"]}
    # an index one past the given class names is no class either
    path = label_manifest(tmp_path / "given.csv", ["1", "2"])
    data = load_manifest(path, classnames=["a", "b"], progress=False)
    assert data.classnames == ["a", "b"] and data.labels.tolist() == [1]
    assert data.skipped.keys == {"bad_label": ["given.csv:line 3: 1.png"]}


def test_non_integer_json_labels_are_not_class_indices(tmp_path):
    for i in range(4):
        make_png(tmp_path / f"{i}.png", seed=i)
    path = write_manifest(tmp_path / "m.jsonl", [
        {"image": "0.png", "label": 0}, {"image": "1.png", "label": 1.5},
        {"image": "2.png", "label": True}, {"image": "3.png", "label": 1.0}])
    data = load_manifest(path, classnames=["a", "b"], progress=False)
    assert data.labels.tolist() == [0, 1]  # 1.0 is the integer 1
    assert data.skipped.keys == {"bad_label": ["m.jsonl:line 2: 1.png", "m.jsonl:line 3: 2.png"]}


def test_an_integer_label_column_with_a_word_in_it_is_refused_naming_both_rows(tmp_path):
    """One typo in an integer column would read every label as a name sorted as text ('10'
    before '2'), renumbering the classes silently; it is an error naming the word's row and an
    integer's, and given class names read the same column."""
    path = label_manifest(tmp_path / "m.csv", ["2", "10", "tw0"])
    with pytest.raises(DataError) as err:
        load_manifest(path, progress=False)
    assert str(err.value) == (f"{path}:line 4: label 'tw0' is not an integer, but {path}:line 2 "
                              "has label 2; fix the row, or give classnames= to read every "
                              "label as a name")
    names = [str(i) for i in range(11)] + ["tw0"]
    data = load_manifest(path, classnames=names, progress=False)
    assert data.labels.tolist() == [2, 10, 11]
    words = label_manifest(tmp_path / "w.csv", ["cat", "dog"])
    assert load_manifest(words, progress=False).classnames == ["cat", "dog"]


def test_integer_labels_written_as_floats_are_class_indices(tmp_path):
    """pandas writes an integer column holding a gap as floats ("10.0"): still indices, so
    class 10 is the eleventh class, not a name sorted before "2.0"."""
    path = label_manifest(tmp_path / "m.csv", ["2.0", "10.0", ""])
    data = load_manifest(path, progress=False)
    assert data.classnames == [str(i) for i in range(11)] and data.labels.tolist() == [2, 10]
    assert data.skipped.keys == {"bad_label": ["m.csv:line 4: 2.png"]}


def test_an_integer_label_past_any_class_count_is_refused_not_allocated(tmp_path):
    """An id column read as class indices would make classes 0..10**20 (a hang, then out of
    memory): past 100 000 classes it stops naming the row; given names read it."""
    from cliplab.data.manifest import MAX_INDEX_CLASSES

    path = label_manifest(tmp_path / "m.csv", ["3", "1e20"])
    with pytest.raises(DataError, match=rf"^{path}:line 3: label 100000000000000000000 is past "
                                        r"100,000 classes \(integer labels are class indices"):
        load_manifest(path, progress=False)
    edge = label_manifest(tmp_path / "edge.csv", ["0", str(MAX_INDEX_CLASSES - 1)])
    assert len(load_manifest(edge, progress=False).classnames) == MAX_INDEX_CLASSES
    past = label_manifest(tmp_path / "past.csv", [str(MAX_INDEX_CLASSES)])
    with pytest.raises(DataError, match=r"past 100,000 classes"):
        load_manifest(past, progress=False)
    named = load_manifest(path, classnames=["a", "b", "c", "d"], progress=False)
    assert named.labels.tolist() == [3] and named.skipped.counts == {"bad_label": 1}


def test_label_col_makes_labelled_images_even_beside_a_caption_column(tmp_path):
    for i in range(2):
        make_png(tmp_path / f"{i}.png", seed=i)
    path = write_manifest(tmp_path / "m.csv", [
        {"image": "0.png", "caption": "a small dog", "class": "dog"},
        {"image": "1.png", "caption": "a cat asleep", "class": "cat"}])
    data = load_manifest(path, label_col="class", progress=False)
    assert isinstance(data, LabelledImages)
    assert data.classnames == ["cat", "dog"] and data.labels.tolist() == [1, 0]


def test_csv_header_spaces_and_a_byte_order_mark_do_not_matter(tmp_path):
    make_png(tmp_path / "a.png", seed=1)
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("image, caption\na.png,a red thing\n", encoding="utf-8")
    assert load_manifest(spaced, progress=False).captions == [["a red thing"]]
    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    plain.write_text("image,caption\na.png,a red thing\n", encoding="utf-8")
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_manifest_rows(bom) == read_manifest_rows(plain) == [
        {"image": "a.png", "caption": "a red thing"}]
    assert load_manifest(bom, progress=False).captions == [["a red thing"]]


def test_manifest_captions_reads_the_named_column(tmp_path):
    from cliplab.data.manifest import manifest_captions

    path = write_manifest(tmp_path / "m.csv", [{"image": "a.png", "caption": "one", "alt": "uno"},
                                               {"image": "b.png", "caption": "two", "alt": "dos"}])
    assert manifest_captions(path) == ["one", "two"]
    assert manifest_captions(path, "alt") == ["uno", "dos"]


def test_collection_items_of_a_labelled_manifest_take_the_label_as_caption(tmp_path):
    from cliplab.data.collection import iter_items

    for i in range(2):
        make_png(tmp_path / f"{i}.png", seed=i)
    path = write_manifest(tmp_path / "m.csv", [{"image": "0.png", "label": "dog"},
                                               {"image": "1.png", "label": "cat"}])
    items = list(iter_items({"source": "manifest", "path": str(path)}, progress=False))
    assert [item.caption for item in items] == ["dog", "cat"]


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    make_png(tmp_path / "a.png")
    path = tmp_path / "m.csv"
    path.write_text("image,caption, caption\na.png,a,b\n")
    with pytest.raises(DataError) as err:
        load_manifest(path, progress=False)
    assert str(err.value) == (f"{path}:line 1: the header names column 'caption' twice; give "
                              "each column its own name")


def test_a_jsonl_row_or_parquet_table_naming_a_key_twice_is_refused(tmp_path):
    """json.loads keeps the last of two equal keys silently (a caption given twice would lose
    the first); a Parquet table naming a column twice is refused by pyarrow's reader."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    make_png(tmp_path / "a.png")
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"image": "a.png", "caption": "a"}\n'
                     '{"image": "a.png", "caption": "a", "caption": "b"}\n')
    with pytest.raises(DataError) as err:
        load_manifest(jsonl, progress=False)
    assert str(err.value) == f"{jsonl}:line 2: the object names 'caption' twice; give each key once"
    table = pa.Table.from_arrays([pa.array(["a.png"]), pa.array(["a"]), pa.array(["b"])],
                                 names=["image", "caption", "caption"])
    parquet = tmp_path / "m.parquet"
    pq.write_table(table, parquet)
    with pytest.raises(DataError) as err:  # pyarrow's reader refuses it already
        load_manifest(parquet, progress=False)
    assert str(err.value).startswith(f"{parquet}: not a readable Parquet file (Multiple matches "
                                     "for FieldRef.Name(caption)")


def test_a_name_too_long_for_the_file_system_is_a_missing_file_in_every_reader(tmp_path):
    """`Path.is_file()` raises for a name past the file system's limit: the loader (eval, data
    shard) failed with an OSError traceback, the collection (index, curate) counted it as an
    unreadable image. Both count it missing."""
    from cliplab.data.collection import iter_items, skip_reason

    make_png(tmp_path / "a.png")
    path = write_manifest(tmp_path / "m.csv", [{"image": "a.png", "caption": "ok"},
                                               {"image": "x" * 300 + ".png", "caption": "long"}])
    data = load_manifest(path, progress=False)
    assert data.captions == [["ok"]] and data.skipped.counts == {"missing_file": 1}
    long_row = list(iter_items({"source": "manifest", "path": str(path)}))[1]
    with pytest.raises(OSError) as err:
        long_row.read()
    assert skip_reason(err.value) == "missing_file"


@pytest.mark.parametrize("value, said", [
    (b"\x89PNG\r\n\x1a\n...", "image bytes"),
    ({"bytes": b"\x89PNG\r\n\x1a\n...", "path": "a.png"}, "{bytes, path} records")])
def test_an_image_column_holding_the_images_themselves_is_refused_in_one_line(tmp_path, value,
                                                                              said):
    """A Hugging Face export's image column holds `{bytes, path}` structs (or bytes): each was
    read as a file named by the repr of its bytes (a traceback several KB long in eval and
    data shard; every row an unreadable image in index)."""
    from cliplab.data.collection import iter_items

    path = write_manifest(tmp_path / "hf.parquet", [{"image": value, "caption": "one"}])
    message = rf"hf.parquet: column 'image' holds {re.escape(said)}, not image file paths"
    with pytest.raises(DataError, match=message):
        load_manifest(path, progress=False)
    with pytest.raises(DataError, match=message):
        list(iter_items({"source": "manifest", "path": str(path)}))


def test_the_collection_names_a_missing_image_column_as_the_loader_does_and_strips_captions(
        tmp_path):
    """index/curate's manifest reader said `looked for ('image', 'path', ...)` (a Python tuple)
    without the option to pass, and kept a blank caption as its spaces (the loader strips it)."""
    from cliplab.data.collection import iter_items

    (tmp_path / "m.csv").write_text("img,caption\na.png,a cat\n")
    with pytest.raises(DataError, match=r"m.csv: no image column \(looked for image, path, "
                                        r"filepath, image_path; found: img, caption\); rename a "
                                        r"column or set the data spec's image_col "
                                        r"\(data.image_col=NAME with --data\)$"):
        list(iter_items({"source": "manifest", "path": str(tmp_path / "m.csv")}))
    (tmp_path / "m.csv").write_text("image,caption\na.png,  a cat \nb.png,   \n")
    items = iter_items({"source": "manifest", "path": str(tmp_path / "m.csv")})
    assert [item.caption for item in items] == ["a cat", ""]


def test_the_column_a_missing_column_error_suggests_is_set_as_it_says(tmp_path, capsys):
    """It said `pass image_col=`, which every command line refused as an unknown key: the
    option belongs to the data spec (`data.image_col=` beside --data)."""
    from PIL import Image

    from cliplab.cli import main

    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("img,text\na.png,a red square\n", encoding="utf-8")
    args = ["data", "shard", "--data", str(tmp_path / "m.csv"), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "s1")]) == 2
    assert "set the data spec's image_col (data.image_col=NAME with --data)" in \
        capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "s2"), "data.image_col=img"]) == 0
    assert "wrote 1 sample in 1 shard" in capsys.readouterr().out
