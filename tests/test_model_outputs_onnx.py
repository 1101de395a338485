"""A damaged ONNX export folder (no tokenizer files, an onnx_export.json missing keys or with a
bad value) is one `ModelError` line naming the folder or file and what is missing, from the
Python API and the CLI alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cliplab.cli import main
from cliplab.errors import ModelError
from cliplab.models.onnx_export import export_onnx
from cliplab.models.resolve import load_model
from tests.tiny_models import small_model


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return export_onnx(small_model(), tmp_path_factory.mktemp("onnx") / "export")


@pytest.fixture
def damaged(export, tmp_path) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    return folder


def _edit_record(folder: Path, edit) -> Path:
    file = folder / "onnx_export.json"
    record = json.loads(file.read_text())
    edit(record)
    file.write_text(json.dumps(record))
    return file


def test_an_export_without_tokenizer_files_names_the_folder(damaged, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (damaged / name).unlink()
    # the message is `cliplab.models.loading.load_tokenizer`'s: the folder, then what is missing
    with pytest.raises(ModelError, match=f"^{damaged}: no tokenizer .*tokenizer.json"):
        load_model(str(damaged))
    assert main(["export", str(damaged), "--format", "onnx", "--out",
                 str(damaged.parent / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{damaged}: no tokenizer" in err


@pytest.mark.parametrize("drop", [("embed_dim",), ("kind", "logit_scale")])
def test_a_record_missing_keys_names_the_file_and_keys(damaged, drop):
    file = _edit_record(damaged, lambda r: [r.pop(key) for key in drop])
    missing = ", ".join(repr(key) for key in drop)
    with pytest.raises(ModelError) as err:
        load_model(str(damaged))
    assert str(err.value) == (f"{file}: missing {missing}; export the model again (cliplab "
                              "export --format onnx)")


@pytest.mark.parametrize("key, value", [("embed_dim", "sixteen"), ("context_length", 0),
                                        ("logit_scale", None), ("logit_bias", "x"),
                                        ("kind", 3)])
def test_a_record_with_a_bad_value_names_the_file_and_key(damaged, key, value):
    file = _edit_record(damaged, lambda r: r.update({key: value}))
    with pytest.raises(ModelError, match=f"^{file}: {key} {value!r} is not a valid value; "):
        load_model(str(damaged))


def test_a_record_that_is_no_object_is_one_line(damaged):
    file = damaged / "onnx_export.json"
    file.write_text("[1, 2]")
    with pytest.raises(ModelError, match=f"^{file}: must be a JSON object, not list$"):
        load_model(str(damaged))


def test_bad_preprocessing_in_the_record_names_the_record(damaged):
    file = _edit_record(damaged, lambda r: r.update(preprocess="bicubic"))
    with pytest.raises(ModelError) as err:
        load_model(str(damaged))
    assert str(err.value).startswith(f"{file}: ") and "preprocess" in str(err.value)
