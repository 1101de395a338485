"""Batch preprocessing without torchvision."""

import torch

from cliplab.models.preprocess import (CLIP_MEAN, CLIP_STD, AugmentConfig, ImagePreprocessor,
                                       PreprocessConfig, random_affine, resize_center_crop,
                                       to_float_rgb)


def test_grayscale_becomes_rgb_and_is_normalised_by_hand():
    img = torch.tensor([[[[0], [255]], [[51], [102]]]], dtype=torch.uint8)  # [1, 2, 2, 1]
    pre = ImagePreprocessor(PreprocessConfig(image_size=2, mean=(0.5, 0.5, 0.5),
                                             std=(0.25, 0.25, 0.25)))
    out = pre(img)
    assert out.shape == (1, 3, 2, 2)
    expected = (torch.tensor([[0.0, 1.0], [0.2, 0.4]]) - 0.5) / 0.25
    for c in range(3):
        torch.testing.assert_close(out[0, c], expected)


def test_resize_keeps_aspect_then_crops_the_centre():
    x = torch.zeros(1, 3, 10, 20)
    x[..., :, 5:15] = 1.0  # a bright centre band
    out = resize_center_crop(x, 10)
    assert out.shape == (1, 3, 10, 10)
    assert out.mean() > 0.95  # the crop kept the centre band only


def test_rgba_and_pil_inputs():
    from PIL import Image

    pil = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    out = ImagePreprocessor(PreprocessConfig(image_size=4, mean=(0, 0, 0), std=(1, 1, 1)))(pil)
    assert out.shape == (2, 3, 4, 4)
    assert torch.allclose(out[0, 0], torch.ones(4, 4)) and torch.allclose(out[1, 2], torch.ones(4, 4))
    rgba = torch.zeros(1, 4, 4, 4, dtype=torch.uint8)
    assert to_float_rgb(rgba).shape == (1, 3, 4, 4)
    pre = ImagePreprocessor(PreprocessConfig(image_size=4, mean=(0, 0, 0), std=(1, 1, 1)))
    torch.testing.assert_close(pre(pil[0]), out[:1])  # one PIL image: a batch of one
    import pytest

    with pytest.raises(ValueError, match="different sizes.*embed_images resizes"):
        pre([pil[0], Image.new("RGB", (6, 8))])


def test_identity_augmentation_changes_nothing_and_flip_mirrors():
    x = torch.rand(3, 3, 8, 8)
    none = AugmentConfig(scale=(1.0, 1.0), translate=0.0, rotate_deg=0.0, hflip=False)
    torch.testing.assert_close(random_affine(x, none), x, atol=1e-5, rtol=0)

    flip = AugmentConfig(scale=(1.0, 1.0), translate=0.0, rotate_deg=0.0, hflip=True)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    out = random_affine(x, flip, g)
    for i in range(3):
        want = x[i].flip(-1) if u[i, 4] < 0.5 else x[i]
        torch.testing.assert_close(out[i], want, atol=1e-5, rtol=0)


