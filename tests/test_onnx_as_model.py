"""An ONNX export (`cliplab export --format onnx`) as the model of every command that takes one:
its weights fingerprint, `cliplab index` then serve on it (the search of the PyTorch model it
came from), the adapt methods that read only features run on it, and the methods that need the
PyTorch model refuse it before any work with a one-line error."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from cliplab.adapt import ADAPT_METHODS, AdaptContext, get_method, load_adapter
from cliplab.cli import main
from cliplab.data.digits import load_digits
from cliplab.errors import ConfigError, ModelError
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.folder import model_fingerprint
from cliplab.models.onnx_export import export_onnx
from cliplab.models.resolve import load_model
from cliplab.provenance import PROVENANCE_KEYS, without_provenance
from tests.serve_helpers import save_tiny_model

SHAPES_ARGS = ["--data", "shapes", "data.n=50", "data.image_size=32"]
QUERIES = ["a red circle", "a blue square", "a small green triangle", "two yellow shapes"]
PYTORCH_ONLY = ["coop", "cocoop", "finetune", "lora", "wise-ft"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny PyTorch model folder, its fp32 and int8 exports, and an export of other weights."""
    root = tmp_path_factory.mktemp("onnx-model")
    torch_dir = save_tiny_model(root / "torch")
    model = DualEncoder.load(torch_dir)
    other = DualEncoder.load(save_tiny_model(root / "other", seed=1))
    return {"root": root, "torch": torch_dir, "model": model,
            "fp32": export_onnx(model, root / "fp32"),
            "int8": export_onnx(model, root / "int8", quantize="int8"),
            "other": export_onnx(other, root / "other-onnx")}


def test_an_export_has_a_stable_fingerprint_of_its_weights(models, tmp_path):
    fp32 = model_fingerprint(load_model(str(models["fp32"])))
    assert isinstance(fp32, str) and len(fp32) == 32
    # the same export loaded twice, and a copy of its folder: the same weights
    assert model_fingerprint(load_model(str(models["fp32"]))) == fp32
    shutil.copytree(models["fp32"], tmp_path / "copy")
    assert model_fingerprint(load_model(str(tmp_path / "copy"))) == fp32
    # other weights, the int8 export of the same model and the PyTorch model are other models
    others = {model_fingerprint(load_model(str(models[k]))) for k in ("int8", "other")}
    others.add(model_fingerprint(models["model"]))
    assert fp32 not in others and len(others) == 3


def _index(model_dir, out) -> None:
    assert main(["index", "--model", str(model_dir), *SHAPES_ARGS, "--out", str(out),
                 "--no-progress"]) == 0


def _search(index_dir, queries, k=5):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cliplab.serve.run import open_app

    app = open_app(str(index_dir))  # the model the index records, checked by its fingerprint
    client = TestClient(app)
    return [client.get("/api/search", params={"q": q, "k": k}).json()["results"]
            for q in queries]


def test_index_then_serve_an_export_finds_what_the_pytorch_model_finds(models, tmp_path):
    """`cliplab index --model EXPORT` then serve: the index records the export, its vectors are
    the PyTorch model's within ONNX tolerance (int8: close in cosine), and text queries served
    from it rank as the PyTorch index does (top-1 equal for fp32; the queries have no near-tie)."""
    from cliplab.serve.index import SearchIndex

    for name in ("torch", "fp32", "int8"):
        _index(models[name], tmp_path / name)
    indexes = {name: SearchIndex(tmp_path / name) for name in ("torch", "fp32", "int8")}
    try:
        assert indexes["fp32"].record["model"]["name"] == str(models["fp32"].resolve())
        assert indexes["fp32"].fingerprint == model_fingerprint(load_model(str(models["fp32"])))
        want = np.asarray(indexes["torch"].vectors)
        assert np.abs(np.asarray(indexes["fp32"].vectors) - want).max() <= 1e-4
        assert (np.asarray(indexes["int8"].vectors) * want).sum(1).min() > 0.98
        # the index refuses a model of other weights (here: the PyTorch one it came from)
        with pytest.raises(ModelError, match="search it with the same model"):
            indexes["fp32"].check_model(models["model"])
        sims = models["model"].encode_texts(QUERIES).numpy() @ want.T
        top2 = -np.sort(-sims, axis=1)[:, :2]
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # no near-tie: top-1 must agree
    finally:
        for index in indexes.values():
            index.close()
    found = {name: _search(tmp_path / name, QUERIES) for name in ("torch", "fp32", "int8")}
    for torch_hits, onnx_hits, int8_hits in zip(found["torch"], found["fp32"], found["int8"]):
        assert onnx_hits[0]["id"] == torch_hits[0]["id"]
        assert [h["score"] for h in onnx_hits] == pytest.approx(
            [h["score"] for h in torch_hits], abs=1e-4)
        assert len(int8_hits) == len(torch_hits)
    assert main(["index", "--model", str(models["fp32"]), *SHAPES_ARGS, "--out",
                 str(tmp_path / "fp32"), "--add", "--no-progress"]) == 0  # same fingerprint


