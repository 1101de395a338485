"""`cliplab.models.embed`: PIL images and texts to unit rows, the same numbers as the towers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.errors import InputError
from cliplab.models import build_model
from cliplab.models.embed import embed_images, embed_texts


def tiny():
    return build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                       embed_dim=16, context_length=32)


def test_embed_images_matches_the_tower_in_any_batching_and_mode():
    model = tiny()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(5)]
    images = [Image.fromarray(a) for a in arrays]
    images[1] = images[1].convert("L")  # grey input is converted to RGB first
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))) for im in images])
        direct = model.encode_image(model.preprocess(pixels)).numpy()
    got = embed_images(model, images, batch_size=2, progress=True)
    assert got.dtype == np.float32 and got.shape == (5, 16)
    np.testing.assert_allclose(got, direct, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert embed_images(model, []).shape == (0, 16)


def test_embed_texts_matches_encode_texts_across_batches():
    model = tiny()
    texts = ["a red circle", "a blue square", "two green triangles", "x"]
    got = embed_texts(model, texts, batch_size=3)
    np.testing.assert_allclose(got, model.encode_texts(texts).numpy(), atol=1e-5)
    assert embed_texts(model, []).shape == (0, 16)
    # one string is one text (it was embedded one character per row)
    np.testing.assert_allclose(embed_texts(model, "a red circle"), got[:1], atol=1e-5)
    assert model.encode_texts("a blue square").shape == (1, 16)


def test_one_template_string_is_one_prompt_per_class():
    from cliplab.evaluate.zeroshot import zeroshot_classifier

    model = tiny()
    names = ["circle", "square"]
    torch.testing.assert_close(zeroshot_classifier(model, names, "a photo of a {}."),
                               zeroshot_classifier(model, names, ["a photo of a {}."]))


def test_embed_images_converts_palette_and_16_bit_images_as_the_decoder_does():
    from cliplab.models.preprocess import convert_image

    model = tiny()
    rng = np.random.default_rng(1)
    palette = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).quantize(8)
    deep = Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16))
    assert (palette.mode, deep.mode) == ("P", "I;16")
    got = embed_images(model, [palette, deep])
    # the palette's colours (not its indices), the 16-bit values scaled to 8 bits
    want = embed_images(model, [palette.convert("RGB"), convert_image(deep)])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_embed_images_takes_one_image_and_uint8_arrays_as_it_takes_pil_images():
    """One PIL image was a TypeError (no len()), a NumPy image or a uint8 batch an
    AttributeError deep in PIL's conversion."""
    model = tiny()
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (20, 50), dtype=np.uint8)
    as_pil = embed_images(model, [Image.fromarray(colour), Image.fromarray(grey)])
    np.testing.assert_allclose(embed_images(model, [colour, torch.from_numpy(grey)]), as_pil,
                               atol=1e-6)
    np.testing.assert_allclose(embed_images(model, Image.fromarray(colour)), as_pil[:1],
                               atol=1e-6)
    np.testing.assert_allclose(embed_images(model, colour), as_pil[:1], atol=1e-6)
    np.testing.assert_allclose(embed_images(model, np.stack([colour, colour])),
                               as_pil[[0, 0]], atol=1e-6)


@pytest.mark.parametrize("given, said", [
    ("cat.jpg", r"embed_images: expected images \(PIL images or uint8 arrays\), not a str "
                r"'cat.jpg' \(open image files with PIL.Image.open\)"),
    (["cat.jpg"], r"embed_images: images\[0\] is a str 'cat.jpg', not a PIL image or a uint8 "
                  r"array \(open"),
    ([3], r"images\[0\] is an int, not a PIL image"),
    ([np.zeros((4, 4, 3))], r"expected uint8 images \(0-255\), got torch.float64"),
])
def test_embed_images_refuses_what_is_not_an_image_in_one_line(given, said):
    with pytest.raises(InputError, match=said):
        embed_images(tiny(), given)


def test_embed_images_given_a_dataset_says_to_pass_its_images():
    class Dataset:  # a LabelledImages as a user holds it
        images = np.zeros((1, 4, 4, 3), np.uint8)

    with pytest.raises(InputError, match=r"not a Dataset \(pass its .images\)"):
        embed_images(tiny(), Dataset())


@pytest.mark.parametrize("given, said", [
    (["cat.jpg"], r"^images\[0\] is a str 'cat.jpg', not a PIL image or a uint8 array \(open"),
    ("imgs", r"^expected images \(PIL images or uint8 arrays\), not a str 'imgs'"),
])
def test_encode_images_given_paths_says_to_open_them(given, said):
    """A path list was a TypeError from NumPy (`can't convert np.ndarray of type numpy.str_`)."""
    from cliplab.evaluate.features import encode_images

    with pytest.raises(InputError, match=said):
        encode_images(tiny(), given)
