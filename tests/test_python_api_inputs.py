"""The Python API takes inputs as a user has them: one image is one image (not H rows of
pixels), one string one text (not one per character), lists of PIL images and numpy batches
beside uint8 tensors; floats and channels-first batches are one clear error; a Trainer takes a
dict and a path."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.adapt import get_method
from cliplab.adapt.base import AdaptContext
from cliplab.data.digits import load_digits
from cliplab.data.shapes import load_shapes
from cliplab.errors import CliplabError, InputError
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.zeroshot import zeroshot_classifier
from cliplab.models.preprocess import to_uint8_batch
from cliplab.train.trainer import Trainer
from tests.tiny_models import small_model


def _images(n: int, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(n))


def test_one_image_is_a_batch_of_one_in_every_layout(tiny_model):
    batch = _images(3, 20)
    want = encode_images(tiny_model, batch[:1], progress=False).embeddings
    pil = Image.fromarray(batch[0].numpy())
    for one in (batch[0], batch[0].numpy(), pil, [pil]):
        got = encode_images(tiny_model, one, progress=False).embeddings
        assert got.shape == (1, tiny_model.embed_dim)  # the old code gave 20 rows for [H, W, 3]
        assert torch.allclose(got, want, atol=1e-6)
    assert tiny_model.preprocess(batch[0]).shape[0] == 1
    grey = batch[0, :, :, 0]  # one greyscale image [H, W]
    assert encode_images(tiny_model, grey, progress=False).embeddings.shape[0] == 1
    # a batch of greyscale images [B, H, W] stays a batch
    assert encode_images(tiny_model, batch[..., 0], progress=False).embeddings.shape[0] == 3


def test_float_and_channels_first_images_are_one_clear_error(tiny_model):
    with pytest.raises(InputError, match=r"expected uint8 images \(0-255\), got torch.float32 "
                                         r"\(for floats in \[0, 1\]: \(x \* 255\)"):
        encode_images(tiny_model, _images(2).float() / 255, progress=False)
    with pytest.raises(InputError, match=r"got shape \(2, 3, 16, 16\) \(channels first: use "
                                         r"x.permute\(0, 2, 3, 1\)\)"):
        to_uint8_batch(_images(2).permute(0, 3, 1, 2))
    with pytest.raises(ValueError):  # still a ValueError for code that caught one
        to_uint8_batch(np.zeros((2, 5, 5, 5, 3), np.uint8))
    assert issubclass(InputError, CliplabError)


def test_adapter_logits_take_pil_lists_numpy_and_one_image(tiny_model):
    digits = load_digits("test")
    train = digits.subset(torch.arange(40))
    ctx = AdaptContext(cache=FeatureCache(), progress=False)
    adapter = get_method("linear-probe").fit(tiny_model, train, {}, ctx)
    images = digits.images[:4]
    want = adapter.logits(images)
    assert want.shape == (4, 10)
    pils = [Image.fromarray(im.numpy().squeeze()) for im in images]
    assert torch.allclose(adapter.logits(pils), want, atol=1e-5)
    assert torch.allclose(adapter.logits(images.numpy()), want, atol=1e-5)
    one = adapter.logits(images[0])  # the old code gave one row per pixel row
    assert one.shape == (1, 10) and torch.allclose(one, want[:1], atol=1e-5)
    with pytest.raises(InputError, match=r"float input must be image embeddings \[N, D\], got "
                                         r"shape \(4, 8, 8, 1\)"):
        adapter.logits(images.float())


def test_one_class_name_is_one_class_not_one_per_character(tiny_model):
    head = zeroshot_classifier(tiny_model, "cat", ["a photo of a {}."])
    assert head.shape == (1, tiny_model.embed_dim)  # the old code built 'c', 'a', 't'
    assert torch.allclose(head, zeroshot_classifier(tiny_model, ["cat"], "a photo of a {}."))
    with pytest.raises(InputError, match="at least one class name and one template"):
        zeroshot_classifier(tiny_model, ["cat", "dog"], [])


def test_onnx_export_encodes_one_string_as_one_text(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    from cliplab.models.onnx_encoder import load_onnx
    from cliplab.models.onnx_export import export_onnx

    onnx_model = load_onnx(export_onnx(tiny_model, tmp_path / "onnx"))
    one = onnx_model.encode_texts("a cat")
    assert one.shape == (1, tiny_model.embed_dim)  # the old code gave one row per character
    assert torch.allclose(one, onnx_model.encode_texts(["a cat"]))


def test_trainer_takes_a_dict_config_and_a_path_run_folder(tmp_path):
    pairs = load_shapes(n=32, seed=0, kinds=("single",), image_size=32)
    Trainer(small_model(), {"steps": 2, "batch_size": 16, "log_every": 1, "progress": False},
            str(tmp_path / "run")).fit(pairs)  # the old code crashed at its first log
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in records] == [1, 2]
    with pytest.raises(CliplabError, match="train.lrr"):
        Trainer(small_model(), {"lrr": 1.0})


def test_configs_from_python_take_pathlib_paths(tmp_path, tiny_model_dir):
    """A dict config holding `Path` values (as a notebook writes it) validates as strings
    (pydantic refused them: "expected a valid string, got PosixPath")."""
    from pathlib import Path

    from cliplab.config import validate
    from cliplab.merge.config import MergeConfig
    from cliplab.models.resolve import load_model

    cfg = validate(MergeConfig, {"method": "uniform", "models": [tiny_model_dir, tiny_model_dir],
                                 "out": tmp_path / "m"})
    assert [m.name for m in cfg.models] == [str(tiny_model_dir)] * 2
    assert cfg.out == str(tmp_path / "m")
    assert load_model({"name": Path(tiny_model_dir)}).embed_dim == 16


def test_dual_encoder_load_expands_the_home_folder(tmp_path, tiny_model, monkeypatch):
    from cliplab.models import DualEncoder

    tiny_model.save(tmp_path / "m")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert DualEncoder.load("~/m").embed_dim == tiny_model.embed_dim  # as load_model does
