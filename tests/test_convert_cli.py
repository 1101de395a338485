"""`cliplab convert` / `cliplab export`: results on disk, one-line errors with exit code 2."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from cliplab.cli import main
from cliplab.models.convert import load_openclip
from cliplab.models.dual_encoder import DualEncoder
from cliplab.provenance import without_provenance
from tests.cli_output import one_line_error
from tests.stamped import assert_stamped, now

FIXTURES = Path(__file__).parent / "fixtures" / "openclip"


def test_convert_then_export_open_clip(tmp_path, capsys):
    src = FIXTURES / "ddp-quickgelu" / "epoch_3.pt"
    started = now()
    assert main(["convert", "--from", "open_clip", str(src), "--out", str(tmp_path / "m")]) == 0
    finished = now()
    model = DualEncoder.load(tmp_path / "m")
    assert model.model.config.text_config.hidden_act == "quick_gelu"
    # the folder says where its weights came from, and which cliplab converted them when
    origin = json.loads((tmp_path / "m" / "cliplab.json").read_text())["converted_from"]
    assert_stamped(origin, started, finished)
    assert without_provenance(origin) == {"format": "open_clip", "weights": str(src.resolve()),
                      "config": str((src.parent / "tiny-quickgelu.json").resolve()),
                      "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}
    assert main(["export", str(tmp_path / "m"), "--format", "open_clip",
                 "--out", str(tmp_path / "oc")]) == 0
    cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["quick_gelu"] is True
    back = load_openclip(tmp_path / "oc")
    assert back.model.config.vision_config.hidden_size == 48


def test_an_openclip_export_records_the_model_it_came_from(tmp_path, tiny_model_dir, capsys):
    """As the ONNX export's onnx_export.json, an OpenCLIP export names its source (the spec,
    its folder, the weights' fingerprint) in a file of its own: open_clip_config.json keeps
    OpenCLIP's keys only, and the folder still loads and is replaced by --overwrite."""
    from cliplab.models.folder import model_fingerprint
    from cliplab.models.resolve import load_model

    out = tmp_path / "oc"
    for again in ([], ["--overwrite"]):
        started = now()
        assert main(["export", str(tiny_model_dir), "--format", "open_clip", "--out", str(out),
                     *again]) == 0
    record = json.loads((out / "open_clip_export.json").read_text(encoding="utf-8"))
    assert_stamped(record, started, now())  # the export --overwrite wrote last
    assert without_provenance(record) == {"source": {
        "model": str(tiny_model_dir), "model_folder": str(tiny_model_dir.resolve()),
        "fingerprint": model_fingerprint(load_model(str(tiny_model_dir)))}}
    config = json.loads((out / "open_clip_config.json").read_text(encoding="utf-8"))
    assert set(config) == {"model_cfg", "preprocess_cfg"}
    assert model_fingerprint(load_openclip(out)) == record["source"]["fingerprint"]


@pytest.mark.parametrize("fmt", ["open_clip", "onnx"])
def test_an_export_of_a_model_with_a_fine_tuned_head_warns_it_is_left_out(
        tmp_path, tiny_model, capsys, fmt):
    """Neither format holds head.safetensors: eval of the folder scores with that head, of the
    export with the text head, so the export says in one line that the head is left out (for
    a run folder too: its newest checkpoint's); a folder without a head exports silently."""
    import torch

    from cliplab.adapt.head import ClassifierHead

    plain = tiny_model.save(tmp_path / "plain")
    assert main(["export", str(plain), "--format", fmt, "--out", str(tmp_path / "p")]) == 0
    assert "warning" not in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}", encoding="utf-8")  # a finished run
    for spec, folder in ((tmp_path / "ft", tmp_path / "ft"),
                         (run, run / "checkpoints" / "step-3" / "model")):
        tiny_model.save(folder)
        ClassifierHead(torch.randn(2, tiny_model.embed_dim), 5.0, ["a", "b"]).save(folder)
        out = tmp_path / f"{spec.name}-{fmt}"
        assert main(["export", str(spec), "--format", fmt, "--out", str(out)]) == 0
        err = capsys.readouterr().err.strip()
        assert err == (f"cliplab: warning: export: the model carries a classifier head "
                       f"({folder / 'head.safetensors'}) that is not exported: the export holds "
                       "the towers only, and zero-shot scores of it use the text head "
                       f"(evaluate {spec} for the head's)")
        assert not (out / "head.safetensors").exists()