def test_an_index_names_an_onnx_export_of_its_model_as_such(models, tmp_path):
    """`serve INDEX --model EXPORT` of the index's own model (or the reverse) said the given
    model "has other weights": they are that model's, exported. Still refused, as what it is."""
    from cliplab.models.resolve import export_source
    from cliplab.serve.index import SearchIndex

    source = export_source(str(models["torch"]), models["model"])
    exports = {q: export_onnx(models["model"], tmp_path / f"ex-{q}", quantize=q, source=source)
               for q in (None, "int8")}
    _index(models["torch"], tmp_path / "by-torch")
    _index(exports[None], tmp_path / "by-export")
    by_torch, by_export = SearchIndex(tmp_path / "by-torch"), SearchIndex(tmp_path / "by-export")
    try:
        for quantize, folder in exports.items():
            given = re.escape(str(folder))
            with pytest.raises(ModelError, match=rf"; the given model {given} is an "
                                                 rf"{quantize or 'fp32'} ONNX export of that "
                                                 r"model, which an index counts as a model of "
                                                 r"its own: serve the index with the model it "
                                                 r"was built with, or build an index with the "
                                                 r"export \(cliplab index --model"):
                by_torch.check_model(load_model(str(folder)))
        with pytest.raises(ModelError, match=r", an fp32 ONNX export of the given model, which "
                                             r"an index counts as a model of its own: serve "
                                             r"the index with that export"):
            by_export.check_model(models["model"])
        # an export of other weights is still "other weights"
        with pytest.raises(ModelError, match="has other weights"):
            by_torch.check_model(load_model(str(models["other"])))
    finally:
        by_torch.close()
        by_export.close()


def _adapt(method, model, out, *extra) -> int:
    return main(["adapt", "--method", method, "--model", str(model), "--out", str(out),
                 "--no-progress", "data.train.source=digits", "data.train.split=train",
                 "data.test.source=digits", "data.test.split=test", "shots=2", "seed=3",
                 *extra])


FEATURE_METHODS = {"zeroshot": [], "linear-probe": [],
                   "tip-adapter": ["options.augment_views=2"],
                   "tip-adapter-f": ["options.augment_views=2", "options.epochs=2"],
                   "clip-adapter": ["options.epochs=2"]}


@pytest.mark.parametrize("method", list(FEATURE_METHODS))
def test_feature_methods_adapt_an_export_and_the_adapter_opens(models, tmp_path, method):
    """The methods that read only features run on the export; the saved adapter records the
    export as its model and opens on it (reproducing the reported accuracy)."""
    out = tmp_path / "run"
    assert _adapt(method, models["fp32"], out, *FEATURE_METHODS[method]) == 0
    results = json.loads((out / "results.json").read_text())
    meta = json.loads((out / "adapter.json").read_text())
    onnx_model = load_model(str(models["fp32"]))
    assert meta["model"] == results["model"] == str(models["fp32"])
    assert meta["fingerprint"] == model_fingerprint(onnx_model)
    test = load_digits("test")
    adapter = load_adapter(out, onnx_model)
    acc = (adapter.logits(test.images).argmax(1) == test.labels).float().mean().item()
    assert acc == pytest.approx(results["test"]["acc1"])
    with pytest.raises(ModelError, match="fitted on other weights"):
        load_adapter(out, models["model"])  # the PyTorch model is another model


def test_the_zeroshot_head_of_an_export_is_the_pytorch_models(models, tmp_path):
    from safetensors.torch import load_file

    heads = []
    for name in ("torch", "fp32"):
        assert _adapt("zeroshot", models[name], tmp_path / name) == 0
        heads.append(load_file(str(tmp_path / name / "adapter.safetensors")))
    assert (heads[0]["weights"] - heads[1]["weights"]).abs().max() <= 1e-4
    assert heads[0]["scale"].item() == pytest.approx(heads[1]["scale"].item())


