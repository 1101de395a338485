"""`cliplab adapt` with ``shots: 0`` streams a training image folder for a method that reads it
only through its image features (its ``trains_on_features``: `cliplab.adapt.featured`), with
the results, adapter files, skip lines and results.json keys of the whole load; the training
images are decoded once and never held together."""

import json
import warnings

import pytest
import torch

from cliplab.adapt import AdaptContext, get_method
from cliplab.adapt.featured import FeaturedImages
from cliplab.adapt.run import run_adapt
from cliplab.data.digits import load_digits
from cliplab.errors import DataError
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.models import build_model
from cliplab.provenance import without_provenance
from tests.image_folders import counting_decodes, digits_folder

CLASSES = ["zero", "one", "two"]
BAD = "one/015_bad.png"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``train``: 30 digits (0-2) at 24 px, a corrupt file and a text file among them;
    ``test``: 20 others; ``val``: 15 more."""
    root = tmp_path_factory.mktemp("digits")
    data = load_digits("test", image_size=24)
    keep = (data.labels < 3).nonzero().flatten()
    parts = {"train": keep[:30], "test": keep[30:50], "val": keep[50:65]}
    made = {name: digits_folder(root / name, data.images[idx], data.labels[idx], CLASSES,
                                BAD if name == "train" else None)
            for name, idx in parts.items()}
    (made["train"] / "two" / "notes.txt").write_text("not an image", encoding="utf-8")
    return made


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny-clip of 4 image blocks (linear-probe's ``layers`` reads the last 4)."""
    return build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=4, heads=2,
                       embed_dim=16, context_length=32).save(
        tmp_path_factory.mktemp("tiny4") / "model")


def _spec(path):
    return {"source": "image-folder", "path": str(path)}


def _config(folders, method, options=None, **extra):
    data = {"train": _spec(folders["train"]), "test": _spec(folders["test"])}
    return {"method": method, "data": data, "shots": 0, "options": options or {}, **extra}


def _run(model_dir, cfg, out, capsys, recwarn):
    """results (without the adapter and time), stderr's lines and warnings, and the
    adapter's files."""
    recwarn.clear()
    warnings.simplefilter("always")  # (recwarn's "default" tells a repeated warning once)
    res = run_adapt({**cfg, "model": str(model_dir), "out": str(out)}, progress=False)
    err = capsys.readouterr().err.splitlines() + [str(w.message) for w in recwarn]
    res = {k: v for k, v in without_provenance(res).items()
           if k not in ("adapter", "wall_time_s", "out")}
    meta = json.loads((out / "adapter.json").read_text(encoding="utf-8"))
    written = json.loads((out / "results.json").read_text(encoding="utf-8"))
    files = {"tensors": (out / "adapter.safetensors").read_bytes(),
             "meta": without_provenance(meta),
             "results": list(without_provenance(written)) + [written["options"]]}
    return res, err, files


@pytest.mark.parametrize("method, options, extra, held", [
    ("linear-probe", None, {}, 0),
    ("linear-probe", {"features": "backbone", "l2": "auto", "l2_grid": [0.01, 1.0]}, {}, 0),
    ("linear-probe", {"features": "tokens"}, {}, 0),  # streamed with the probe's features
    ("linear-probe", {"features": "layers"}, {"compare_zeroshot": False}, 0),
    ("linear-probe", {"l2": "auto", "l2_grid": [0.01, 1.0]}, {"data.val": "val"}, 15),
    ("linear-probe", {"l2": "auto", "l2_grid": [0.01, 1.0]},
     {"data.val": "train", "val_shots": 2}, 6),  # data.train's spec: its draw decoded
    ("tip-adapter", {"augment_views": 0, "search": True, "search_steps": [4, 3]},
     {"data.val": "val", "val_shots": 2}, 6),
    ("tip-adapter-f", {"augment_views": 0, "epochs": 2, "batch_size": 8}, {}, 0),
    ("clip-adapter", {"epochs": 2, "batch_size": 8}, {}, 0),
    ("coop", {"epochs": 1, "batch_size": 8}, {}, 0),
    ("cocoop", {"epochs": 1, "batch_size": 8}, {}, 0),
])
def test_a_streamed_training_set_gives_the_whole_loads_results(
        method, options, extra, held, folders, model_dir, tmp_path, capsys, recwarn,
        monkeypatch, stacked):
    """``held``: the most images held together when streamed (data.val's, read as before)."""
    cfg = _config(folders, method, options,
                  **{k: v for k, v in extra.items() if not k.startswith("data.")})
    if "data.val" in extra:
        cfg["data"]["val"] = _spec(folders[extra["data.val"]])
    module = get_method(method)
    hook = module.trains_on_features
    monkeypatch.setattr(module, "trains_on_features", lambda _: False)  # the whole load
    decodes = counting_decodes(monkeypatch)
    whole, whole_err, whole_files = _run(model_dir, cfg, tmp_path / "whole", capsys,
                                         recwarn)
    assert stacked[0] == 30  # the readable training images held together
    whole_decodes = [p for p in decodes if p.startswith(str(folders["train"]))]
    monkeypatch.setattr(module, "trains_on_features", hook)
    stacked[0] = 0
    decodes.clear()
    got, err, files = _run(model_dir, cfg, tmp_path / "streamed", capsys, recwarn)
    assert stacked[0] == held
    # each file decoded as often as by the whole load, and one before the work (readable)
    train = [p for p in decodes if p.startswith(str(folders["train"]))]
    assert len(train) == len(whole_decodes) + 1
    notes = str(folders["train"] / "two" / "notes.txt")
    assert got["skipped"]["train"] == {
        "total": 2, "counts": {"not_an_image": 1, "unreadable_image": 1},
        "keys": {"not_an_image": [notes], "unreadable_image": [str(folders["train"] / BAD)]}}
    assert f"data.train: skipped 2 of 32 samples (not_an_image=1, unreadable_image=1) in " \
        f"{folders['train']}" in err
    assert err == whole_err
    assert list(got) == list(whole) and got == whole
    assert files == whole_files