def test_train_augmentation_is_random_but_seeded_and_keeps_background():
    pre = ImagePreprocessor(PreprocessConfig(image_size=16, mean=(0, 0, 0), std=(1, 1, 1)))
    img = torch.zeros(4, 16, 16, 1, dtype=torch.uint8)
    img[:, 6:10, 6:10] = 255
    a = pre(img, train=True, generator=torch.Generator().manual_seed(1))
    b = pre(img, train=True, generator=torch.Generator().manual_seed(1))
    c = pre(img, train=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # each image draws its own transform
    assert a[:, :, 0, 0].abs().max() < 1e-6  # the black background stays black at the borders


def test_grayscale_is_augmented_as_one_channel_with_the_same_pixels_as_its_rgb_copy():
    pre = ImagePreprocessor(PreprocessConfig(image_size=12))
    gray = torch.randint(0, 256, (5, 12, 12, 1), dtype=torch.uint8)
    rgb = gray.expand(-1, -1, -1, 3).contiguous()
    for train in (False, True):
        a = pre(gray, train=train, generator=torch.Generator().manual_seed(3))
        b = pre(rgb, train=train, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_an_alpha_channel_is_dropped_keeping_red_green_blue():
    rgba = torch.tensor([10, 20, 30, 255], dtype=torch.uint8).expand(1, 2, 2, 4)
    out = to_float_rgb(rgba)
    for c, value in enumerate((10, 20, 30)):
        torch.testing.assert_close(out[0, c], torch.full((2, 2), value / 255))


def test_longest_mode_rounds_the_short_side_and_pads_it_centred():
    # 6 x 10 to 8: scale 0.8, 6 * 0.8 = 4.8 rounds to 5 rows (as OpenCLIP's ResizeKeepRatio);
    # the 3 padding rows split 1 above, 2 below (torchvision's centre-crop padding)
    out = resize_center_crop(torch.ones(1, 1, 6, 10), 8, "longest")
    assert out.shape == (1, 1, 8, 8)
    torch.testing.assert_close(out[0, 0, 1:6], torch.ones(5, 8))
    assert out[0, 0, [0, 6, 7]].abs().max() == 0


def test_augmentation_fills_the_border_with_a_white_background():
    pre = ImagePreprocessor(PreprocessConfig(image_size=16))
    img = torch.full((2, 16, 16, 3), 255, dtype=torch.uint8)
    img[:, 6:10, 6:10] = 0
    # zooming out to half size pulls the whole border from outside the image
    shrink = AugmentConfig(scale=(0.5, 0.5), translate=0.1, rotate_deg=10.0, hflip=False)
    out = pre(img, train=True, generator=torch.Generator().manual_seed(0), augment=shrink)
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)  # 255, normalised
    for corner in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        torch.testing.assert_close(out[:, :, corner[0], corner[1]], white.expand(2, 3))


def test_rotate_deg_is_in_degrees():
    # a horizontal ramp (1/15 per pixel) turned by at most 1 degree: a pixel within 8 px of the
    # centre moves by at most 8 * sin(1 deg) = 0.14 px, so its value by at most 0.14 / 15 < 0.01
    # (the interior only: the border may pull zeros from outside)
    x = (torch.arange(16.0) / 15).expand(4, 1, 16, 16)
    turn = AugmentConfig(scale=(1.0, 1.0), translate=0.0, rotate_deg=1.0, hflip=False)
    out = random_affine(x, turn, torch.Generator().manual_seed(0))
    assert (out - x)[..., 2:-2, 2:-2].abs().max() < 0.012


def test_shortest_resize_truncates_the_long_side_as_torchvision():
    """Guards one-pixel parity with torchvision's ``Resize(size)`` (OpenCLIP) and transformers'
    ``shortest_edge``: the long side is truncated, 224 * 640 / 480 = 298.67 gives 298, not 299."""
    from cliplab.models.preprocess import keep_ratio_size

    assert keep_ratio_size(480, 640, 224, "shortest") == (224, 298)
    assert keep_ratio_size(640, 480, 224, "shortest") == (298, 224)
    assert keep_ratio_size(3, 4, 2, "shortest") == (2, 2)  # 2.67 -> 2
    # so a 3 x 4 image to 2 is resized to 2 x 2 whole (no crop), not to 2 x 3 and cropped
    from cliplab.models.preprocess import resize_like_pil

    x = torch.rand(1, 3, 3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(resize_center_crop(x, 2), resize_like_pil(x, (2, 2), "bilinear"))


def test_centre_crop_rounds_its_offset_down():
    """Guards the crop offset of transformers' centre crop: an odd surplus of one pixel leaves
    the extra column (row) on the right (bottom), so a 4 x 5 ramp keeps columns 0-3, not 1-4."""
    cols = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 4, 5).contiguous()
    out = resize_center_crop(cols, 4)
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0].tolist() == [[0.0, 1.0, 2.0, 3.0]] * 4
    rows = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 1, 5, 4).contiguous()
    assert resize_center_crop(rows, 4)[0, 0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    # a surplus of three: offset 1 (3 // 2), columns 1-4 of 0-6
    wide = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 1, 4, 7).contiguous()
    assert resize_center_crop(wide, 4)[0, 0, 0].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_a_long_strip_is_cut_alike_from_both_ends():
    """Guards `enlarged_span` evening out the cut: of a 1 x 19 strip enlarged to 4 the central
    17 columns (16 * 1, plus one so 19 - 17 splits evenly) are kept, 1 from each end."""
    from cliplab.models.preprocess import MAX_ENLARGED_ASPECT, enlarged_span

    assert MAX_ENLARGED_ASPECT == 16
    assert enlarged_span(1, 19, 4) == (slice(None), slice(1, 18))
    assert enlarged_span(19, 1, 4) == (slice(1, 18), slice(None))
    assert enlarged_span(1, 20, 4) == (slice(None), slice(2, 18))  # even surplus: 16 kept
    assert enlarged_span(1, 16, 4) == (slice(None), slice(None))  # short enough: whole