def test_export_onnx_from_an_openclip_checkpoint(tmp_path, capsys):
    assert main(["export", str(FIXTURES / "hub-gelu"), "--format", "onnx",
                 "--out", str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "image_encoder.onnx").is_file()
    capsys.readouterr()
    for fmt in ("onnx", "open_clip"):  # an export is not a model to export again
        assert main(["export", str(tmp_path / "onnx"), "--format", fmt,
                     "--out", str(tmp_path / f"again-{fmt}")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"cliplab: error: {tmp_path / 'onnx'} is an ONNX export; export the "
                       "PyTorch model it was made from (a model, checkpoint or run folder)")
        assert not (tmp_path / f"again-{fmt}").exists()


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    (tmp_path / "cfg.json").write_text(json.dumps(
        {"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}}))
    assert main(["convert", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cliplab: error: ") and str(bad) in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    assert main(["export", "tiny-siglip", "--format", "open_clip",
                 "--out", str(tmp_path / "x")]) == 2
    assert "CLIP towers only" in capsys.readouterr().err
    assert main(["export", "tiny-clip", "--format", "open_clip", "--quantize", "int8",
                 "--out", str(tmp_path / "y")]) == 2


def test_convert_reads_the_config_given_with_config(tmp_path, capsys):
    """`--config JSON`: a checkpoint whose model config is not beside it converts to the same
    model as with the config beside it (its tokenizer named relative to that config)."""
    import shutil

    from cliplab.models.folder import model_fingerprint

    ddp = FIXTURES / "ddp-quickgelu"
    (tmp_path / "w").mkdir()
    shutil.copy(ddp / "epoch_3.pt", tmp_path / "w" / "epoch_3.pt")
    shutil.copytree(ddp / "tokenizer", tmp_path / "cfg" / "tokenizer")
    shutil.copy(ddp / "tiny-quickgelu.json", tmp_path / "cfg" / "model.json")
    weights = tmp_path / "w" / "epoch_3.pt"
    assert main(["convert", str(weights), "--out", str(tmp_path / "none")]) == 2  # no config
    assert not (tmp_path / "none").exists()
    capsys.readouterr()
    assert main(["convert", str(weights), "--config", str(tmp_path / "cfg" / "model.json"),
                 "--out", str(tmp_path / "m")]) == 0
    assert main(["convert", str(ddp / "epoch_3.pt"), "--out", str(tmp_path / "beside")]) == 0
    model, beside = DualEncoder.load(tmp_path / "m"), DualEncoder.load(tmp_path / "beside")
    assert model.model.config.text_config.hidden_act == "quick_gelu"
    assert model_fingerprint(model) == model_fingerprint(beside)
    assert model.tokenize(["a red circle"])["input_ids"].tolist() == \
        beside.tokenize(["a red circle"])["input_ids"].tolist()


def test_a_file_that_is_no_pytorch_checkpoint_is_named_as_such(tmp_path, capsys):
    """A text file named .pt is not blamed for holding Python objects: it is no checkpoint."""
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint\n")
    (tmp_path / "cfg.json").write_text(json.dumps(
        {"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}}))
    assert main(["convert", "--from", "open_clip", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert one_line_error(capsys) == (
        f"{bad}: not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; this "
        "file is neither); give an OpenCLIP .pt/.bin state dict or a .safetensors file")
    assert not (tmp_path / "out").exists()


def _set(*keys, value):
    """An edit of open_clip_config.json setting the value at ``keys``."""
    def edit(data):
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value
    return edit


# open_clip_config.json edits → the message after "FILE: " (keys as the existing checks name
# them: relative to the model config, so the same for a bare ViT-B-32.json)
BAD_CONFIG_VALUES = {
    "embed_dim": (_set("model_cfg", "embed_dim", value="big"),
                  "embed_dim must be a positive integer, not 'big'"),
    "mean": (_set("preprocess_cfg", "mean", value="red"),
             "preprocess_cfg.mean must be 3 numbers (R, G, B), not 'red'"),
    "std": (_set("preprocess_cfg", "std", value=[0.2, 0, 0.3]),
            "preprocess_cfg.std must be 3 positive numbers (R, G, B), not [0.2, 0, 0.3]"),
    "image_mean": (lambda d: (d["preprocess_cfg"].pop("mean"),
                              d["model_cfg"]["vision_cfg"].update(image_mean=[0.5, "x", 0.5])),
                   "vision_cfg.image_mean must be 3 numbers (R, G, B), not [0.5, 'x', 0.5]"),
    "vision layers": (_set("model_cfg", "vision_cfg", "layers", value=-1),
                      "vision_cfg.layers must be a positive integer, not -1"),
    "vision width": (_set("model_cfg", "vision_cfg", "width", value="wide"),
                     "vision_cfg.width must be a positive integer, not 'wide'"),
    "head width": (_set("model_cfg", "vision_cfg", "head_width", value=0),
                   "vision_cfg.head_width must be a positive integer, not 0"),
    "context length": (_set("model_cfg", "text_cfg", "context_length", value="long"),
                       "text_cfg.context_length must be a positive integer, not 'long'"),
    "eos id": (_set("model_cfg", "text_cfg", "eos_id", value="3"),
               "text_cfg.eos_id must be a token id (an integer >= 0), not '3'"),
    "mlp ratio": (_set("model_cfg", "text_cfg", "mlp_ratio", value=float("nan")),
                  "text_cfg.mlp_ratio must be a positive number, not nan"),
    "norm eps": (_set("model_cfg", "vision_cfg", "norm_kwargs", value={"eps": "tiny"}),
                 "vision_cfg.norm_kwargs.eps must be a positive number, not 'tiny'"),
    "text_cfg": (_set("model_cfg", "text_cfg", value=[1, 2]),
                 "text_cfg must be a JSON object, not [1, 2]"),
    "tokenizer name": (_set("model_cfg", "text_cfg", "hf_tokenizer_name", value=5),
                       "text_cfg.hf_tokenizer_name must be a Hub id or a folder, not 5"),
}


def _bad_openclip_folder(tmp_path, case) -> Path:
    src = shutil.copytree(FIXTURES / "hub-gelu", tmp_path / "src")
    file = src / "open_clip_config.json"
    data = json.loads(file.read_text())
    BAD_CONFIG_VALUES[case][0](data)
    file.write_text(json.dumps(data))
    return src


@pytest.mark.parametrize("case", list(BAD_CONFIG_VALUES))
def test_convert_names_the_config_key_of_a_wrong_value(tmp_path, capsys, case):
    src = _bad_openclip_folder(tmp_path, case)
    assert main(["convert", "--from", "open_clip", str(src), "--out", str(tmp_path / "out")]) == 2
    want = f"{src / 'open_clip_config.json'}: {BAD_CONFIG_VALUES[case][1]}"
    assert one_line_error(capsys) == want
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["embed_dim", "mean", "vision layers"])
def test_eval_of_an_openclip_folder_names_the_config_key_of_a_wrong_value(tmp_path, capsys, case):
    src = _bad_openclip_folder(tmp_path, case)
    suite = tmp_path / "s.yaml"
    suite.write_text("tasks: [{task: zeroshot, data: {source: digits, split: test}}]\n")
    assert main(["eval", "--model", str(src), "--suite", str(suite), "--no-progress"]) == 2
    want = f"{src / 'open_clip_config.json'}: {BAD_CONFIG_VALUES[case][1]}"
    assert one_line_error(capsys) == want
