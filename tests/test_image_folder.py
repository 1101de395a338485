"""`image-folder` source: one sub-folder per class, corrupt files skipped and counted."""

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.data.image_folder import load_image_folder
from cliplab.data.sources import load_source
from cliplab.errors import DataError
from tests.warned import warned


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "pets"
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((16, 12, 3), np.uint8)  # another size: resized to the common one
    blue[..., 2] = 255
    _write(root / "golden_retriever" / "a.png", red)
    _write(root / "golden_retriever" / "nested" / "b.png", red)
    _write(root / "tabby_cat" / "c.png", blue)
    (root / "tabby_cat" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "tabby_cat" / ".DS_Store").write_bytes(b"\0\0")
    (root / "notes.txt").write_text("not a class folder")
    return root


def test_classes_labels_and_skipped_files(folder):
    data = load_image_folder(folder, progress=False)
    assert data.classnames == ["golden retriever", "tabby cat"]
    assert data.labels.tolist() == [0, 0, 1]
    assert data.images.shape == (3, 8, 8, 3)
    assert data.images.dtype == torch.uint8
    assert data.images[0, 0, 0].tolist() == [255, 0, 0]
    assert data.images[2, 4, 4].tolist() == [0, 0, 255]  # resized, still blue
    assert data.skipped.counts == {"not_an_image": 1, "unreadable_image": 1}
    assert data.skipped.keys["unreadable_image"] == [str(folder / "tabby_cat" / "broken.jpg")]
    assert data.skipped.keys["not_an_image"] == [str(folder / "notes.txt")]
    assert data.templates == ["a photo of a {}."]


def test_every_file_is_an_image_or_counted(folder):
    """The shared file rule (`folder_files`): images by suffix in any case; a file that is no
    image, an image outside a class folder and a link to nothing are counted by path, never
    dropped unseen; captions beside images and the folder's own text files are not data."""
    blue = np.zeros((8, 8, 3), np.uint8)
    blue[..., 2] = 255
    _write(folder / "tabby_cat" / "d.PNG", blue)
    (folder / "tabby_cat" / "d.txt").write_text("a sleepy tabby")  # d.PNG's caption
    (folder / "tabby_cat" / "e").write_bytes((folder / "tabby_cat" / "c.png").read_bytes())
    _write(folder / "loose.png", blue)
    (folder / "golden_retriever" / "gone.png").symlink_to(folder / "nowhere.png")
    (folder / "templates.txt").write_text("a photo of a {}.\n")
    data = load_image_folder(folder, progress=False)
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert dict(data.skipped.counts) == {"not_an_image": 2, "unreadable_image": 1,
                                         "outside_class_folder": 1, "missing_file": 1}
    assert data.skipped.keys["not_an_image"] == [str(folder / "notes.txt"),
                                                 str(folder / "tabby_cat" / "e")]
    assert data.skipped.keys["outside_class_folder"] == [str(folder / "loose.png")]
    assert data.skipped.keys["missing_file"] == [str(folder / "golden_retriever" / "gone.png")]


def test_the_collection_reader_takes_the_same_images(folder):
    """index/curate read a folder as a collection: the same images as the labelled reader,
    the same files counted (as items whose read fails with the same reason), a caption file
    beside an image as its caption and a JSON file beside it as its metadata."""
    from cliplab.data.collection import PIL_ERRORS, iter_items, skip_reason

    (folder / "tabby_cat" / "c.txt").write_text(" a blue square \n")
    (folder / "tabby_cat" / "c.json").write_text('{"url": "http://x/c.png"}')
    (folder / "tabby_cat" / "e").write_bytes(b"no suffix")
    labelled = load_image_folder(folder, progress=False)
    read, failed = [], {}
    for item in iter_items({"source": "image-folder", "path": str(folder)}):
        try:
            item.read()
            read.append(item)
        except PIL_ERRORS as err:
            failed[item.key] = skip_reason(err)
    assert len(read) == len(labelled)
    assert failed == {"notes.txt": "not_an_image", "tabby_cat/broken.jpg": "unreadable_image",
                      "tabby_cat/e": "not_an_image"}
    assert {k for ks in labelled.skipped.keys.values() for k in ks} == \
        {str(folder / key) for key in failed}
    c = next(item for item in read if item.key == "tabby_cat/c.png")
    assert c.caption == "a blue square"
    assert c.meta == {"folder": "tabby_cat", "url": "http://x/c.png"}
    a = next(item for item in read if item.key == "golden_retriever/a.png")
    assert a.caption == "golden retriever"


