"""Resize modes OpenCLIP checkpoints carry (shortest / squash / longest, bilinear / bicubic)."""

import pytest
import torch

from cliplab.models.preprocess import PreprocessConfig, resize_center_crop


def test_longest_pads_the_short_side_with_zeros():
    x = torch.ones(1, 3, 2, 4)
    out = resize_center_crop(x, 4, mode="longest")
    assert out.shape == (1, 3, 4, 4)
    assert torch.equal(out[0, 0], torch.tensor([[0.] * 4, [1.] * 4, [1.] * 4, [0.] * 4]))


def test_squash_keeps_the_whole_image_and_shortest_crops():
    x = torch.zeros(1, 1, 4, 8)
    x[..., :2] = 1.0  # a bar at the left edge
    squashed = resize_center_crop(x, 4, mode="squash")
    cropped = resize_center_crop(x, 4, mode="shortest")
    assert squashed.shape == cropped.shape == (1, 1, 4, 4)
    assert squashed[0, 0, :, 0].min() > 0.5  # the bar survives squashing...
    assert cropped.abs().max() == 0  # ...and is cropped away by the centre crop


def test_bicubic_stays_in_range_and_configs_round_trip():
    x = torch.zeros(1, 3, 5, 5)
    x[..., 2, 2] = 1.0
    out = resize_center_crop(x, 9, mode="squash", interpolation="bicubic")
    assert out.min() >= 0 and out.max() <= 1
    pre = PreprocessConfig(image_size=9, resize_mode="longest", interpolation="bicubic")
    assert PreprocessConfig.from_dict(pre.to_dict()) == pre
    assert PreprocessConfig.from_dict({"image_size": 9, "mean": [0, 0, 0], "std": [1, 1, 1]}) \
        .resize_mode == "shortest"  # folders saved before the field existed
    with pytest.raises(ValueError, match="resize_mode"):
        resize_center_crop(x, 9, mode="stretch")
