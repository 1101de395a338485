"""A folder saved in half precision loads in float32: cliplab's ``precision`` options (autocast)
choose the compute dtype, and a model saved again is float32 (transformers alone would load
and keep the folder's fp16 / bf16)."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel

from cliplab.models import DualEncoder
from tests.tiny_models import small_model

TEXTS = ["a photo of a cat", "two dogs on a red sofa"]
# unit embeddings; the weights' rounding (fp16: 2^-11 relative, bf16: 2^-8) moved them by at
# most 3.6e-4 (fp16) and 2.9e-3 (bf16) when measured: ten times that is allowed
EMBEDDING_TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 3e-2}


def _resaved_in(dtype: torch.dtype, folder, out):
    """``folder`` loaded by transformers in ``dtype`` and saved so (cliplab's files copied)."""
    CLIPModel.from_pretrained(folder, dtype=dtype).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "cliplab.json"):
        shutil.copy(folder / name, out / name)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {dtype}
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_folder_loads_in_float32_with_the_same_embeddings(dtype, tmp_path):
    original_dir = small_model().save(tmp_path / "fp32")
    half_dir = _resaved_in(dtype, original_dir, tmp_path / "half")
    original, loaded = DualEncoder.load(original_dir), DualEncoder.load(half_dir)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    own = original.model.state_dict()
    for key, value in loaded.model.state_dict().items():  # the weights, rounded, nothing else
        torch.testing.assert_close(value, own[key].to(dtype).float(), atol=0, rtol=0)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3),
                                                                 dtype=np.uint8))
    with torch.no_grad():
        for a, b in ((original.encode_texts(TEXTS), loaded.encode_texts(TEXTS)),
                     (original.encode_image(original.preprocess(images)),
                      loaded.encode_image(loaded.preprocess(images)))):
            assert b.dtype == torch.float32
            torch.testing.assert_close(b, a, atol=EMBEDDING_TOLERANCE[dtype], rtol=0)
    again = loaded.save(tmp_path / "again")
    assert {t.dtype for t in load_file(again / "model.safetensors").values()} == {torch.float32}
    assert json.loads((again / "config.json").read_text())["dtype"] == "float32"
