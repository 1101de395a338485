"""A model whose weights are not finite (a run that diverged) is one error wherever it embeds:
NaN scores were argmax'd to class 0, so eval reported class 0's share as accuracy, an index
was built of NaN vectors and a linear probe failed inside LAPACK."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import yaml

from cliplab.cli import main
from cliplab.errors import ModelError
from cliplab.evaluate.features import encode_images
from cliplab.models import build_model
from cliplab.models.embed import embed_images, embed_texts
from tests.serve_helpers import SHAPES

BROKEN = r"of \d+ (image|text) embeddings are NaN or infinite: the model is broken"


def broken_model(value: float = float("nan")):
    """A tiny-clip whose last projections hold ``value`` (NaN, or a finite value so large
    that the embeddings overflow)."""
    model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                        embed_dim=16, context_length=32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "projection" in name:
                param.fill_(value)
    return model


@pytest.mark.parametrize("value", [float("nan"), 3e38])
def test_every_embedding_path_refuses_a_broken_model(value):
    model = broken_model(value)
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ModelError, match=r"^3 of 3 image embeddings are NaN or infinite"):
        encode_images(model, images, progress=False)
    with pytest.raises(ModelError, match=r"^3 of 3 image embeddings"):
        embed_images(model, list(images))
    with pytest.raises(ModelError, match=r"^2 of 2 text embeddings"):
        model.encode_texts(["a cat", "a dog"])
    with pytest.raises(ModelError, match=r"^1 of 1 text embeddings"):
        embed_texts(model, "a cat")


def test_a_healthy_model_passes_the_check():
    model = broken_model(0.01)
    assert np.isfinite(embed_texts(model, ["a cat", "a dog"])).all()


@pytest.mark.parametrize("command", ["eval", "index"])
def test_eval_and_index_of_a_broken_model_folder_are_one_line(command, tmp_path, capsys):
    folder = tmp_path / "model"
    broken_model().save(folder)
    out = tmp_path / "out"
    if command == "eval":
        suite = tmp_path / "suite.yaml"
        suite.write_text(yaml.safe_dump({"tasks": [
            {"name": "colour", "task": "zeroshot",
             "data": {**SHAPES, "kinds": None, "attribute": "color"}}]}))
        argv = ["eval", "--config", str(suite), "--model", str(folder), "--out", str(out)]
    else:
        argv = ["index", "--model", str(folder), "--data", "shapes", "data.n=20",
                "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(BROKEN, err[-1]), err
    assert not (out / "results.json").exists() and not (out / "vectors.npy").exists()


def test_a_cached_entry_of_nan_embeddings_is_refused_as_the_model_is(tmp_path, monkeypatch):
    """A feature cache written before embeddings were checked gave back NaN embeddings,
    scored as class 0 (the check ran only on a miss)."""
    from cliplab.evaluate import features
    from cliplab.evaluate.feature_cache import FeatureCache

    model = broken_model()
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    # the entry as the old code wrote it: NaN embeddings, unchecked
    monkeypatch.setattr(features, "finite_embeddings", lambda embeddings, what: embeddings)
    FeatureCache(tmp_path).features(model, images, progress=False)
    monkeypatch.undo()
    assert list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ModelError, match=r"^3 of 3 image embeddings are NaN or infinite"):
        FeatureCache(tmp_path).features(model, images, progress=False)
