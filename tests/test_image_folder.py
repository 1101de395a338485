"""`image-folder` source: one sub-folder per class, corrupt files skipped and counted."""

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.data.image_folder import load_image_folder
from cliplab.data.sources import load_source
from cliplab.errors import DataError


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
    assert data.skipped.counts == {"unreadable_image": 1}
    assert data.skipped.keys["unreadable_image"] == [str(folder / "tabby_cat" / "broken.jpg")]
    assert data.templates == ["a photo of a {}."]


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


def test_a_class_folder_without_readable_images_is_told(folder, capsys):
    """An empty class folder stays a class (a zero-shot candidate) but is named on stderr:
    nothing of it is scored or learnt (eval ran over it without a word)."""
    (folder / "empty_class").mkdir()
    (folder / "broken_class").mkdir()
    (folder / "broken_class" / "x.jpg").write_bytes(b"not a jpeg")
    data = load_image_folder(folder, progress=False)
    assert data.classnames[:2] == ["broken class", "empty class"]
    assert "2 class folder(s) hold no readable image: broken_class, empty_class" in \
        capsys.readouterr().err
