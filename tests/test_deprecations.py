"""cliplab under ``python -W error`` (a CI catching deprecations early): no deprecated API of
its dependencies is reached on a command's path."""

from __future__ import annotations

import warnings

import pytest
from pydantic import BaseModel, model_validator

from cliplab.config import refuse_unused


class Section(BaseModel):
    init: str = ""
    scale: float = 1.0

    @model_validator(mode="after")
    def _unused(self):
        if self.init == "":
            refuse_unused(self, ["scale"], "unless init is given")
        return self


def test_refusing_unused_keys_reads_no_deprecated_attribute():
    """It read ``model_fields`` on the instance (deprecated in Pydantic 2.11, gone in 3):
    under ``-W error`` every curate, adapt, merge and quickstart run failed with a traceback."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Section().scale == 1.0
        with pytest.raises(ValueError, match="scale has no effect unless init is given"):
            Section(scale=2.0)


def test_onnx_export_under_warnings_as_errors(tmp_path):
    """The TorchScript exporter is chosen knowingly (faster here); its deprecation notice
    failed `cliplab export --format onnx` under ``-W error``."""
    pytest.importorskip("onnxruntime")
    from cliplab.models.dual_encoder import DualEncoder
    from cliplab.models.onnx_export import export_onnx
    from tests.serve_helpers import save_tiny_model

    model = DualEncoder.load(save_tiny_model(tmp_path / "model"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (export_onnx(model, tmp_path / "onnx") / "image_encoder.onnx").is_file()
