"""``preprocessor_config.json`` both ways: transformers' image processors loaded from what cliplab
writes give cliplab's pixels, and cliplab reads a plain HF folder's processor as transformers
does (or refuses, naming the key). Also ``cliplab.json``'s ``preprocess`` record is checked when
the folder loads, not when an image is first encoded.

Tolerance: PIL (which transformers' processors resize with) works in uint8, so it rounds its
output (up to 0.5/255) and its intermediate horizontal pass (up to 0.5/255, carried through a
resampling kernel of gain ~1.1), with fixed-point weights; cliplab resizes in float. Measured
over shortest/squash x bilinear/bicubic x shrinking, enlarging and mixed non-square images the
largest difference was 1.08/255, the mean 0.3/255: so at most 1.5/255 per pixel and 0.5/255 on
average (in [0, 1] pixel units, before normalisation). A wrong resample, crop or size shifts
pixels by tens of 255ths."""

import json

import numpy as np
import PIL
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, SiglipImageProcessor

from cliplab.errors import ModelError
from cliplab.models import DualEncoder, build_model
from cliplab.models.hf_files import preprocess_from_processor_config, write_processor_config
from cliplab.models.preprocess import ImagePreprocessor, PreprocessConfig

MAX_DIFF, MEAN_DIFF = 1.5 / 255, 0.5 / 255
# shrinking exactly 2:1, a ratio that is no whole number, enlarging one side while shrinking the
# other (landscape, and portrait, where PIL resizes the height first), enlarging both (portrait)
IMAGE_SHAPES = [(40, 80), (45, 61), (10, 20), (20, 10), (12, 7), (30, 8)]
TINY = dict(image_size=16, patch_size=8, width=32, layers=1, heads=2)


def _image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _assert_same_pixels(cliplab: torch.Tensor, hf: torch.Tensor, std) -> None:
    """Pixel values equal to resampling tolerance, compared in [0, 1] units."""
    assert cliplab.shape == hf.shape
    diff = (cliplab - hf).abs() * torch.tensor(std).view(1, 3, 1, 1)
    assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, \
        (diff.max().item() * 255, diff.mean().item() * 255)


def _skip_before_pillow_13() -> None:
    """transformers' processors resize with PIL: cliplab's bicubic is Pillow 13's."""
    if int(PIL.__version__.split(".")[0]) < 13:
        pytest.skip("cliplab resizes as Pillow 13 does; an older Pillow's bicubic pass differs "
                    "by up to 9/255 (README says so)")


@pytest.mark.parametrize("mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("processor_class", [CLIPImageProcessor, SiglipImageProcessor])
def test_transformers_processors_give_cliplabs_pixels(mode, interpolation, processor_class,
                                                      tmp_path):
    if interpolation == "bicubic":
        _skip_before_pillow_13()
    pre = PreprocessConfig(image_size=16, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25),
                           resize_mode=mode, interpolation=interpolation)
    write_processor_config(tmp_path, pre)
    processor = processor_class.from_pretrained(tmp_path)
    for seed, shape in enumerate(IMAGE_SHAPES):
        image = _image(shape, seed)
        hf = processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
        ours = ImagePreprocessor(pre)(torch.from_numpy(image)[None])
        _assert_same_pixels(ours, hf, pre.std)
    assert preprocess_from_processor_config(tmp_path, 16) == pre  # and it reads back as written


def test_a_saved_folder_opens_in_transformers_with_cliplabs_preprocessing(tmp_path):
    """The converted-OpenCLIP case: bicubic + squash, a 40x80 image."""
    model = build_model("tiny-clip", **TINY)
    model.preprocess_config.resize_mode = "squash"
    model.preprocess_config.interpolation = "bicubic"
    folder = model.save(tmp_path / "m")
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert saved["resample"] == 3 and saved["size"] == {"height": 16, "width": 16}
    assert saved["do_center_crop"] is False
    image = _image((40, 80))
    hf = CLIPImageProcessor.from_pretrained(folder)(images=Image.fromarray(image),
                                                    return_tensors="pt")["pixel_values"]
    _assert_same_pixels(model.preprocess(torch.from_numpy(image)[None]), hf,
                        model.preprocess_config.std)
    (folder / "cliplab.json").unlink()  # as transformers re-saves it
    reread = DualEncoder.load(folder).preprocess_config
    assert (reread.resize_mode, reread.interpolation) == ("squash", "bicubic")