def test_which_training_sets_are_streamed():
    """Methods reading only features, on all of data.train: a validation split drawn from it
    or a train_size subset is encoded in batches of its own by the whole load (features other
    in their last bits than the whole set's), so it is loaded whole; so are shots."""
    from cliplab.adapt import ADAPT_METHODS
    from cliplab.adapt.run import checked_config, should_stream_training

    def streams(method="linear-probe", options=None, **extra):
        cfg, opts = checked_config({**_config({"train": "a", "test": "b"}, method, options),
                                    "model": "tiny-clip", **extra})
        return should_stream_training(cfg, get_method(method), opts)

    assert {name for name in ADAPT_METHODS if streams(name)} == {
        "linear-probe", "clip-adapter", "coop", "cocoop"}  # tip-adapter's views read pixels
    assert streams("tip-adapter", {"augment_views": 0})
    assert streams("tip-adapter-f", {"augment_views": 0})
    assert streams(options={"features": "layers"})
    assert streams(val_shots=2, data={"train": _spec("a"), "test": _spec("b"),
                                      "val": _spec("c")})  # data.val's own draw
    assert not streams(shots=4)
    assert not streams(val_shots=2)
    assert not streams(train_size=10)


def test_a_training_folder_with_no_readable_image_fails_as_its_whole_load(
        folders, tmp_path, model_dir, monkeypatch):
    """Refused before any work (its files tried until one decodes), with the whole load's
    words."""
    def no_training(*args, **kwargs):
        raise AssertionError("refused before training")

    module = get_method("linear-probe")
    monkeypatch.setattr(module, "fit", no_training)
    unreadable = tmp_path / "unreadable"
    for name in CLASSES:
        (unreadable / name).mkdir(parents=True)
        (unreadable / name / "bad.png").write_bytes(b"not a png")
    cfg = {**_config({**folders, "train": unreadable}, "linear-probe"),
           "model": str(model_dir)}
    errors = []
    for hook in (lambda _: False, module.trains_on_features):  # whole, then streamed
        monkeypatch.setattr(module, "trains_on_features", hook)
        with pytest.raises(DataError) as err:
            run_adapt(cfg, progress=False, write=False, where="adapt.yaml")
        errors.append(str(err.value))
    assert errors[0] == errors[1] == (
        f"adapt.yaml: data.train: image folder {unreadable}: no readable image in 3 files "
        "(skipped 3 samples: unreadable_image=3)")


