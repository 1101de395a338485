"""Distribution shifts on images: hand examples, seeds, parsing, and `shift` on data sources."""

import pytest
import torch

from cliplab.data.shift import (apply_shift, gaussian_blur, gaussian_kernel, gaussian_noise, invert,
                                parse_shift)
from cliplab.data.sources import load_source
from cliplab.errors import ConfigError


def test_invert_on_a_hand_example():
    x = torch.tensor([0, 10, 128, 255], dtype=torch.uint8).view(1, 2, 2, 1)
    assert invert(x).flatten().tolist() == [255, 245, 127, 0]


def test_blur_of_a_single_bright_pixel_matches_the_hand_computed_kernel():
    # sigma 1, radius 3: k0 = 1 / (1 + 2(e^-1/2 + e^-2 + e^-9/2)) = 0.39905, k1 = 0.60653 k0
    x = torch.zeros(1, 9, 9, 1, dtype=torch.uint8)
    x[0, 4, 4, 0] = 255
    y = gaussian_blur(x, 1.0)[0, :, :, 0]
    assert y[4, 4] == 41          # 255 * k0^2 = 40.61
    assert y[4, 5] == y[3, 4] == 25  # 255 * k0 * k1 = 24.63
    assert y[5, 5] == 15          # 255 * k1^2 = 14.94
    assert y[0, 0] == 0 and y.dtype == torch.uint8
    assert abs(int(y.sum()) - 255) <= 8  # mass is kept up to rounding


def test_blur_keeps_a_flat_image_and_works_per_channel():
    x = torch.full((2, 6, 5, 3), 77, dtype=torch.uint8)
    x[..., 1] = 200
    y = gaussian_blur(x, 2.0)  # radius 6 > image size: replicated borders
    assert torch.equal(y, x)


def test_noise_has_the_asked_spread_is_seeded_and_clipped():
    x = torch.full((1, 200, 200, 1), 128, dtype=torch.uint8)
    y = gaussian_noise(x, 0.1, seed=3)
    diff = y.float() - 128
    assert abs(diff.mean()) < 0.3 and abs(diff.std() - 25.5) < 0.3
    assert torch.equal(y, gaussian_noise(x, 0.1, seed=3))
    assert not torch.equal(y, gaussian_noise(x, 0.1, seed=4))
    assert torch.equal(gaussian_noise(x, 0.0), x)
    high = gaussian_noise(torch.full((1, 50, 50, 1), 250, dtype=torch.uint8), 0.5)
    assert high.max() == 255 and high.min() == 0  # clipped, not wrapped around


def test_steps_compose_left_to_right_and_leave_the_input_alone():
    x = torch.randint(0, 256, (2, 8, 8, 1), dtype=torch.uint8)
    before = x.clone()
    assert torch.equal(apply_shift(x, "invert+blur:1"), gaussian_blur(invert(x), 1.0))
    assert torch.equal(apply_shift(x, "noise:0.2", seed=5), gaussian_noise(x, 0.2, seed=5))
    assert torch.equal(x, before)
    assert parse_shift("invert + noise:0.3") == [("invert", None), ("noise", 0.3)]


@pytest.mark.parametrize("bad", ["sepia", "noise", "noise:x", "blur:0", "invert:2", "", 3])
def test_bad_shift_specs_fail_with_one_line(bad):
    with pytest.raises(ConfigError) as err:
        parse_shift(bad)
    assert "\n" not in str(err.value)


def test_shift_option_on_a_labelled_source():
    plain = load_source({"source": "digits", "split": "test"})
    shifted = load_source({"source": "digits", "split": "test", "shift": "invert"})
    assert torch.equal(shifted.images, 255 - plain.images)
    assert torch.equal(shifted.labels, plain.labels) and shifted.name.endswith("-invert")
    noisy = load_source({"source": "digits", "split": "test", "shift": "noise:0.2",
                         "shift_seed": 1})
    assert torch.equal(noisy.images, gaussian_noise(plain.images, 0.2, seed=1))
    with pytest.raises(ConfigError, match="unknown shift"):
        load_source({"source": "digits", "shift": "swirl"})


def test_blur_kernel_reaches_three_sigma():
    # sigma 1: radius ceil(3 * 1) = 3, 7 taps. A bright column blurs to 255 * k3 3 columns away:
    # k3 = k0 * e^-9/2 = 0.39905 * 0.011109 = 0.00443, 255 * k3 = 1.13, rounded to 1
    assert len(gaussian_kernel(1.0)) == 7
    x = torch.zeros(1, 9, 9, 1, dtype=torch.uint8)
    x[0, :, 4, 0] = 255
    row = gaussian_blur(x, 1.0)[0, 4, :, 0]
    assert row[1] == row[7] == 1 and row[0] == row[8] == 0


@pytest.mark.parametrize("spec", ["noise:nan", "noise:inf", "blur:inf", "blur:nan"])
def test_a_shift_of_nan_or_inf_is_refused(spec):
    """`noise:nan` turned every image black without a word (NaN cast to uint8) and `blur:inf`
    was an OverflowError; the configs refuse NaN and infinity everywhere else."""
    with pytest.raises(ConfigError, match=rf"^shift '{spec}': the value must be a finite "
                                          r"positive number$"):
        parse_shift(spec)


def test_a_tiny_blur_leaves_the_image_as_it_is():
    """σ = 1e-200 squared underflows to 0: the kernel was NaN and the images black."""
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(gaussian_kernel(1e-200), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(apply_shift(images, "blur:1e-200"), images)