def test_longest_cannot_be_written_and_says_so(tmp_path):
    model = build_model("tiny-clip", **TINY)
    model.preprocess_config.resize_mode = "longest"
    with pytest.warns(UserWarning, match="cannot resize the longer side and pad"):
        folder = model.save(tmp_path / "m")
    assert "images preprocessed outside cliplab differ" in (folder / "README.md").read_text()
    assert DualEncoder.load(folder).preprocess_config.resize_mode == "longest"  # cliplab.json
    card = (build_model("tiny-clip", **TINY).save(tmp_path / "plain") / "README.md").read_text()
    assert "outside cliplab differ" not in card


def _plain_folder(tmp_path, processor: dict, name: str = "preprocessor_config.json"):
    """A plain HF CLIP folder (no cliplab.json) with ``processor`` as its image processor."""
    folder = build_model("tiny-clip", **TINY).save(tmp_path / "hf")
    (folder / "cliplab.json").unlink()
    (folder / "preprocessor_config.json").unlink()
    (folder / name).write_text(json.dumps(processor))
    return folder


SIGLIP_HUB_STYLE = {  # the keys google/siglip-* folders have: no do_center_crop, no crop_size
    "image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
    "do_normalize": True, "do_rescale": True, "do_resize": True, "resample": 3,
    "rescale_factor": 1 / 255, "size": {"height": 16, "width": 16},
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def test_a_plain_siglip_style_folder_is_read_as_transformers_reads_it(tmp_path):
    _skip_before_pillow_13()  # bicubic
    folder = _plain_folder(tmp_path, SIGLIP_HUB_STYLE)
    model = DualEncoder.load(folder)
    pre = model.preprocess_config
    assert (pre.image_size, pre.resize_mode, pre.interpolation) == (16, "squash", "bicubic")
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    processor = SiglipImageProcessor.from_pretrained(folder)
    for seed, shape in enumerate(IMAGE_SHAPES):
        image = _image(shape, seed)
        hf = processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
        _assert_same_pixels(model.preprocess(torch.from_numpy(image)[None]), hf, pre.std)


def test_a_clip_hub_style_folder_reads_bicubic_shortest_with_crop(tmp_path):
    folder = _plain_folder(tmp_path, {
        "crop_size": {"height": 16, "width": 16}, "do_center_crop": True,
        "do_normalize": True, "do_resize": True, "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
        "size": {"shortest_edge": 16}})
    pre = DualEncoder.load(folder).preprocess_config
    assert (pre.image_size, pre.resize_mode, pre.interpolation) == (16, "shortest", "bicubic")


def test_an_old_feature_extractor_file_is_read_with_its_own_class(tmp_path):
    """A file naming only ``feature_extractor_type`` (older transformers) is read with that
    processor's defaults, as AutoImageProcessor reads it: ViT's squash (no crop), not CLIP's
    shortest side + crop."""
    folder = _plain_folder(tmp_path, {
        "feature_extractor_type": "ViTFeatureExtractor", "size": 16, "do_resize": True,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "resample": 2})
    pre = DualEncoder.load(folder).preprocess_config
    assert (pre.image_size, pre.resize_mode, pre.interpolation) == (16, "squash", "bilinear")


@pytest.mark.parametrize("file", ["preprocessor_config.json", "processor_config.json"])
def test_scalar_mean_and_std_and_no_normalize(tmp_path, file):
    """transformers allows one number for all channels; without do_normalize the pixels stay
    in [0, 1]. processor_config.json nests the image processor."""
    scalar = {**SIGLIP_HUB_STYLE, "image_mean": 0.25, "image_std": 0.5}
    wrap = (lambda d: {"image_processor": d}) if file == "processor_config.json" \
        else (lambda d: d)
    pre = DualEncoder.load(_plain_folder(tmp_path / "a", wrap(scalar), file)).preprocess_config
    assert pre.mean == (0.25, 0.25, 0.25) and pre.std == (0.5, 0.5, 0.5)
    off = {**SIGLIP_HUB_STYLE, "do_normalize": False}
    pre = DualEncoder.load(_plain_folder(tmp_path / "b", wrap(off), file)).preprocess_config
    assert pre.mean == (0.0, 0.0, 0.0) and pre.std == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("change, key", [
    ({"resample": 1}, "resample"),  # lanczos
    ({"size": {"height": 16, "width": 24}}, "size"),
    ({"size": {"longest_edge": 16}}, "size"),
    ({"size": {"shortest_edge": 20}, "do_center_crop": True,
      "crop_size": {"height": 16, "width": 16}}, "crop_size"),
    ({"size": {"shortest_edge": 16}}, "do_center_crop"),  # no crop: not square
    ({"do_resize": False}, "do_resize"),
    ({"do_rescale": False}, "do_rescale"),
    ({"do_pad": True}, "do_pad"),  # padding before the resize: cliplab's would not pad
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"size": {"height": 24, "width": 24}}, "size"),  # the model takes 16 px
])
def test_what_cliplab_cannot_reproduce_is_refused_naming_file_and_key(tmp_path, change, key):
    folder = _plain_folder(tmp_path, {**SIGLIP_HUB_STYLE, **change})
    with pytest.raises(ModelError) as err:
        DualEncoder.load(folder)
    message = str(err.value)
    assert "\n" not in message
    assert f"preprocessor_config.json: {key} = " in message