@pytest.mark.parametrize("method", PYTORCH_ONLY)
def test_methods_that_need_the_pytorch_model_refuse_an_export_first(models, tmp_path, capsys,
                                                                    monkeypatch, method):
    """coop/cocoop back-propagate through the text tower, finetune/lora/wise-ft change the
    weights: a one-line error naming the method and what to pass, before any data is loaded
    or any folder written."""
    import cliplab.adapt.run as run

    def no_work(*args, **kwargs):
        raise AssertionError("the refusal must come before any work")

    monkeypatch.setattr(run, "load_sets", no_work)
    out = tmp_path / "run"
    assert _adapt(method, models["fp32"], out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cliplab: error:")
    assert f"adapt method {method!r}" in err and str(models["fp32"]) in err
    assert "ONNX export" in err and "PyTorch model folder the export came from" in err
    assert not out.exists()


@pytest.mark.parametrize("method", PYTORCH_ONLY)
def test_fit_refuses_an_export_in_python_too(models, method):
    """The same refusal from the method's own ``fit`` (the Python API, no run loop)."""
    train = load_digits("train").subset(torch.arange(10))
    ctx = AdaptContext(cache=FeatureCache(), progress=False)
    with pytest.raises(ConfigError, match=f"adapt method {method!r} needs the PyTorch model"):
        get_method(method).fit(load_model(str(models["fp32"])), train, None, ctx)


def test_the_listed_export_methods_are_those_without_the_flag():
    from cliplab.adapt.base import EXPORT_METHODS

    assert list(EXPORT_METHODS) == [m for m in ADAPT_METHODS
                                    if not getattr(get_method(m), "NEEDS_PYTORCH_MODEL", None)]
    assert sorted(set(ADAPT_METHODS) - set(EXPORT_METHODS)) == sorted(PYTORCH_ONLY)


def test_tower_fingerprints_cover_the_export_record_and_every_weight_file(models, tmp_path):
    """The feature caches' key of each tower: the same for a copy of the export, another when
    onnx_export.json changes what is fed to the graph (the mean applied before the image graph,
    the context length texts are cut to), the projections or a weights file beside a graph."""
    base = load_model(str(models["fp32"]))
    copy = shutil.copytree(models["fp32"], tmp_path / "copy")
    assert [load_model(str(copy)).tower_fingerprint(t) for t in ("image", "text")] == \
        [base.tower_fingerprint(t) for t in ("image", "text")]
    # when and by which cliplab the record was written is no input: the same export made again,
    # and the record as a cliplab before `created` wrote it, key the same caches
    for name, provenance in (("again", {"created": "2030-01-01T00:00:00Z",
                                        "cliplab_version": "9.9"}), ("older", None)):
        made = shutil.copytree(models["fp32"], tmp_path / name)
        record = json.loads((made / "onnx_export.json").read_text(encoding="utf-8"))
        assert set(PROVENANCE_KEYS) <= set(record)
        record = {**without_provenance(record), **(provenance or {})}
        (made / "onnx_export.json").write_text(json.dumps(record, indent=2) + "\n",
                                              encoding="utf-8")
        assert [load_model(str(made)).tower_fingerprint(t) for t in ("image", "text")] == \
            [base.tower_fingerprint(t) for t in ("image", "text")]
    for key, value, tower in (("mean", [0.1, 0.2, 0.3], "image"), ("context_length", 16, "text")):
        edited = shutil.copytree(models["fp32"], tmp_path / key)
        record = json.loads((edited / "onnx_export.json").read_text())
        if key == "mean":
            record["preprocess"]["mean"] = value
        else:
            record[key] = value
        (edited / "onnx_export.json").write_text(json.dumps(record))
        assert load_model(str(edited)).tower_fingerprint(tower) != base.tower_fingerprint(tower)
    # the projections (their own file) and a graph's weights kept in a file beside it (as
    # torch writes a tower over 2 GB): the graph file alone no longer says which weights
    other = models["other"]
    swapped = shutil.copytree(models["fp32"], tmp_path / "projections")
    shutil.copy(other / "projections.safetensors", swapped / "projections.safetensors")
    assert load_model(str(swapped)).tower_fingerprint("image") != base.tower_fingerprint("image")
    onnx = pytest.importorskip("onnx")
    outside = shutil.copytree(models["fp32"], tmp_path / "outside")
    graph = onnx.load(str(outside / "image_encoder.onnx"))
    onnx.save_model(graph, str(outside / "image_encoder.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="image_weights.data",
                    size_threshold=0)
    before, layout = load_model(str(outside)).tower_fingerprint("image"), \
        (outside / "image_encoder.onnx").read_bytes()
    data = bytearray((outside / "image_weights.data").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one weight's byte: other weights, the graph file untouched
    (outside / "image_weights.data").write_bytes(bytes(data))
    assert (outside / "image_encoder.onnx").read_bytes() == layout
    assert load_model(str(outside)).tower_fingerprint("image") != before


def test_encode_text_without_a_mask_attends_to_every_token(models):
    """No attention mask: every position counts (as the PyTorch model's encode_text does)."""
    onnx = load_model(str(models["fp32"]))
    ids = models["model"].tokenize(["a red circle", "a small green triangle"])["input_ids"]
    unmasked = onnx.encode_text(ids)
    assert torch.isfinite(unmasked).all()
    assert (unmasked - onnx.encode_text(ids, torch.ones_like(ids))).abs().max() == 0
    with torch.no_grad():
        assert (unmasked - models["model"].encode_text(ids)).abs().max() <= 1e-4