def test_augmentation_fill_is_the_top_left_colour():
    """Guards which corner names the background: an image white at the top left and black at
    the bottom right, zoomed out to half size, is filled white all round (the top-left pixel's
    colour), not black."""
    pre = ImagePreprocessor(PreprocessConfig(image_size=16))
    img = torch.zeros((1, 16, 16, 3), dtype=torch.uint8)
    img[:, :8, :8] = 255
    shrink = AugmentConfig(scale=(0.5, 0.5), translate=0.0, rotate_deg=0.0, hflip=False)
    out = pre(img, train=True, generator=torch.Generator().manual_seed(0), augment=shrink)
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    for corner in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        torch.testing.assert_close(out[0, :, corner[0], corner[1]], white)


def test_bicubic_resizes_on_the_cpu_are_pils_own_pixels():
    """PIL rounds its two bicubic passes to uint8 and chooses their order itself: a tall page
    of thin lines, resized one pass after the other in a fixed order, was 29/255 off PIL (and
    transformers' processor, which resizes with PIL); on the CPU PIL resizes it now."""
    import numpy as np
    from PIL import Image, ImageDraw

    from cliplab.models.preprocess import PreprocessConfig, resize_like_pil

    page = Image.new("RGB", (257, 694), "white")
    draw = ImageDraw.Draw(page)
    for y in range(0, 694, 3):
        draw.line([(0, y), (257, y)], fill=(0, 0, 0))
    for x in range(0, 257, 7):
        draw.line([(x, 0), (x, 694)], fill=(20, 20, 20))
    for image in (page, page.transpose(Image.Transpose.TRANSPOSE), page.convert("L")):
        w, h = image.size
        new = (224, round(224 * h / w)) if w < h else (round(224 * w / h), 224)
        pil = torch.from_numpy(np.asarray(image.resize(new, Image.Resampling.BICUBIC)).copy())
        x = torch.from_numpy(np.asarray(image).copy()).float().div(255)
        x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
        ours = resize_like_pil(x, (new[1], new[0]), "bicubic")[0].mul(255).round().byte()
        assert torch.equal(ours, pil[None] if pil.ndim == 2 else pil.permute(2, 0, 1))
    config = PreprocessConfig(image_size=224, interpolation="bicubic")
    pixels = ImagePreprocessor(config)([page])
    side = 224 * 694 // 257
    top = (side - 224) // 2  # the centre crop rounds down, as transformers' does
    cropped = np.asarray(page.resize((224, side), Image.Resampling.BICUBIC))[top:top + 224]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (config.mean, config.std))
    expected = (torch.from_numpy(cropped.copy()).permute(2, 0, 1).float() / 255 - mean) / std
    assert (pixels[0] - expected).abs().max() < 1e-5
