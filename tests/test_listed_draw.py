"""A few-shot draw from an image folder or a manifest decodes the images it draws, not the
whole set (16 shots from an ImageNet-sized folder decoded 1.3 million images first), and draws
exactly what `sample_k_shot` draws from the whole decoded set."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.adapt.run import few_shot_split
from cliplab.cli import main
from cliplab.data.listed import ListedImages, ShotDraws, list_source
from cliplab.data.sources import load_source
from cliplab.evaluate.few_shot import sample_k_shot
from cliplab.models.preprocess import PreprocessConfig
from tests.image_folders import counting_decodes
from tests import test_adapt_cli

model_dir = test_adapt_cli.model_dir  # the fixture: a saved tiny-clip folder
CLASSES = ("ant", "bee", "cat", "dog")


def _folder(root, per_class=(5, 7, 4, 6), size=(30, 40)):
    """Class folders of distinct noise images (``per_class`` each), sizes alternating."""
    g = np.random.default_rng(0)
    for c, n in zip(CLASSES, per_class):
        (root / c).mkdir(parents=True)
        for i in range(n):
            h, w = size if i % 2 else size[::-1]
            Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("model_input", [None, PreprocessConfig(image_size=24)])
def test_a_draw_decodes_only_what_it_draws_and_equals_sample_k_shot(tmp_path, monkeypatch,
                                                                     model_input):
    root = _folder(tmp_path / "pets")
    spec = {"source": "image-folder", "path": str(root), "progress": False}
    whole = load_source(spec, model_input=model_input)
    calls = counting_decodes(monkeypatch)
    listed = list_source(spec, model_input=model_input)
    assert isinstance(listed, ListedImages) and calls == []  # listing decodes nothing
    assert listed.deferred == len(whole) == 22
    assert torch.equal(listed.data.labels, whole.labels)
    drawn, index = ShotDraws(listed, progress=False).draw(3, seed=5)
    assert len(calls) == 3 * len(CLASSES)  # the drawn files only
    want = sample_k_shot(whole.labels, 3, 5)
    assert torch.equal(index, want)
    assert drawn.keys == [whole.keys[i] for i in want.tolist()]
    assert torch.equal(drawn.images, whole.images[want])  # fitted to the model as a whole load
    assert torch.equal(drawn.labels, whole.labels[want])
    assert drawn.classnames == whole.classnames and drawn.templates == whole.templates


def test_the_split_with_validation_equals_the_whole_sets(tmp_path):
    root = _folder(tmp_path / "pets", per_class=(6, 6, 6, 6), size=(20, 20))
    spec = {"source": "image-folder", "path": str(root), "progress": False}
    whole = load_source(spec)
    train, val = few_shot_split(list_source(spec), 2, 3, seed=1)
    want_train, want_val = few_shot_split(whole, 2, 3, seed=1)
    assert train.keys == want_train.keys and val.keys == want_val.keys
    assert torch.equal(train.images, want_train.images) and torch.equal(val.images,
                                                                         want_val.images)
    assert not set(train.keys) & set(val.keys)
    # and in memory, the split is the one sample_k_shot drew before (one code path for both):
    # the shots, then val_shots among the rest with the next seed
    want = sample_k_shot(whole.labels, 2, 1)
    assert torch.equal(want_train.images, whole.images[want])
    rest = torch.ones(len(whole), dtype=torch.bool)
    rest[want] = False
    pool = rest.nonzero().flatten()
    old_val = pool[sample_k_shot(whole.labels[pool], 3, 2)]
    assert want_val.keys == [whole.keys[i] for i in old_val.tolist()]


def test_an_unreadable_drawn_file_is_counted_once_and_replaced(tmp_path, monkeypatch):
    root = _folder(tmp_path / "pets", per_class=(4, 4, 4, 4), size=(20, 20))
    spec = {"source": "image-folder", "path": str(root), "progress": False}
    listed = list_source(spec)
    order = sample_k_shot(listed.data.labels, 4, 3)  # every file, so the first drawn of ant:
    g = torch.Generator().manual_seed(3)
    first = torch.randperm(4, generator=g)[0].item()  # ant's first candidate in seeded order
    bad = root / "ant" / f"{first}.png"
    bad.write_bytes(b"not a png")
    assert len(order) == 16
    draws = ShotDraws(list_source(spec), progress=False)
    train, index = draws.draw(2, seed=3)
    assert torch.bincount(train.labels).tolist() == [2, 2, 2, 2]  # ant still has 2
    assert f"ant/{first}.png" not in train.keys
    # named as a whole load names it
    assert dict(draws.skipped.keys) == {"unreadable_image": [str(bad)]}
    assert draws.decoded == 9 and int(draws.unreadable.sum()) == 1
    calls = counting_decodes(monkeypatch)
    taken = torch.zeros(len(listed), dtype=torch.bool)
    taken[index] = True
    val, _ = draws.draw(2, seed=4, exclude=taken)  # the bad file is not tried again
    assert str(bad) not in calls and draws.skipped.counts["unreadable_image"] == 1
    assert torch.bincount(val.labels).tolist() == [1, 2, 2, 2]  # ant: 3 readable, 2 taken
    assert not set(val.keys) & set(train.keys)


def test_a_seeds_smaller_draws_are_its_first_picks_and_decode_nothing(tmp_path, monkeypatch):
    """`indices` of a smaller k after a draw of the seed: `sample_k_shot`'s picks, none
    decoded again; with an unreadable file, a draw is the same whatever was drawn before."""
    root = _folder(tmp_path / "pets", per_class=(6, 6, 6, 6), size=(20, 20))
    spec = {"source": "image-folder", "path": str(root), "progress": False}
    draws = ShotDraws(list_source(spec), progress=False)
    _, top = draws.draw(4, seed=2)
    calls = counting_decodes(monkeypatch)
    for k in (1, 2, 4):
        picks = draws.indices(k, seed=2)
        assert torch.equal(picks, sample_k_shot(draws.listed.data.labels, k, 2))
        assert set(picks.tolist()) <= set(top.tolist())
    assert calls == []
    (root / "bee" / "3.png").write_bytes(b"not a png")
    fresh = ShotDraws(list_source(spec), progress=False)
    alone = fresh.draw(3, seed=7)[1]
    after = ShotDraws(list_source(spec), progress=False)
    after.draw(6, seed=1)  # finds the broken file first
    assert int(after.unreadable.sum()) == 1
    assert torch.equal(after.draw(3, seed=7)[1], alone)
    assert torch.equal(after.indices(3, seed=7), alone)


def test_a_manifest_is_listed_and_drawn_as_a_whole_load_draws(tmp_path):
    root = _folder(tmp_path / "pets", per_class=(3, 3, 3, 3), size=(20, 20))
    rows = [f"{c}/{i}.png,{c}" for c in CLASSES for i in range(3)]
    rows.insert(4, "gone.png,ant")  # a missing file: known at listing, as in a whole load
    manifest = root / "m.csv"
    manifest.write_text("image,label\n" + "\n".join(rows) + "\n")
    spec = {"source": "manifest", "path": str(manifest), "progress": False}
    whole = load_source(spec)
    listed = list_source(spec)
    assert isinstance(listed, ListedImages) and listed.deferred == len(whole) == 12
    assert dict(listed.data.skipped.counts) == dict(whole.skipped.counts) == {"missing_file": 1}
    drawn, index = ShotDraws(listed, progress=False).draw(2, seed=0)
    want = sample_k_shot(whole.labels, 2, 0)
    assert drawn.keys == [whole.keys[i] for i in want.tolist()]
    assert torch.equal(drawn.images, whole.images[want])


def test_sources_that_are_not_files_and_shifts_load_whole(tmp_path):
    digits = list_source({"source": "digits", "split": "test"})
    assert not isinstance(digits, ListedImages) and len(digits) == 540
    root = _folder(tmp_path / "pets", per_class=(2, 2, 2, 2), size=(20, 20))
    shifted = list_source({"source": "image-folder", "path": str(root), "shift": "invert",
                           "progress": False})
    assert not isinstance(shifted, ListedImages)  # a shift is of the whole set's pixels
    assert shifted.images.shape == (8, 20, 20, 3)


def test_adapt_decodes_the_shots_and_scores_as_a_whole_load(model_dir, tmp_path, monkeypatch,
                                                             capsys):
    import cliplab.adapt.run as run
    train = _folder(tmp_path / "train", per_class=(8, 8, 8, 8), size=(24, 32))
    test = _folder(tmp_path / "test", per_class=(2, 2, 2, 2), size=(24, 32))
    (train / "dog" / "9.png").write_bytes(b"broken")
    args = ["adapt", "--method", "linear-probe", "--model", str(model_dir), "--no-progress",
            f"data.train={{source: image-folder, path: {train}}}",
            f"data.test={{source: image-folder, path: {test}}}", "shots=2", "seed=0"]
    calls = counting_decodes(monkeypatch)
    assert main([*args, "--out", str(tmp_path / "listed")]) == 0
    decoded_train = [c for c in calls if c.startswith(str(train))]
    assert len(decoded_train) in (8, 9)  # 2 per class, and the broken file if it was drawn
    monkeypatch.setattr(run, "list_source", load_source)  # the whole set decoded first
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    listed = json.loads((tmp_path / "listed" / "results.json").read_text())
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert listed["test"] == whole["test"] and listed["train_size"] == whole["train_size"] == 8


def test_adapt_tells_what_its_draw_skipped_and_how_much_it_decoded(model_dir, tmp_path, capsys):
    train = _folder(tmp_path / "train", per_class=(3, 3, 3, 3), size=(20, 20))
    for c in CLASSES:  # every file of every class is broken but one: each draw finds them
        for i in (1, 2):
            (train / c / f"{i}.png").write_bytes(b"broken")
    test = _folder(tmp_path / "test", per_class=(2, 2, 2, 2), size=(20, 20))
    out = tmp_path / "run"
    assert main(["adapt", "--method", "linear-probe", "--model", str(model_dir),
                 "--no-progress", f"data.train={{source: image-folder, path: {train}}}",
                 f"data.test={{source: image-folder, path: {test}}}", "shots=2",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    # every file was decoded: nothing more to say
    assert f"data.train: skipped 8 of 12 samples (unreadable_image=8) in {train}\n" in err
    assert "4 class(es) have fewer than shots=2 training images" in err
    results = json.loads((out / "results.json").read_text())
    assert results["skipped"]["train"]["counts"] == {"unreadable_image": 8}
    assert results["train_size"] == 4


def test_adapt_draws_val_shots_from_its_own_validation_folder_decoding_only_those(
        model_dir, tmp_path, monkeypatch):
    train = _folder(tmp_path / "train", per_class=(4, 4, 4, 4), size=(20, 20))
    val = _folder(tmp_path / "val", per_class=(6, 6, 6, 6), size=(20, 20))
    test = _folder(tmp_path / "test", per_class=(2, 2, 2, 2), size=(20, 20))
    calls = counting_decodes(monkeypatch)
    out = tmp_path / "run"
    assert main(["adapt", "--method", "tip-adapter", "--model", str(model_dir), "--no-progress",
                 f"data.train={{source: image-folder, path: {train}}}",
                 f"data.test={{source: image-folder, path: {test}}}",
                 f"data.val={{source: image-folder, path: {val}}}", "shots=2", "val_shots=1",
                 "options.search=true", "--out", str(out)]) == 0
    assert len([c for c in calls if c.startswith(str(val))]) == 4  # 1 per class
    assert len([c for c in calls if c.startswith(str(train))]) == 8
    assert json.loads((out / "results.json").read_text())["val_size"] == 4


def test_adapt_tells_how_many_listed_files_its_draw_left_unread(model_dir, tmp_path, capsys):
    train = _folder(tmp_path / "train", per_class=(4, 4, 4, 4), size=(20, 20))
    for c in CLASSES:  # one readable file a class: the draw decodes until it finds it
        for i in (0, 1, 2):
            (train / c / f"{i}.png").write_bytes(b"broken")
    test = _folder(tmp_path / "test", per_class=(2, 2, 2, 2), size=(20, 20))
    assert main(["adapt", "--method", "linear-probe", "--model", str(model_dir),
                 "--no-progress", f"data.train={{source: image-folder, path: {train}}}",
                 f"data.test={{source: image-folder, path: {test}}}", "shots=1",
                 "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    found = re.search(r"data.train: skipped (\d+) of 16 samples \(unreadable_image=(\d+)\) in "
                      r".*; (\d+) of its 16 listed files were decoded for the draw, the others "
                      r"not read", err)
    assert found, err
    lost, decoded = int(found[1]), int(found[3])
    assert found[1] == found[2] and decoded == lost + 4 and decoded < 16