def test_a_training_class_with_no_readable_file_is_read_whole_as_before(
        folders, tmp_path, model_dir, monkeypatch, recwarn):
    """Streaming finds a class with no readable file, so the set is read whole (its class
    told as the whole load tells it), and refused as before: the probe learns from images."""
    train = tmp_path / "train"
    for path in folders["train"].rglob("*.png"):
        target = train / path.relative_to(folders["train"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"not a png" if path.parent.name == "two" else path.read_bytes())
    files = len(list(train.rglob("*.png")))
    module = get_method("linear-probe")
    cfg = {**_config({**folders, "train": train}, "linear-probe"), "model": str(model_dir)}
    told = []
    for hook in (lambda _: False, module.trains_on_features):  # whole, then streamed
        monkeypatch.setattr(module, "trains_on_features", hook)
        recwarn.clear()
        warnings.simplefilter("always")  # (recwarn's "default" tells a repeated one once)
        decodes = counting_decodes(monkeypatch)
        with pytest.raises(DataError) as err:
            run_adapt(cfg, progress=False, write=False)
        told.append((str(err.value), [str(w.message) for w in recwarn],
                     len([p for p in decodes if p.startswith(str(train))])))
    assert "data.train leaves no training image of 1 class(es) (two)" in told[0][0]
    assert told[1][:2] == told[0][:2] and told[0][1]
    assert told[0][2] == files and told[1][2] == 1 + 2 * files  # streamed in vain, then whole


def test_a_folder_both_trained_on_and_scored_is_decoded_once(folders, model_dir, monkeypatch):
    """data.test of data.train's folder: its streamed features are the training set's,
    served by the cache."""
    spec = _spec(folders["train"])
    decodes = counting_decodes(monkeypatch)
    res = run_adapt({"method": "linear-probe", "model": str(model_dir), "shots": 0,
                     "data": {"train": spec, "test": spec}}, progress=False, write=False)
    assert res["train_size"] == res["test_size"] == 30
    tried = 2  # one before the work, for each set
    assert len([p for p in decodes if p.startswith(str(folders["train"]))]) == tried + 31


def test_a_streamed_training_set_carries_its_features(folders, model_dir, tiny_model):
    """A subset keeps each sample's features; they are refused for another image tower (its
    pixels are not held to encode again) or a probe not streamed."""
    from cliplab.adapt.featured import streamed_training
    from cliplab.data.listed import list_source
    from cliplab.models.resolve import load_model

    model = load_model(str(model_dir))
    spec = _spec(folders["train"])
    listed = list_source(spec, False, "data.train", model.preprocess_config)
    data = streamed_training(model, spec, listed, FeatureCache(), "tokens", progress=False)
    assert isinstance(data, FeaturedImages) and data.images.shape[1:3] == (1, 1)
    ctx = AdaptContext(FeatureCache(), progress=False)
    feats = ctx.features(model, data, "tokens")
    part = data.subset(torch.tensor([3, 0, 7]))
    assert torch.equal(ctx.features(model, part, "tokens").probe, feats.probe[[3, 0, 7]])
    assert torch.equal(ctx.features(model, part).embeddings, feats.embeddings[[3, 0, 7]])
    with pytest.raises(DataError, match="streamed for another model"):
        ctx.features(tiny_model, data)
    with pytest.raises(DataError, match="layers features were not computed"):
        ctx.features(model, data, "layers")


def test_a_model_error_while_streaming_is_told_as_by_the_whole_load(
        folders, model_dir, monkeypatch):
    """A model that cannot give the probe's features (as an ONNX export has no ``tokens``)
    fails with the whole load's words: not named as the config's (``adapt.yaml:``)."""
    from cliplab.errors import ModelError
    from cliplab.models.resolve import load_model

    def no_tokens(*args, **kwargs):
        raise ModelError(f"{model_dir}: no 'tokens' probe features")

    module = get_method("linear-probe")
    cfg = _config(folders, "linear-probe", {"features": "tokens"}, compare_zeroshot=False)
    errors = []
    for hook in (lambda _: False, module.trains_on_features):  # whole, then streamed
        monkeypatch.setattr(module, "trains_on_features", hook)
        model = load_model(str(model_dir))
        monkeypatch.setattr(model, "image_backbone_and_probe", no_tokens)
        with pytest.raises(ModelError) as err:
            run_adapt(cfg, model=model, progress=False, write=False, where="adapt.yaml")
        errors.append(str(err.value))
    assert errors[0] == errors[1] == f"{model_dir}: no 'tokens' probe features"


def test_a_featured_set_needs_its_features():
    """`FeaturedImages` holds no pixels to encode: its features are required."""
    with pytest.raises(TypeError, match="features"):
        FeaturedImages(torch.zeros(1, 1, 1, 3, dtype=torch.uint8), torch.zeros(1), ["a"], [])


@pytest.mark.parametrize("method, options, blocks, message", [
    ("linear-probe", {"features": "layers"}, 2,
     "options.features: layers reads the last 4 blocks of the image tower, but this model's "
     "has 2"),
    ("tip-adapter", {"augment_views": 0, "search": True}, 4,
     "tip-adapter: search=true needs a validation split (set val_shots, e.g. val_shots=16)"),
    ("tip-adapter-f", {"augment_views": 0, "search": True}, 4,
     "tip-adapter-f: search=true needs a validation split (set val_shots, e.g. val_shots=16)"),
])
def test_options_fit_would_refuse_are_refused_before_any_image_is_decoded(
        method, options, blocks, message, folders, monkeypatch, tmp_path):
    """Not after the training set is decoded and encoded, with fit's words."""
    from cliplab.errors import ConfigError

    model_dir = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=blocks,
                            heads=2, embed_dim=16, context_length=32).save(tmp_path / "model")
    decodes = counting_decodes(monkeypatch)
    with pytest.raises(ConfigError) as err:
        run_adapt({**_config(folders, method, options), "model": str(model_dir)},
                  progress=False, write=False, where="adapt.yaml")
    assert str(err.value).startswith(message)
    assert decodes == []