@pytest.mark.parametrize("change, key", [
    ({"mean": [0.5, 0.5]}, "preprocess.mean"),
    ({"resize_mode": "crop"}, "preprocess.resize_mode"),
    ({"interpolation": "lanczos"}, "preprocess.interpolation"),
    ({"std": [0.5, 0.0, 0.5]}, "preprocess.std"),
    ({"image_size": "16"}, "preprocess.image_size"),
    ({"augment": {"scale": [1.1]}}, "preprocess.augment.scale"),
])
def test_a_bad_preprocess_record_fails_at_load_naming_cliplab_json(tmp_path, change, key):
    folder = build_model("tiny-clip", **TINY).save(tmp_path / "m")
    meta = json.loads((folder / "cliplab.json").read_text())
    meta["preprocess"].update(change)
    (folder / "cliplab.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError) as err:
        DualEncoder.load(folder)
    message = str(err.value)
    assert "\n" not in message and "cliplab.json" in message and key in message


def test_shortest_truncates_the_long_side_as_torchvision_and_transformers_do():
    """A 45x61 ramp (value 4x at column x) to 16 px: the long side becomes int(61 * 16 / 45)
    = 21 and the crop starts at column (21 - 16) // 2 = 2, so cropped column k samples source
    x = (k + 2 + 0.5) * 61 / 21 - 0.5, where a linear ramp resamples to exactly 4x (rounding
    21.7 to 22 would shift every column by 3-5/255)."""
    ramp = torch.arange(61, dtype=torch.uint8) * 4
    image = ramp.view(1, 1, 61, 1).expand(1, 45, 61, 3).contiguous()
    out = ImagePreprocessor(PreprocessConfig(image_size=16, mean=(0, 0, 0), std=(1, 1, 1)))(image)
    columns = torch.tensor([0, 8, 15])
    expected = 4 * ((columns + 2.5) * 61 / 21 - 0.5) / 255
    torch.testing.assert_close(out[0, 0, 8, columns], expected, atol=0.5 / 255, rtol=0)


def test_processor_sizes_as_plain_dicts_are_read_as_size_dicts():
    """transformers 5.0's processors hold ``size`` / ``crop_size`` as plain dicts (later ones
    as ``SizeDict``s): both read alike."""
    from types import SimpleNamespace

    from cliplab.models.hf_files import processor_to_preprocess

    common = dict(do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_pad=False,
                  do_normalize=True, image_mean=[0.5] * 3, image_std=[0.25] * 3, resample=3)
    shortest = SimpleNamespace(**common, size={"shortest_edge": 16, "height": None},
                               do_center_crop=True, crop_size={"height": 16, "width": 16})
    squash = SimpleNamespace(**common, size={"height": 16, "width": 16}, do_center_crop=False,
                             crop_size=None)
    for processor, mode in ((shortest, "shortest"), (squash, "squash")):
        pre = processor_to_preprocess(processor, "f.json: ", {})
        assert (pre.image_size, pre.resize_mode, pre.interpolation) == (16, mode, "bicubic")
        assert pre.std == (0.25, 0.25, 0.25)
