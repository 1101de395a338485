"""ONNX export of both towers: onnxruntime's embeddings equal PyTorch's (1e-4), dynamic batch
and length, int8, and the exported folder behind the DualEncoder face (eval's feature path)."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cliplab.errors import ModelError
from cliplab.evaluate.features import encode_images
from cliplab.models.onnx_encoder import OnnxEncoder, is_onnx_export, load_onnx
from cliplab.models.onnx_export import export_onnx
from cliplab.models.presets import build_model
from tests.stamped import assert_stamped, now

TEXTS = ["a photo of a cat", "x", "two red squares left of a much larger blue circle, drawn twice"]


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory):
    model = build_model("tiny-clip", image_size=32)
    out = export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny-clip")
    return model, out


def _check_equal(model, onnx_model: OnnxEncoder, image_size: int, tol: float = 1e-4) -> None:
    for batch in (1, 5):  # neither is the batch of 2 the graph was traced with
        pixels = model.preprocess(_images(batch, image_size, seed=batch))
        with torch.no_grad():
            want = model.encode_image(pixels)
            want_raw = model.encode_image(pixels, normalize=False)
        assert onnx_model.encode_image(pixels).shape == want.shape
        assert (onnx_model.encode_image(pixels) - want).abs().max() <= tol
        assert (onnx_model.encode_image(pixels, normalize=False) - want_raw).abs().max() <= tol
    for texts in (TEXTS, TEXTS[:1]):  # other lengths and batch sizes than traced
        tok = model.tokenize(texts)
        assert torch.equal(onnx_model.tokenize(texts)["input_ids"], tok["input_ids"])
        with torch.no_grad():
            want = model.encode_text(**tok)
        assert (onnx_model.encode_text(**tok) - want).abs().max() <= tol
        assert (onnx_model.encode_texts(texts) - want).abs().max() <= tol


def test_clip_towers_equal_pytorch(clip_export):
    model, out = clip_export
    assert is_onnx_export(out) and not is_onnx_export(out.parent)
    onnx_model = load_onnx(out)
    assert (onnx_model.kind, onnx_model.embed_dim) == ("clip", model.embed_dim)
    assert onnx_model.logit_scale.item() == pytest.approx(model.logit_scale.item())
    _check_equal(model, onnx_model, 32)
    assert not model.training  # exporting leaves the model as it was


def test_eval_feature_path_runs_on_the_export(clip_export):
    model, out = clip_export
    images = _images(7, 32, seed=3)
    want = encode_images(model, images, batch_size=4, progress=False)
    got = encode_images(load_onnx(out), images, batch_size=4, progress=False)
    assert (got.embeddings - want.embeddings).abs().max() <= 1e-4
    assert (got.backbone - want.backbone).abs().max() <= 1e-4


def test_siglip_towers_equal_pytorch(tmp_path):
    model = build_model("tiny-siglip", image_size=32)
    onnx_model = load_onnx(export_onnx(model, tmp_path / "siglip"))
    assert onnx_model.logit_bias.item() == pytest.approx(model.logit_bias.item())
    _check_equal(model, onnx_model, 32)


@pytest.mark.slow
def test_lit_minilm_mean_pooled_text_tower_equal_pytorch(tmp_path):
    model = build_model("lit-minilm", layers=2)
    onnx_model = load_onnx(export_onnx(model, tmp_path / "lit"))
    assert onnx_model.text_pooling == "mean"
    _check_equal(model, onnx_model, 28)


def test_an_export_opens_in_plain_transformers_as_cliplab_reads_it(tmp_path):
    """The export had no preprocessor_config.json, and a model not loaded from a cliplab
    folder (a preset) kept its tokenizer's own model_max_length: lit-minilm's 512, where
    cliplab truncates at 32 (long texts 0.07 apart in plain onnxruntime)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    model = build_model("lit-minilm", layers=1, image_size=32)
    out = export_onnx(model, tmp_path / "lit")
    tokenizer = AutoTokenizer.from_pretrained(out)
    long_text = "a photo of a " + "very " * 60 + "nice shirt"
    assert tokenizer.model_max_length == model.context_length == 32
    assert tokenizer([long_text], truncation=True)["input_ids"] == \
        model.tokenize([long_text])["input_ids"].tolist()
    processor = AutoImageProcessor.from_pretrained(out)
    pixels = processor(images=[Image.fromarray(_images(1, 48)[0].numpy())],
                       return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (32, 32)
    assert (pixels - model.preprocess(_images(1, 48))).abs().max() <= 1.5 / 255 / min(
        model.preprocess_config.std)
    # and a re-export over it is still an export's own folder
    export_onnx(model, out, overwrite=True)


def test_int8_export_is_quantized_and_close(tmp_path):
    model = build_model("tiny-clip", image_size=32)
    out = export_onnx(model, tmp_path / "int8", quantize="int8")
    ops = {node.op_type for node in onnx.load(str(out / "image_encoder.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    assert json.loads((out / "onnx_export.json").read_text())["quantize"] == "int8"
    assert not list(out.glob("fp32-*"))
    onnx_model = load_onnx(out)
    pixels = model.preprocess(_images(6, 32))
    with torch.no_grad():
        want = model.encode_image(pixels)
    cosine = (onnx_model.encode_image(pixels) * want).sum(-1)
    assert cosine.min() > 0.98
    # int8 is not a no-op
    assert (onnx_model.encode_image(pixels) - want).abs().max() > 1e-5


def test_few_shot_of_an_int8_export_embeds_its_train_set_whole(tmp_path):
    """int8 activations are scaled per batch: few_shot embedding only its drawn images gave
    other numbers than the whole set's pass (linear_probe_4shot 0.435 against 0.404), and which
    depended on whether a probe of the same train set ran before it in the suite."""
    from cliplab.evaluate.suite import run_suite
    from cliplab.evaluate.tasks import TaskContext

    model = load_onnx(export_onnx(build_model("tiny-clip", image_size=16), tmp_path / "int8",
                                  quantize="int8"))
    train, test = {"source": "digits", "split": "train"}, {"source": "digits", "split": "test"}
    few = {"name": "fs", "task": "few_shot", "train": train, "test": test, "shots": [1, 4],
           "seeds": [0, 1], "features": "embeddings"}
    probe = {"name": "lp", "task": "linear_probe", "train": train, "test": test,
             "features": "embeddings", "l2": 0.01}
    alone = run_suite(model, {"tasks": [few]}, TaskContext(progress=False))["fs"]
    after = run_suite(model, {"tasks": [probe, few]}, TaskContext(progress=False))["fs"]
    assert alone == after


def test_bad_input(tmp_path):
    with pytest.raises(ModelError, match="not an ONNX export folder"):
        OnnxEncoder(tmp_path)
    with pytest.raises(ModelError, match="--quantize must be int8"):
        export_onnx(build_model("tiny-clip"), tmp_path / "q", quantize="int4")
    assert not (tmp_path / "q").exists()


AGAIN = "export the model again (cliplab export --format onnx)"


def _edit_projections(edit):
    def damage(folder):
        file = folder / "projections.safetensors"
        tensors = load_file(str(file))
        edit(tensors)
        save_file(tensors, str(file))
    return damage


# damage of an export folder → (the file the message names, what it says after "FILE: ")
DAMAGED_EXPORTS = {
    "no projections": (lambda f: (f / "projections.safetensors").unlink(), "",
                       f"the ONNX export folder has no projections.safetensors; {AGAIN}"),
    "no image graph": (lambda f: (f / "image_encoder.onnx").unlink(), "",
                       f"the ONNX export folder has no image_encoder.onnx; {AGAIN}"),
    "projection missing": (_edit_projections(lambda t: t.pop("text_projection")),
                           "projections.safetensors", f"no 'text_projection' tensor; {AGAIN}"),
    "projection cut short": (_edit_projections(
        lambda t: t.update(visual_projection=t["visual_projection"][:-1].clone())),
        "projections.safetensors", "visual_projection has shape [{d1}, {w}], the export needs "
        f"[{{d}}, {{w}}]; {AGAIN}"),
    "projections not safetensors": (
        lambda f: (f / "projections.safetensors").write_text("junk"), "projections.safetensors",
        "cannot be read (SafetensorError: "),
}


def _damaged_export(clip_export, tmp_path, case):
    """A damaged copy of the export, the file its error must name and the rest of the error."""
    folder = shutil.copytree(clip_export[1], tmp_path / "bad")
    damage, name, message = DAMAGED_EXPORTS[case]
    damage(folder)
    w = load_file(str(clip_export[1] / "projections.safetensors"))["visual_projection"]
    return folder, folder / name if name else folder, message.format(
        d=w.shape[0], d1=w.shape[0] - 1, w=w.shape[1])


@pytest.mark.parametrize("case", list(DAMAGED_EXPORTS))
def test_a_damaged_export_fails_to_load_naming_the_file(clip_export, tmp_path, case):
    """Every file the encoder reads is checked when it loads, not when eval first projects."""
    folder, named, message = _damaged_export(clip_export, tmp_path, case)
    with pytest.raises(ModelError) as err:
        load_onnx(folder)
    assert str(err.value).startswith(f"{named}: {message}") and "\n" not in str(err.value)


def test_eval_of_an_export_without_its_projections_is_one_line_exit_2(clip_export, tmp_path,
                                                                      capsys):
    from cliplab.cli import main
    from tests.cli_output import one_line_error

    folder, _, message = _damaged_export(clip_export, tmp_path, "no projections")
    suite = tmp_path / "s.yaml"
    suite.write_text("tasks: [{task: zeroshot, data: {source: digits, split: test}}]\n")
    assert main(["eval", "--model", str(folder), "--suite", str(suite), "--no-progress"]) == 2
    assert one_line_error(capsys) == f"{folder}: {message}"


def test_the_model_spec_takes_an_onnx_export(clip_export):
    from cliplab.models.resolve import load_model

    model, out = clip_export
    loaded = load_model(str(out))
    assert type(loaded).__name__ == "OnnxEncoder"
    images = _images(3, 32, seed=4)
    with torch.no_grad():
        want = model.encode_image(model.preprocess(images))
    assert (loaded.encode_image(loaded.preprocess(images)) - want).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def centred_export(tmp_path_factory):
    """A tiny-clip whose pooled image features are centred on the digits test set (the final
    layer norm's bias less their mean), exported: a fresh model puts every digit in one
    class, this one spreads its zero-shot predictions over all ten."""
    from cliplab.data.digits import load_digits

    model = build_model("tiny-clip", image_size=32).eval()
    pooled = encode_images(model, load_digits("test").images, progress=False).backbone
    with torch.no_grad():
        model.model.vision_model.post_layernorm.bias -= pooled.mean(0)
    return model, export_onnx(model, tmp_path_factory.mktemp("onnx") / "centred")


def test_cliplab_eval_runs_on_an_export(centred_export, tmp_path, capsys, monkeypatch):
    """`cliplab eval` on an export gives the zero-shot accuracy of the PyTorch model it came
    from (its embeddings x its text head, by hand). The export's logits are within ~1e-5 of
    PyTorch's (2e-6 measured): an image whose top two logits are closer than 2e-5 may go either
    way, so each such near-tie may move acc1 by 1/N."""
    from cliplab.cli import main
    from cliplab.data.digits import load_digits
    from cliplab.evaluate.zeroshot import zeroshot_classifier

    model, out = centred_export
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - {name: zs, task: zeroshot, data: {source: digits, "
                     "split: test}}\n")
    assert main(["eval", "--config", str(suite), "--model", str(out), "--out",
                 str(tmp_path / "res"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    test = load_digits("test")
    with torch.no_grad():
        logits = (encode_images(model.eval(), test.images, progress=False).embeddings
                  @ zeroshot_classifier(model, test.prompt_names, test.templates).T)
    acc1 = (logits.argmax(1) == test.labels).float().mean().item()
    top2 = logits.topk(2, dim=1).values
    near_ties = int((top2[:, 0] - top2[:, 1] < 2e-5).sum())
    # the comparison means something: few near-ties, predictions over every class
    assert near_ties < len(test.labels) / 20 and logits.argmax(1).unique().numel() == 10
    assert abs(results["results"]["zs"]["acc1"] - acc1) <= near_ties / len(test.labels) + 1e-6
    # bf16 asked of an export: its graphs are fp32, and so is the record (it said bf16 while
    # only the projections followed, moving the scores)
    capsys.readouterr()
    from cliplab.models import precision
    monkeypatch.setattr(precision, "_WARNED", set())  # said once a process
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: False)
    assert main(["eval", "--config", str(suite), "--model", str(out), "--out",
                 str(tmp_path / "bf16"), "--no-progress", "precision=bf16"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: an ONNX export runs in fp32") == 1
    assert "no native bf16 units" not in err  # nothing runs in bf16: it warned of emulation
    asked = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert asked["precision"] == results["precision"] == "fp32"
    assert asked["results"]["zs"] == results["results"]["zs"]


def test_a_probe_on_token_features_of_an_export_is_a_one_line_error(clip_export, tmp_path, capsys):
    """The exported graph has no token states: the default probe says so and how to go on; a
    probe of the pooled output runs and equals the PyTorch model's within tolerance."""
    from cliplab.cli import main

    model, out = clip_export
    probe = ("  - {name: p, task: linear_probe, train: {source: digits, split: train}, "
             "test: {source: digits, split: test}")
    suite = tmp_path / "suite.yaml"
    zeroshot = "  - {task: zeroshot, data: {source: digits, split: test}}\n"
    for tasks, default in ((f"{zeroshot}{probe}}}\n", " (the linear_probe default)"),
                           (f"{zeroshot}{probe}, features: layers}}\n", "")):
        suite.write_text(f"tasks:\n{tasks}")
        # refused before any task runs, naming the task, its key and what to set
        assert main(["eval", "--config", str(suite), "--model", str(out), "--out",
                     str(tmp_path / "refused"), "--no-progress"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"cliplab: error: {suite}: tasks[1] (name 'p'): features: "
            f"{'layers' if not default else 'tokens'}{default} needs the hidden states of a "
            "PyTorch model; this one gives embeddings or backbone (an ONNX export): set "
            "features: backbone, or evaluate the model folder it came from")
        assert not (tmp_path / "refused").exists()
    suite.write_text(f"tasks:\n{probe}, features: backbone}}\n")
    scores = []
    for spec in (out, tmp_path / "torch"):
        if spec != out:
            model.save(spec)
        assert main(["eval", "--config", str(suite), "--model", str(spec), "--out",
                     str(tmp_path / f"res-{spec.name}"), "--no-progress"]) == 0
        scores.append(json.loads((tmp_path / f"res-{spec.name}" / "results.json")
                                 .read_text())["results"]["p"]["acc1"])
    assert scores[0] == pytest.approx(scores[1], abs=0.02)


def test_cli_export_records_the_model_it_came_from(tmp_path, tiny_model_dir):
    """`cliplab export` keeps, in the export record, the spec it was given, the folder that
    resolved to and the weights' fingerprint: an export can be traced to its weights."""
    from cliplab.cli import main
    from cliplab.models.folder import model_fingerprint
    from cliplab.models.resolve import load_model

    started = now()
    assert main(["export", str(tiny_model_dir), "--format", "onnx",
                 "--out", str(tmp_path / "onnx")]) == 0
    record = json.loads((tmp_path / "onnx" / "onnx_export.json").read_text())
    assert_stamped(record, started, now())  # which cliplab exported it, and when
    assert record["source"] == {"model": str(tiny_model_dir),
                                "model_folder": str(tiny_model_dir.resolve()),
                                "fingerprint": model_fingerprint(load_model(str(tiny_model_dir)))}
    assert load_onnx(tmp_path / "onnx").embed_dim == 16  # the record still loads
