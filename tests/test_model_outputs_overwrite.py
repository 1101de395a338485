"""--overwrite of `cliplab convert` and `cliplab export` replaces a previous output of the same
kind only when the folder holds nothing but that output's own files: a file or folder of the
user's in it (notes, logs, embeddings) makes the command refuse on one line, deleting nothing.
The lists of each output's own files cover everything its writer writes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from cliplab.cli import main
from cliplab.errors import ModelError
from cliplab.models.convert import export_openclip
from cliplab.models.convert.openclip_export import OPENCLIP_EXPORT
from cliplab.models.onnx_export import ONNX_EXPORT, export_onnx
from cliplab.output_folder import MODEL_FOLDER, check_out
from tests.cli_output import folder_tree as _tree, one_line_error as _one_line
from tests.tiny_models import bare_siglip, small_model

OPENCLIP = Path(__file__).parent / "fixtures" / "openclip" / "hub-gelu"


def _add_users_files(folder: Path) -> None:
    (folder / "my-notes").mkdir()
    (folder / "my-notes" / "results.txt").write_text("three weeks of results")
    (folder / "train-log.txt").write_text("my log")


def _remove_users_files(folder: Path) -> None:
    shutil.rmtree(folder / "my-notes")
    (folder / "train-log.txt").unlink()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return small_model().save(tmp_path_factory.mktemp("outputs") / "model")


def test_convert_overwrite_keeps_a_users_files_in_a_model_folder(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "ow"
    shutil.copytree(OPENCLIP, src)
    assert main(["convert", str(src), "--out", str(out)]) == 0
    _add_users_files(out)
    before = _tree(out)
    assert main(["convert", str(src), "--out", str(out), "--overwrite"]) == 2
    assert _one_line(capsys) == (f"--overwrite replaces only a previous convert output; {out} "
                                 "holds other files (e.g. my-notes); choose a new folder")
    assert _tree(out) == before
    _remove_users_files(out)  # the previous output alone is replaced
    (out / "config.json").write_text("{}")
    assert main(["convert", str(src), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "clip"


@pytest.mark.parametrize("fmt, kind, user_file", [
    ("onnx", "ONNX export", "embeddings.npy"),
    ("open_clip", "OpenCLIP export", "embeddings.npy"),
])
def test_export_overwrite_keeps_a_users_files_in_an_export(model_dir, tmp_path, capsys, fmt,
                                                           kind, user_file):
    out = tmp_path / "export"
    args = ["export", str(model_dir), "--format", fmt, "--out", str(out)]
    assert main(args) == 0
    (out / user_file).write_bytes(b"\x93NUMPY my embeddings")
    before = _tree(out)
    assert main([*args, "--overwrite"]) == 2
    assert _one_line(capsys) == (f"--overwrite replaces only a previous {kind} output; {out} "
                                 f"holds other files (e.g. {user_file}); choose a new folder")
    assert _tree(out) == before
    (out / user_file).unlink()  # the previous export alone is replaced
    assert main([*args, "--overwrite"]) == 0
    assert user_file not in {p.name for p in out.iterdir()}


def test_a_folder_of_output_names_without_its_marker_is_not_replaced(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my own readme")
    with pytest.raises(ModelError, match=r"mine has no cliplab.json; choose a new folder$"):
        check_out(folder, "convert", overwrite=True, previous=MODEL_FOLDER, error=ModelError)
    (folder / "cliplab.json").mkdir()  # a folder of that name is not the file
    assert not MODEL_FOLDER(folder)


def _assert_own(previous, folder: Path) -> None:
    assert previous.foreign(folder) is None and previous(folder), sorted(
        p.name for p in folder.iterdir())


def test_every_file_a_model_save_writes_is_a_model_folders_own(model_dir, tmp_path):
    from cliplab.models.loading import TOKENIZER_VOCABULARIES as READ_AS_TOKENIZER
    from cliplab.output_folder import TOKENIZER_FILES

    _assert_own(MODEL_FOLDER, model_dir)
    _assert_own(MODEL_FOLDER, bare_siglip(16).save(tmp_path / "siglip"))
    # weights over save_pretrained's shard size: model-0000i-of-0000n.safetensors + index
    sharded = small_model().save(tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    small_model().model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    _assert_own(MODEL_FOLDER, sharded)
    assert set(READ_AS_TOKENIZER) <= TOKENIZER_FILES  # every tokenizer file cliplab reads


def test_every_file_an_export_writes_is_that_exports_own(model_dir, tmp_path):
    from cliplab.models.dual_encoder import DualEncoder

    model = DualEncoder.load(model_dir)
    _assert_own(ONNX_EXPORT, export_onnx(model, tmp_path / "onnx"))
    _assert_own(OPENCLIP_EXPORT, export_openclip(model, tmp_path / "oc"))
    assert not ONNX_EXPORT(model_dir) and not OPENCLIP_EXPORT(model_dir)
    assert not MODEL_FOLDER(tmp_path / "onnx") and not MODEL_FOLDER(tmp_path / "oc")


def test_the_weight_files_of_an_onnx_graph_over_2gb_are_its_own(tmp_path):
    """A tower over 2 GB is exported with its initializers in files beside the graph."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path / "onnx"
    folder.mkdir()
    weight = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "tower.weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "tower.weight"], ["y"])], "tower",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    onnx.save_model(helper.make_model(graph), str(folder / "image_encoder.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    (folder / "onnx_export.json").write_text("{}")
    assert (folder / "tower.weight").is_file()
    _assert_own(ONNX_EXPORT, folder)
    (folder / "notes.txt").write_text("mine")
    assert ONNX_EXPORT.foreign(folder) == "notes.txt" and not ONNX_EXPORT(folder)


def test_a_sub_folder_named_like_an_output_file_is_the_users(model_dir, tmp_path):
    """A folder called README.md (or a weight shard's name) holds the user's files: the model
    folder holding it is not replaced whole."""
    for name in ("README.md", "model-00001-of-00002.safetensors"):
        out = shutil.copytree(model_dir, tmp_path / name.split(".")[0])
        (out / "README.md").unlink(missing_ok=True)
        (out / name).mkdir()
        (out / name / "notes.txt").write_text("mine")
        assert MODEL_FOLDER.foreign(out) == name and not MODEL_FOLDER(out)
        with pytest.raises(ModelError, match=f"holds other files \\(e.g. {re.escape(name)}\\)"):
            check_out(out, "convert", overwrite=True, previous=MODEL_FOLDER, error=ModelError)
