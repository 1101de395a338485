"""A model's embedding identity (`cliplab.models.fingerprints`): the same for a model saved and
loaded again (a cache or index must not miss for that), another for anything that changes an
embedding, and a difference named by the field that changed."""

from __future__ import annotations

import pytest

from cliplab.models import build_model
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.fingerprints import embedding_identity, identity_difference

SMALL = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2,
         "embed_dim": 16}


@pytest.mark.parametrize("preset, options", [("tiny-clip", SMALL),
                                             ("tiny-siglip", {k: v for k, v in SMALL.items()
                                                              if k != "embed_dim"}),
                                             ("lit-minilm", {"image_size": 16, "patch_size": 8,
                                                             "layers": 1})])
def test_a_model_saved_and_loaded_again_has_the_same_identity(preset, options, tmp_path):
    model = build_model(preset, **options)
    before = embedding_identity(model)
    model.encode_texts(["a much longer text than the others, to pad a batch", "a"])
    model.save(tmp_path / "m")
    again = DualEncoder.load(tmp_path / "m")
    assert embedding_identity(again) == embedding_identity(model) == before
    assert identity_difference(before, embedding_identity(again)) is None


def test_a_difference_is_named_by_its_field(tmp_path):
    model = build_model("tiny-clip", **SMALL)
    before = embedding_identity(model)
    model.context_length -= 1
    assert identity_difference(before, embedding_identity(model)) == \
        f"context length ({model.context_length + 1} then, {model.context_length} now)"
    model.context_length += 1
    model.preprocess_config.std = (0.25, 0.25, 0.25)
    assert identity_difference(before, embedding_identity(model)).startswith(
        "image preprocessing std ([")
    assert identity_difference({**before, "version": 0}, embedding_identity(model)) is None
