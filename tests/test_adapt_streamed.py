"""`cliplab adapt` streams a scored image folder (data.test, data.shifted: decoded and encoded
a batch at a time, `cliplab.adapt.scored`), with the results, skip lines and results.json keys
of the whole load; the zero-shot comparison and an adapter keeping the image tower decode it
once; WiSE-FT's sweep holds its sets whole."""

import pytest

import cliplab.evaluate.streamed as streamed
from cliplab.adapt import get_method
from cliplab.adapt.run import checked_config, load_sets, run_adapt
from cliplab.adapt.scored import ListedSet
from cliplab.data.digits import load_digits
from cliplab.errors import DataError
from tests.image_folders import counting_decodes, digits_folder, pets_folder

CLASSES = ["zero", "one", "two"]
TRAIN = {"steps": 2, "batch_size": 6}  # the methods that train: a couple of steps


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``train``: 30 digits (0-2) at 24 px; ``test``: 30 others with a corrupt file among
    them; ``shifted``: 20 more."""
    root = tmp_path_factory.mktemp("digits")
    data = load_digits("test", image_size=24)
    keep = (data.labels < 3).nonzero().flatten()
    parts = {"train": keep[:30], "test": keep[30:60], "shifted": keep[60:80]}
    bad = {"test": "one/015_bad.png"}
    return {name: digits_folder(root / name, data.images[idx], data.labels[idx], CLASSES,
                                bad.get(name))
            for name, idx in parts.items()}


def _config(folders, method, options=None):
    data = {name: {"source": "image-folder", "path": str(path)}
            for name, path in folders.items()}
    return {"method": method, "data": data, "shots": 4, "options": options or {}}


def _run(model_dir, cfg, capsys):
    res = run_adapt({**cfg, "model": str(model_dir)}, progress=False, write=False)
    err = capsys.readouterr().err.splitlines()
    res = {k: v for k, v in res.items() if k not in ("adapter", "wall_time_s")}
    return res, sorted(line for line in err if "skipped" in line)


@pytest.mark.parametrize("method, options, test_decodes", [
    ("zeroshot", None, 1),
    ("linear-probe", None, 1),  # the comparison's features serve the adapter's score
    ("linear-probe", {"features": "tokens"}, 1),  # streamed with the probe's features
    ("tip-adapter", None, 1),
    ("coop", {"epochs": 2, "batch_size": 6}, 1),  # the text side trains: the image tower kept
    ("finetune", {"train": TRAIN}, 2),  # its image tower trained: the second pass is new
    ("lora", {"train": TRAIN}, 2),
])
def test_streamed_scores_equal_the_whole_loads(method, options, test_decodes, folders,
                                               tiny_model_dir, capsys, monkeypatch, stacked):
    monkeypatch.setattr(streamed, "STREAM_BATCH", 8)  # several batches of the 30 readable
    cfg = _config(folders, method, options)
    module = get_method(method)
    monkeypatch.setattr(module, "SCORED_WHOLE", True, raising=False)  # the whole load
    whole, whole_err = _run(tiny_model_dir, cfg, capsys)
    assert stacked[0] == 30  # the readable test images held together
    monkeypatch.delattr(module, "SCORED_WHOLE")
    stacked[0] = 0
    decodes = counting_decodes(monkeypatch)
    got, err = _run(tiny_model_dir, cfg, capsys)
    assert stacked[0] == 12  # only the training shots: 4 of each class
    test = [p for p in decodes if p.startswith(str(folders["test"]))]
    assert len(test) == 1 + 31 * test_decodes  # (one tried before training: readable)
    bad = str(folders["test"] / "one" / "015_bad.png")
    assert got["skipped"] == {"test": {"total": 1, "counts": {"unreadable_image": 1},
                                       "keys": {"unreadable_image": [bad]}}}
    assert got["test_size"] == got["test"]["n"] == 30 and got["shifted"]["n"] == 20
    assert err == whole_err == [f"data.test: skipped 1 of 31 samples (unreadable_image=1) in "
                                f"{folders['test']}"]
    assert list(got) == list(whole) and got == whole


def test_wise_ft_holds_its_sets_whole(folders):
    """Its sweep scores every set with each α's model: streamed, each set would be decoded
    once per α."""
    assert get_method("wise-ft").SCORED_WHOLE
    config, _ = checked_config({**_config(folders, "wise-ft"), "model": "tiny-clip"})
    _, whole = load_sets(config, progress=False, stream=False)
    _, listed = load_sets(config, progress=False, stream=True)
    assert not any(isinstance(s, ListedSet) for s in whole.values())
    assert all(isinstance(s, ListedSet) for s in listed.values())
    assert [len(s) for s in listed.values()] == [31, 20]  # listed: the corrupt file counts


def test_a_listed_test_set_of_other_classes_is_refused_before_training(
        folders, tmp_path, tiny_model_dir, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("refused before training")

    monkeypatch.setattr(get_method("finetune"), "fit", no_training)
    other = {**folders, "test": pets_folder(tmp_path / "pets", per_class=2, broken_in="cat")}
    with pytest.raises(DataError, match="data.test"):
        run_adapt({**_config(other, "finetune", {"train": TRAIN}), "model": str(tiny_model_dir)},
                  progress=False, write=False)


@pytest.mark.parametrize("key, compare", [("test", True), ("test", False),
                                          ("shifted", True)])
def test_a_scored_folder_with_no_readable_image_fails_as_its_whole_load(
        key, compare, folders, tmp_path, tiny_model_dir, monkeypatch):
    """Refused before training (its files tried until one decodes), with the whole load's
    words, whether or not the zero-shot comparison streams it first."""
    def no_training(*args, **kwargs):
        raise AssertionError("refused before training")

    monkeypatch.setattr(get_method("linear-probe"), "fit", no_training)
    unreadable = tmp_path / "unreadable"
    for name in CLASSES:
        (unreadable / name).mkdir(parents=True)
        (unreadable / name / "bad.png").write_bytes(b"not a png")
    cfg = {**_config({**folders, key: unreadable}, "linear-probe"),
           "model": str(tiny_model_dir), "compare_zeroshot": compare}
    with pytest.raises(DataError) as err:
        run_adapt(cfg, progress=False, write=False, where="adapt.yaml")
    assert str(err.value) == (f"adapt.yaml: data.{key}: image folder {unreadable}: no "
                              "readable image in 3 files (skipped 3 samples: "
                              "unreadable_image=3)")


def test_a_readable_set_costs_one_decode_before_training(folders, tiny_model_dir, monkeypatch):
    """The check before training stops at the first file that decodes."""
    config, _ = checked_config({**_config(folders, "linear-probe"),
                                "model": str(tiny_model_dir)})
    decodes = counting_decodes(monkeypatch)
    load_sets(config, progress=False, stream=True)
    assert len([p for p in decodes if p.startswith(str(folders["test"]))]) == 1


def test_the_test_sets_skip_line_is_told_before_training(folders, tiny_model_dir, capsys,
                                                          monkeypatch):
    """Once the zero-shot comparison has read it: a training that fails still leaves it."""
    def failing_fit(*args, **kwargs):
        raise DataError("training failed")

    monkeypatch.setattr(get_method("linear-probe"), "fit", failing_fit)
    with pytest.raises(DataError, match="training failed"):
        run_adapt({**_config(folders, "linear-probe"), "model": str(tiny_model_dir)},
                  progress=False, write=False)
    assert [line for line in capsys.readouterr().err.splitlines() if "skipped" in line] == [
        f"data.test: skipped 1 of 31 samples (unreadable_image=1) in {folders['test']}"]


def test_a_set_that_must_be_loaded_whole_is_streamed_in_vain_once(folders, tmp_path,
                                                                  tiny_model_dir, monkeypatch):
    """A class whose every file is unreadable: its first scoring streams it, finds it must be
    loaded whole (as the whole load warns of the class), and loads it so; the adapter's
    scoring then loads it whole at once."""
    test = tmp_path / "test"
    for path in folders["test"].rglob("*.png"):
        target = test / path.relative_to(folders["test"])
        target.parent.mkdir(parents=True, exist_ok=True)
        unreadable = path.parent.name == "two"
        target.write_bytes(b"not a png" if unreadable else path.read_bytes())
    readable = len([p for p in test.rglob("*.png") if p.parent.name != "two"])
    files = len(list(test.rglob("*.png")))
    decodes = counting_decodes(monkeypatch)
    with pytest.warns(UserWarning):
        run_adapt({**_config({**folders, "test": test}, "linear-probe"),
                   "model": str(tiny_model_dir)}, progress=False, write=False)
    tried = 1  # before training: the first file decodes
    assert readable and len([p for p in decodes if p.startswith(str(test))]) == \
        tried + 3 * files  # streamed in vain, loaded whole; loaded whole
