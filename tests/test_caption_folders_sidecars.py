"""Image folders with ``NAME.txt`` caption sidecars: `data shard` writes those captions (not
"a photo of a <folder>."), every reader of a folder as pairs applies the same rule (an image
of a caption folder without a caption is skipped as ``missing_caption``), and a sidecar that
is not UTF-8 text is skipped and counted, naming the file."""

import json
import tarfile

import pytest
from PIL import Image

from cliplab.cli import main
from cliplab.data.collection import PIL_ERRORS, iter_items, skip_reason
from cliplab.data.sources import as_pairs, load_source


def _image(path, colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


@pytest.fixture()
def photos(tmp_path):
    """``batch 1`` (two captioned images), ``dirt`` (a captioned one, one without a caption,
    one whose caption and one whose metadata are Latin-1 bytes)."""
    root = tmp_path / "photos"
    _image(root / "batch 1" / "a.png")
    (root / "batch 1" / "a.txt").write_text("a red square\n", encoding="utf-8")
    _image(root / "batch 1" / "b.jpg", "blue")
    (root / "batch 1" / "b.txt").write_text("a blue café", encoding="utf-8")
    _image(root / "dirt" / "c.png", "green")
    (root / "dirt" / "c.txt").write_text("a green square")
    _image(root / "dirt" / "nocaption.png")
    _image(root / "dirt" / "latin1.png")
    (root / "dirt" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    _image(root / "dirt" / "badmeta.png")
    (root / "dirt" / "badmeta.txt").write_text("a square with bad metadata")
    (root / "dirt" / "badmeta.json").write_bytes(b'{"note": "caf\xe9"}')
    return root


def _shard_captions(out):
    """``{source_key: caption}`` of the samples in ``out``'s shards."""
    found = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive:
                if member.name.endswith(".json"):
                    meta = json.loads(archive.extractfile(member).read())
                    found[meta["source_key"]] = meta["captions"][0]
    return found


def test_data_shard_writes_the_caption_files(photos, tmp_path):
    out = tmp_path / "shards"
    assert main(["data", "shard", "--data", str(photos), "--out", str(out),
                 "--no-progress"]) == 0
    assert _shard_captions(out) == {"batch 1/a.png": "a red square",
                                    "batch 1/b.jpg": "a blue café",
                                    "dirt/c.png": "a green square"}
    index = json.loads((out / "index.json").read_text())
    keys = index["skipped"]["keys"]
    assert keys["missing_caption"] == [str(photos / "dirt" / "nocaption.png")]
    assert keys["bad_caption"] == [str(photos / "dirt" / "latin1.txt")]
    assert keys["bad_metadata"] == [str(photos / "dirt" / "badmeta.json")]
    assert "classnames" not in index


def test_data_shard_of_a_class_folder_still_writes_classes(tmp_path):
    root = tmp_path / "pets"
    _image(root / "tabby_cat" / "1.png")
    _image(root / "golden_retriever" / "2.png", "yellow")
    out = tmp_path / "shards"
    assert main(["data", "shard", "--data", str(root), "--out", str(out),
                 "--no-progress"]) == 0
    assert _shard_captions(out) == {"golden_retriever/2.png": "a photo of a golden retriever.",
                                    "tabby_cat/1.png": "a photo of a tabby cat."}
    assert json.loads((out / "index.json").read_text())["classnames"] == \
        ["golden retriever", "tabby cat"]


def test_the_collection_reads_the_same_captions_and_skips(photos):
    """index/curate (the collection) keep and skip the same images as data shard."""
    kept, failed = {}, {}
    for item in iter_items({"source": "image-folder", "path": str(photos)}):
        try:
            item.read()
            kept[item.key] = item.caption
        except PIL_ERRORS as err:
            failed[item.key] = (skip_reason(err), str(err))
    assert kept == {"batch 1/a.png": "a red square", "batch 1/b.jpg": "a blue café",
                    "dirt/c.png": "a green square"}
    assert {k: reason for k, (reason, _) in failed.items()} == {
        "dirt/nocaption.png": "missing_caption", "dirt/latin1.png": "bad_caption",
        "dirt/badmeta.png": "bad_metadata"}
    assert failed["dirt/latin1.png"][1] == \
        f"{photos / 'dirt' / 'latin1.txt'}: caption file not UTF-8 text"
    assert failed["dirt/badmeta.png"][1] == \
        f"{photos / 'dirt' / 'badmeta.json'}: metadata file not UTF-8 text"


def test_an_unreadable_image_without_caption_counts_as_unreadable(photos):
    (photos / "dirt" / "broken.png").write_bytes(b"not a png")
    reasons = {}
    for item in iter_items({"source": "image-folder", "path": str(photos)}):
        try:
            item.read()
        except PIL_ERRORS as err:
            reasons[item.key] = skip_reason(err)
    assert reasons["dirt/broken.png"] == "unreadable_image"


def test_pretrain_reads_captions_with_captions_true(photos):
    pairs = as_pairs(load_source({"source": "image-folder", "path": str(photos),
                                  "captions": True, "progress": False}))
    assert sorted(c[0] for c in pairs.captions) == ["a blue café", "a green square",
                                                   "a red square"]
    assert pairs.skipped.counts == {"missing_caption": 1, "bad_caption": 1, "bad_metadata": 1}
    labelled = load_source({"source": "image-folder", "path": str(photos), "progress": False})
    assert labelled.classnames == ["batch 1", "dirt"]  # eval's class reading is unchanged


def test_a_sub_folder_without_any_caption_is_read_as_a_class(photos, tmp_path):
    """The rule is per directory: one whose images have no NAME.txt at all is a class folder
    (its name the caption), in data shard as in the collection."""
    _image(photos / "tabby_cat" / "t.png")
    out = tmp_path / "shards"
    assert main(["data", "shard", "--data", str(photos), "--out", str(out),
                 "--no-progress"]) == 0
    assert _shard_captions(out)["tabby_cat/t.png"] == "tabby cat"
    item = next(i for i in iter_items({"source": "image-folder", "path": str(photos)})
                if i.key == "tabby_cat/t.png")
    assert item.caption == "tabby cat"


def test_pretrain_takes_a_caption_folder_by_itself(photos):
    """`pretrain` with data.train an image folder of NAME.txt captions trains on them, as
    `data shard` shards them (it trained on "a photo of a <folder>." before)."""
    from cliplab.train.pretrain import _pairs

    pairs = _pairs({"source": "image-folder", "path": str(photos), "progress": False}, False,
                   "data.train")
    assert sorted(c[0] for c in pairs.captions) == ["a blue café", "a green square",
                                                   "a red square"]


def test_an_empty_caption_beside_a_label_is_empty_in_every_reader(tmp_path):
    """A manifest row with a caption column left empty: curate and index captioned it with its
    label while data shard and pretrain skipped it; now every reader sees no caption."""
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png", "blue")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,caption,label\na.png,a red square,red\nb.png,,blue\n")
    items = list(iter_items({"source": "manifest", "path": str(manifest)}))
    assert [i.caption for i in items] == ["a red square", ""]
    pairs = as_pairs(load_source({"source": "manifest", "path": str(manifest)}))
    assert pairs.captions == [["a red square"]] and pairs.skipped.counts == {"empty_caption": 1}
    labels_only = tmp_path / "labels.csv"  # without a caption column the label is the text
    labels_only.write_text("image,label\na.png,red\n")
    assert [i.caption for i in iter_items({"source": "manifest", "path": str(labels_only)})] \
        == ["red"]


def test_an_empty_caption_file_is_skipped_by_the_loader_as_by_data_shard(tmp_path):
    """A caption folder's empty (or blank) NAME.txt gave a pair with the text "" to eval,
    pretrain and adapt while data shard, curate and manifests skipped it; a BOM (Windows
    Notepad) stayed in the caption."""
    folder = tmp_path / "photos"
    for name, text in (("a", "a red square"), ("b", ""), ("c", "  \n"), ("d", "a blue one")):
        _image(folder / f"{name}.png")
        (folder / f"{name}.txt").write_bytes(text.encode("utf-8-sig" if name == "d" else "utf-8"))
    pairs = as_pairs(load_source({"source": "image-folder", "path": str(folder),
                                  "captions": True, "progress": False}))
    assert pairs.captions == [["a red square"], ["a blue one"]]
    assert pairs.skipped.counts == {"empty_caption": 2}
    assert pairs.skipped.keys["empty_caption"] == [str(folder / "b.png"), str(folder / "c.png")]
    assert main(["data", "shard", "--data", str(folder), "--out", str(tmp_path / "sh"),
                 "--no-progress"]) == 0
    index = json.loads((tmp_path / "sh" / "index.json").read_text())
    assert index["skipped"]["keys"] == {"empty_caption": [str(folder / "b.png"),
                                                          str(folder / "c.png")]}
    # the index keeps every image (a caption is not needed to find it), its text as read
    captions = {i.key: i.caption for i in iter_items({"source": "image-folder",
                                                      "path": str(folder)})}
    assert captions == {"a.png": "a red square", "b.png": "", "c.png": "", "d.png": "a blue one"}


def test_a_foreign_shards_txt_is_one_caption_and_one_not_utf8_is_skipped_everywhere(tmp_path):
    """A shard another tool wrote (img2dataset: `KEY.txt`, no captions list): a caption with a
    newline was split into two captions by the loader and `data shard` but kept whole by
    `index`/`curate`; a Latin-1 caption was read with its bytes replaced (U+FFFD) everywhere,
    though a folder's skips it. Now every reader keeps the text whole and skips the Latin-1 one
    as `bad_caption`."""
    import io

    folder = tmp_path / "foreign"
    folder.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(png, format="PNG")
    parts = [("000000001.png", png.getvalue()), ("000000001.txt", "caf\xe9".encode("latin-1")),
             ("000000002.png", png.getvalue()),
             ("000000002.txt", b"a photo of a dog\nsitting on the grass\n")]
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for name, data in parts:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = "a photo of a dog\nsitting on the grass"
    spec = {"source": "shards", "path": str(folder)}
    pairs = load_source({**spec, "progress": False})
    assert pairs.captions == [[whole]] and pairs.skipped.counts == {"bad_caption": 1}
    items = list(iter_items(spec))
    assert [item.caption for item in items] == ["", whole]
    with pytest.raises(PIL_ERRORS) as err:
        items[0].read()
    assert skip_reason(err.value) == "bad_caption" and "00000.tar:000000001" in str(err.value)
    out = tmp_path / "shards"
    assert main(["data", "shard", "--data", str(folder), "--out", str(out), "--no-progress"]) == 0
    assert _shard_captions(out) == {"00000.tar:000000002": whole}
    assert json.loads((out / "index.json").read_text())["skipped"]["counts"] == {"bad_caption": 1}


def test_a_file_named_in_another_encoding_is_skipped_as_bad_name_by_every_reader(tmp_path):
    """A Latin-1 file name (an old zip, a Samba share) is listed with lone surrogates, which
    crashed index (SQLite), curate (the caption's hash) and data shard (the caption's UTF-8)
    with a traceback. Every reader skips it as `bad_name`, naming it printably."""
    import os

    folder = tmp_path / "photos"
    _image(folder / "cls" / "ok.png")
    (folder / "cls" / "ok.txt").write_text("a red square", encoding="utf-8")
    latin = os.fsencode(folder / "cls") + b"/caf\xe9.png"
    with open(latin, "wb") as f:
        f.write((folder / "cls" / "ok.png").read_bytes())
    with open(latin[:-4] + b".txt", "wb") as f:  # its caption: counted with it, not again
        f.write(b"a caption")
    items = list(iter_items({"source": "image-folder", "path": str(folder)}))
    assert [item.key for item in items] == ["cls/caf\\xe9.png", "cls/ok.png"]
    with pytest.raises(PIL_ERRORS) as err:
        items[0].read()
    assert skip_reason(err.value) == "bad_name" and "caf\\xe9.png: its name is not UTF-8" in str(
        err.value)
    labelled = load_source({"source": "image-folder", "path": str(folder), "progress": False})
    assert len(labelled.labels) == 1 and labelled.skipped.counts == {"bad_name": 1}
    out = tmp_path / "shards"
    assert main(["data", "shard", "--data", str(folder), "--out", str(out), "--no-progress"]) == 0
    assert _shard_captions(out) == {"cls/ok.png": "a red square"}
    assert json.loads((out / "index.json").read_text())["skipped"]["counts"] == {"bad_name": 1}


@pytest.mark.parametrize("text, said", [
    ('{"photographer": "Ann",}', "metadata file not JSON (Expecting property name"),
    ("[1, 2]", "metadata file holds a JSON list, not an object")])
def test_a_metadata_file_that_is_no_json_object_skips_its_image_as_bad_metadata(tmp_path, text,
                                                                                 said):
    """A `NAME.json` with a trailing comma (or a list) was dropped unseen: the image indexed
    with metadata {} and nothing counted, while one not UTF-8 skips its image."""
    folder = tmp_path / "photos"
    _image(folder / "a.png")
    (folder / "a.txt").write_text("a red square", encoding="utf-8")
    (folder / "a.json").write_text(text, encoding="utf-8")
    _image(folder / "b.png")
    (folder / "b.txt").write_text("another", encoding="utf-8")
    (folder / "b.json").write_text('{"photographer": "Bo"}', encoding="utf-8")
    items = list(iter_items({"source": "image-folder", "path": str(folder)}))
    with pytest.raises(PIL_ERRORS) as err:
        items[0].read()
    assert skip_reason(err.value) == "bad_metadata"
    assert str(err.value).startswith(f"{folder / 'a.json'}: {said}")
    assert items[1].meta == {"photographer": "Bo"}


def test_a_sidecar_that_cannot_be_read_skips_its_image_saying_what_to_do(photos, tmp_path,
                                                                         monkeypatch, capsys):
    """A caption file with no read permission stopped data shard, curate and index (`error:
    ...: Permission denied`), where an unreadable image is skipped and counted."""
    from pathlib import Path

    locked = photos / "batch 1" / "b.txt"
    read_bytes = Path.read_bytes

    def denied(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)
    monkeypatch.setattr(Path, "read_bytes", denied)
    failed = {}
    for item in iter_items({"source": "image-folder", "path": str(photos)}):
        try:
            item.read()
        except PIL_ERRORS as err:
            failed[item.key] = (skip_reason(err), str(err))
    assert failed["batch 1/b.jpg"] == ("bad_caption", f"{locked}: caption file cannot be read "
                                       "(Permission denied); fix its permissions or remove it")
    assert main(["data", "shard", "--data", str(photos), "--out", str(tmp_path / "sh")]) == 0
    assert "batch 1/b.jpg" not in _shard_captions(tmp_path / "sh")
    assert "bad_caption=2" in capsys.readouterr().out
    failing = OSError(5, "Input/output error", str(locked))  # no permission to fix: the disk
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: (_ for _ in ()).throw(failing) if self == locked
                        else read_bytes(self))
    with pytest.raises(PIL_ERRORS, match=r"caption file cannot be read \(Input/output error\); "
                                         "check the disk it is on, or remove it$"):
        next(i for i in iter_items({"source": "image-folder", "path": str(photos)})
             if i.key == "batch 1/b.jpg").read()
