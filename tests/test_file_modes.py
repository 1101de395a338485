"""What cliplab writes gets the modes the user's umask gives: safetensors writes its files
owner-only (0600) and mkdtemp makes 0700 folders, so models, heads, adapters and exports were
unreadable by a serving account or a colleague while every other file was not."""

import os
import stat
from pathlib import Path

import pytest

from cliplab.adapt.head import zeroshot_classifier_head
from cliplab.adapt.lora import Options, add_lora, save_adapter
from cliplab.data.digits import load_digits
from cliplab.models.convert.openclip_export import export_openclip
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.folder import model_fingerprint
from cliplab.models.onnx_export import export_onnx
from tests.tiny_models import small_model

UMASK = 0o027  # not the usual 022: the modes must follow the umask, not a constant


@pytest.fixture
def umask():
    old = os.umask(UMASK)
    yield
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
            for p in [folder, *folder.rglob("*")]}


def _assert_umask_modes(folder: Path) -> None:
    want = {name: (0o777 if (folder / name).is_dir() else 0o666) & ~UMASK
            for name in _modes(folder)}
    assert _modes(folder) == want


def test_model_folders_exports_heads_and_adapters_follow_the_umask(tmp_path, umask):
    model = small_model()
    model.save(tmp_path / "model")
    _assert_umask_modes(tmp_path / "model")
    for export in (export_onnx(model, tmp_path / "onnx"),
                   export_openclip(model, tmp_path / "openclip")):
        _assert_umask_modes(export)
    head = zeroshot_classifier_head(DualEncoder.load(tmp_path / "model"),
                                    load_digits(split="test"))
    head.save(tmp_path / "head")
    _assert_umask_modes(tmp_path / "head")
    peft_model = add_lora(DualEncoder.load(tmp_path / "model"),
                          Options.model_validate({"rank": 4, "towers": ["image"]}))
    adapter = save_adapter(peft_model, tmp_path / "adapter", str(tmp_path / "model"),
                           model_fingerprint(model), head)
    _assert_umask_modes(adapter)
