"""`cliplab convert` / `cliplab export`: results on disk, one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

from cliplab.cli import main
from cliplab.models.convert import load_openclip
from cliplab.models.dual_encoder import DualEncoder

FIXTURES = Path(__file__).parent / "fixtures" / "openclip"


def test_convert_then_export_open_clip(tmp_path, capsys):
    src = FIXTURES / "ddp-quickgelu" / "epoch_3.pt"
    assert main(["convert", "--from", "open_clip", str(src), "--out", str(tmp_path / "m")]) == 0
    model = DualEncoder.load(tmp_path / "m")
    assert model.model.config.text_config.hidden_act == "quick_gelu"
    assert main(["export", str(tmp_path / "m"), "--format", "open_clip",
                 "--out", str(tmp_path / "oc")]) == 0
    cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["quick_gelu"] is True
    back = load_openclip(tmp_path / "oc")
    assert back.model.config.vision_config.hidden_size == 48


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