def test_image_size_classnames_and_templates_files(folder):
    (folder / "classnames.txt").write_text("dog\ncat\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a {c}.\na photo of a {c}.\n")
    data = load_source({"source": "image-folder", "path": str(folder), "image_size": 4,
                        "progress": False})
    assert data.classnames == ["dog", "cat"]
    assert data.templates == ["a {}.", "a photo of a {}."]
    assert data.images.shape == (3, 4, 4, 3)


def test_folder_errors_name_the_path(tmp_path, folder):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path / "empty")
    (folder / "classnames.txt").write_text("only one\n")
    with pytest.raises(DataError, match="classnames.txt: 1 class names for 2 class folders"):
        load_image_folder(folder, progress=False)
    bad = tmp_path / "bad" / "x"
    bad.mkdir(parents=True)
    (bad / "y.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable image in 1 files"):
        load_image_folder(tmp_path / "bad", progress=False)


def test_a_class_folder_without_readable_images_is_told(folder, recwarn):
    """An empty class folder stays a class (a zero-shot candidate) but is named on stderr:
    nothing of it is scored or learnt (eval ran over it without a word)."""
    (folder / "empty_class").mkdir()
    (folder / "broken_class").mkdir()
    (folder / "broken_class" / "x.jpg").write_bytes(b"not a jpeg")
    data = load_image_folder(folder, progress=False)
    assert data.classnames[:2] == ["broken class", "empty class"]
    assert "2 class folder(s) hold no readable image: broken_class, empty_class" in \
        warned(recwarn)


def test_linked_folders_uppercase_captions_and_jpe_files_count_the_same_in_both_readers(
        folder, tmp_path):
    """A class folder holding a link to another folder of images, a `.jpe` JPEG and an
    upper-case `NAME.TXT` caption: both readers take the linked images (each real folder once,
    a link loop ends), the `.jpe`, and the caption; nothing is dropped without a count."""
    from cliplab.data.collection import iter_items

    extra = tmp_path / "extra"
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    _write(extra / "e1.png", red)
    (folder / "golden_retriever" / "more").symlink_to(extra, target_is_directory=True)
    (extra / "loop").symlink_to(extra, target_is_directory=True)
    Image.fromarray(red).save(folder / "golden_retriever" / "c.jpe", format="JPEG")
    (folder / "golden_retriever" / "c.TXT").write_text("a red square")
    labelled = load_image_folder(folder, progress=False)
    assert labelled.labels.tolist() == [0, 0, 0, 0, 1]  # a, c.jpe, more/e1, nested/b; tabby c
    items = {item.key: item for item in iter_items({"source": "image-folder",
                                                    "path": str(folder)})}
    assert {"golden_retriever/more/e1.png", "golden_retriever/c.jpe"} <= set(items)
    assert items["golden_retriever/c.jpe"].caption == "a red square"
    assert not any(k.endswith(".TXT") for k in items)


def test_a_hidden_folder_is_no_class(folder):
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    _write(folder / ".hidden" / "x.png", red)
    data = load_image_folder(folder, progress=False)
    assert data.classnames == ["golden retriever", "tabby cat"]
    assert data.labels.tolist() == [0, 0, 1]


def test_more_class_names_than_folders_is_an_error(folder):
    (folder / "classnames.txt").write_text("dog\ncat\nowl\n")
    with pytest.raises(DataError, match="classnames.txt: 3 class names for 2 class folders "
                                        r"\(golden_retriever, tabby_cat\); give one name per folder"):
        load_image_folder(folder, progress=False)


