"""Class folders whose names differ only in case or spacing (``Dog/`` and ``dog/``), or that
read as one name (``hot_dog/`` and ``hot dog/``): told of, never picked by a guess, never
merged in the results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from cliplab.data.image_folder import load_image_folder
from cliplab.data.sources import load_source
from cliplab.errors import ConfigError, DataError
from cliplab.evaluate.suite import run_suite
from cliplab.evaluate.tasks import TaskContext
from cliplab.evaluate.zeroshot import zeroshot_classifier
from tests.warned import warned

COLOURS = ("red", "green", "blue", "yellow", "white", "black", "cyan")


def class_folder(root: Path, names: list[str], per_class: int = 2) -> Path:
    """``root`` with a folder per name in ``names`` holding ``per_class`` small PNGs of its own
    colour; returns ``root``."""
    for name, colour in zip(names, COLOURS):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), colour).save(root / name / f"{i}.png")
    return root


def test_names_alike_but_for_case_or_spacing_are_warned_about(tmp_path, recwarn, tiny_model):
    """``Dog/`` and ``dog/`` are two classes whose prompts a lowercasing tokenizer reads as
    one (their head rows were the same, cosine 1.0), and prompts collapse spaces; only names
    equal as written were told of."""
    root = class_folder(tmp_path / "f", ["Dog", "dog", "cat", "spaced  name", "spaced name"])
    data = load_image_folder(root, progress=False)
    assert data.classnames == ["Dog", "cat", "dog", "spaced  name", "spaced name"]
    err = warned(recwarn)
    assert (f"image folder {root}: 2 class name(s) name several class folders but for case or "
            "spacing ('Dog' / 'dog': Dog, dog; 'spaced  name' / 'spaced name': spaced  name, "
            "spaced name): zero-shot may not (a lowercasing tokenizer cannot) tell them apart; "
            "give them distinct names in classnames.txt") in err
    head = zeroshot_classifier(tiny_model, data.classnames, ["a photo of a {}."], progress=False)
    assert torch.allclose(head[0], head[2]) and torch.allclose(head[3], head[4])
    (root / "classnames.txt").write_text("big dog\ncat\nsmall dog\nx\ny\n", encoding="utf-8")
    load_image_folder(root, progress=False)
    assert "several class folders" not in warned(recwarn)


def test_names_the_same_as_written_keep_their_warning(tmp_path, recwarn):
    root = class_folder(tmp_path / "f", ["hot_dog", "hot dog", "Cat", "cat"])
    load_image_folder(root, progress=False)
    err = warned(recwarn).splitlines()
    assert f"image folder {root}: 1 class name(s) name several class folders ('hot dog': " \
           "hot dog, hot_dog): zero-shot cannot tell them apart; give them distinct names in " \
           "classnames.txt" in err
    assert any("but for case or spacing ('Cat' / 'cat': Cat, cat)" in line for line in err)


def test_classes_prefers_the_exact_name_and_refuses_a_guess(tmp_path):
    """``classes: [dog, cat]`` on ``Dog/``, ``dog/``, ``cat/`` selected ``Dog`` (the first
    match in any case); ``DOG`` matches both only in another case: refused, naming them."""
    root = class_folder(tmp_path / "f", ["Dog", "dog", "cat"])
    spec = {"source": "image-folder", "path": str(root), "progress": False}
    data = load_source({**spec, "classes": ["dog", "cat"]})
    assert data.classnames == ["dog", "cat"]
    assert sorted(data.keys) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    assert load_source({**spec, "classes": ["Dog", "cat"]}).keys[0].startswith("Dog/")
    assert load_source({**spec, "classes": ["CAT", "dog"]}).classnames == ["cat", "dog"]
    for key in ("classes", "holdout"):
        with pytest.raises(DataError, match=rf"^data.test: {key}: 'DOG' matches 2 classes only "
                                            r"in another case \('Dog', 'dog'\); give the one "
                                            r"meant as it is written$"):
            load_source({**spec, key: ["DOG", "cat"]}, where="data.test")
    held = load_source({**spec, "holdout": ["dog"]})
    assert sorted({k.split("/")[0] for k in held.keys}) == ["Dog", "cat"]


def test_zeroshot_classes_refuse_a_guess_naming_the_key_once(tmp_path, tiny_model):
    root = class_folder(tmp_path / "f", ["Dog", "dog", "cat"])
    task = {"name": "zs", "task": "zeroshot",
            "data": {"source": "image-folder", "path": str(root)}, "classes": ["DOG", "cat"]}
    with pytest.raises(ConfigError, match=r"^tasks\[0\] \(name 'zs'\): classes: 'DOG' matches "
                                          r"2 classes only in another case \('Dog', 'dog'\)"):
        run_suite(tiny_model, {"tasks": [task]}, TaskContext(progress=False))