def test_a_link_back_to_the_root_or_into_another_class_is_not_read_as_this_class(folder):
    """A link inside a class folder to the dataset's root, to another class folder or into one
    would label that class's images as this class too (they were read twice, once mislabelled):
    it is not followed, and each image keeps its own class once."""
    from cliplab.data.image_folder import list_class_folder

    (folder / "golden_retriever" / "up").symlink_to(folder, target_is_directory=True)
    (folder / "golden_retriever" / "cats").symlink_to(folder / "tabby_cat",
                                                       target_is_directory=True)
    (folder / "tabby_cat" / "deeper").mkdir()
    _write(folder / "tabby_cat" / "deeper" / "d.png", np.zeros((8, 8, 3), np.uint8))
    (folder / "golden_retriever" / "deep").symlink_to(folder / "tabby_cat" / "deeper",
                                                       target_is_directory=True)
    (folder / "tabby_cat" / "dogs").symlink_to(folder / "golden_retriever" / "nested",
                                               target_is_directory=True)
    files = list_class_folder(folder).files
    assert [(label, str(f.relative_to(folder))) for label, f in files] == [
        (0, "golden_retriever/a.png"), (0, "golden_retriever/nested/b.png"),
        (1, "tabby_cat/broken.jpg"), (1, "tabby_cat/c.png"), (1, "tabby_cat/deeper/d.png")]
    assert load_image_folder(folder, progress=False).labels.tolist() == [0, 0, 1, 1]


def test_a_linked_class_folder_and_a_folder_linked_from_outside_are_still_read(folder, tmp_path):
    """What the loop rule must not stop: a class folder that is itself a link (even to another
    class's folder: both classes read it, as before) and a linked folder outside the root."""
    from cliplab.data.image_folder import list_class_folder

    outside = tmp_path / "outside"
    _write(outside / "o.png", np.zeros((8, 8, 3), np.uint8))
    (folder / "tabby_cat" / "more").symlink_to(outside, target_is_directory=True)
    (folder / "tabby_kitten").symlink_to(folder / "tabby_cat", target_is_directory=True)
    labels = [label for label, _ in list_class_folder(folder).files]
    assert labels == [0, 0, 1, 1, 1, 2, 2, 2]  # kitten: broken.jpg, c.png, more/o.png


def test_a_caption_or_metadata_file_with_a_mixed_case_suffix_is_read(folder):
    """`a.Txt` / `b.Json` were counted as sidecars (not skipped) but never read: the caption
    silently became the folder's name. Any case of the suffix is read, as `.txt` and `.TXT`."""
    from cliplab.data.collection import iter_items

    cats = folder / "tabby_cat"
    (cats / "c.Txt").write_text("a blue square", encoding="utf-8")
    (cats / "c.Json").write_text('{"source": "camera"}', encoding="utf-8")
    items = {item.key: item for item in iter_items({"source": "image-folder",
                                                    "path": str(folder)})}
    assert items["tabby_cat/c.png"].caption == "a blue square"
    assert items["tabby_cat/c.png"].meta["source"] == "camera"
    (cats / "c.Txt").unlink()  # the folder changed: not the caption it had
    items = {item.key: item for item in iter_items({"source": "image-folder",
                                                    "path": str(folder)})}
    assert items["tabby_cat/c.png"].caption == "tabby cat"


def test_a_folder_reached_by_links_too_is_read_by_its_own_path(tmp_path):
    """A folder and two links to it: which path was read (its key and caption) followed the
    order the file system lists entries in. Its own path wins; among links only, the first
    in sorted order."""
    from cliplab.data.collection import iter_items

    root = tmp_path / "lnk"
    _write(root / "real" / "p.png", np.zeros((8, 8, 3), np.uint8))
    for name in ("alias", "zz"):
        (root / name).symlink_to(root / "real", target_is_directory=True)
    spec = {"source": "image-folder", "path": str(root)}
    assert [(item.key, item.caption) for item in iter_items(spec)] == [("real/p.png", "real")]
    outside = tmp_path / "outside"
    _write(outside / "q.png", np.zeros((8, 8, 3), np.uint8))
    for name in ("zb", "za"):
        (root / name).symlink_to(outside, target_is_directory=True)
    assert [item.key for item in iter_items(spec)] == ["real/p.png", "za/q.png"]


def test_class_names_and_templates_saved_with_a_byte_order_mark_read_as_written(folder):
    """Windows Notepad writes a byte-order mark: it was part of the first class name
    ("\ufeffdog", so `classes: [dog]` was refused as unknown) and the first template."""
    (folder / "classnames.txt").write_bytes(b"\xef\xbb\xbfdog\r\ncat\r\n")
    (folder / "templates.txt").write_bytes(b"\xef\xbb\xbfa photo of a {c}.\r\n")
    data = load_source({"source": "image-folder", "path": str(folder), "image_size": 4,
                        "classes": ["dog"], "progress": False})
    assert data.classnames == ["dog"] and data.templates == ["a photo of a {}."]


def test_class_folders_sharing_a_name_are_warned_about(folder, recwarn):
    """`a_b/` and `a b/` (or WordNet's two "crane"s in classnames.txt) passed silently: two
    identical zero-shot prompts, the second class never winning."""
    (folder / "tabby cat").mkdir()
    _write(folder / "tabby cat" / "d.png", np.zeros((8, 8, 3), np.uint8))
    data = load_image_folder(folder, image_size=4, progress=False)
    assert data.classnames == ["golden retriever", "tabby cat", "tabby cat"]
    err = warned(recwarn)
    assert ": 1 class name(s) name several class folders ('tabby cat': tabby cat, " \
           "tabby_cat): zero-shot cannot tell them apart" in err
    (folder / "classnames.txt").write_text("dog\ncat\nkitten\n")
    load_image_folder(folder, image_size=4, progress=False)
    assert "several class folders" not in warned(recwarn)


def test_the_link_rule_keeps_a_class_folders_own_sub_folders_whatever_links_beside(tmp_path):
    """The review's cases: a link at the root to the root itself made every real sub-folder of
    a class "inside another class" (cat/sub/b.png dropped, uncounted); a class folder linked
    into a pool lost its own sub-folder to a sibling class linked to the whole pool."""
    from cliplab.data.image_folder import list_class_folder

    def listed(root):
        return [(label, str(f.relative_to(root))) for label, f in list_class_folder(root).files]

    root = tmp_path / "s6"
    for name in ("cat/a.png", "cat/sub/b.png", "dog/c.png"):
        _write(root / name, np.zeros((8, 8, 3), np.uint8))
    (root / "current").symlink_to(root, target_is_directory=True)
    assert [f for label, f in listed(root) if label in (0, 2)] == [
        "cat/a.png", "cat/sub/b.png", "dog/c.png"]
    pool, root = tmp_path / "pool", tmp_path / "s5"
    for name in ("dogs/a.png", "dogs/sub/b.png"):
        _write(pool / name, np.zeros((8, 8, 3), np.uint8))
    _write(root / "cat" / "a.png", np.zeros((8, 8, 3), np.uint8))
    (root / "animals").symlink_to(pool, target_is_directory=True)
    (root / "dogs").symlink_to(pool / "dogs", target_is_directory=True)
    assert [(label, f) for label, f in listed(root) if label == 2] == [
        (2, "dogs/a.png"), (2, "dogs/sub/b.png")]


def test_a_class_folder_named_in_another_encoding_is_refused_in_one_line(tmp_path):
    """Its name is the class name: data shard failed with a UnicodeEncodeError traceback."""
    import os

    root = tmp_path / "lat"
    _write(root / "dog" / "c.png", np.zeros((8, 8, 3), np.uint8))
    os.makedirs(os.fsencode(root) + b"/caf\xe9")
    with pytest.raises(DataError, match=r"lat: class folder caf\\xe9 is named in another "
                                        "encoding than UTF-8; rename it"):
        load_image_folder(root, progress=False)


def test_listing_many_class_folders_stays_linear(tmp_path, monkeypatch):
    """Each class folder's listing took every other class folder's real path: 1000 classes
    made a million realpath calls (25 s, was 0.07 s). Real paths are taken once per folder."""
    import os

    from cliplab.data import folder_files
    from cliplab.data.image_folder import list_class_folder

    for i in range(200):
        (tmp_path / "many" / f"c{i:03d}").mkdir(parents=True)
        (tmp_path / "many" / f"c{i:03d}" / "a.jpg").write_bytes(b"")
    calls = []
    real = os.path.realpath
    monkeypatch.setattr(folder_files.os.path, "realpath",
                        lambda path: calls.append(path) or real(path))
    assert len(list_class_folder(tmp_path / "many").files) == 200
    assert len(calls) <= 4 * 200  # (the old listing: 200 * 200)
