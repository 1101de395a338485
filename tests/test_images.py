"""The one image decoder: bytes or files to uint8 [H, W, C], resizing, corrupt images, stacking."""

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.data.images import (UnreadableImage, decode_image, encode_image, resize_image,
                                 stack_images)
from cliplab.errors import DataError
from tests.tar_files import png_bytes

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (6, 10), dtype=np.uint8)


def test_bytes_and_files_decode_exactly(tmp_path):
    assert torch.equal(decode_image(png_bytes(RGB)), torch.from_numpy(RGB))
    (tmp_path / "x.png").write_bytes(png_bytes(RGB))
    assert torch.equal(decode_image(tmp_path / "x.png"), torch.from_numpy(RGB))
    assert torch.equal(decode_image(str(tmp_path / "x.png")), torch.from_numpy(RGB))


def test_channels():
    gray = png_bytes(GRAY)
    assert decode_image(gray, channels=None).shape == (6, 10, 1)
    assert torch.equal(decode_image(gray, channels=None)[..., 0], torch.from_numpy(GRAY))
    rgb = decode_image(gray)  # default: RGB, the gray value in every channel
    assert rgb.shape == (6, 10, 3) and all(torch.equal(rgb[..., c], rgb[..., 0]) for c in range(3))
    assert decode_image(png_bytes(RGB), channels=None).shape == (6, 10, 3)
    one = decode_image(png_bytes(RGB), channels=1)
    assert torch.equal(one[..., 0], torch.from_numpy(np.array(Image.fromarray(RGB).convert("L"))))


def test_resize_is_pil_bilinear_with_height_width_sizes():
    expected = np.array(Image.fromarray(RGB).resize((4, 3), Image.Resampling.BILINEAR))
    assert torch.equal(decode_image(png_bytes(RGB), size=(3, 4)), torch.from_numpy(expected))
    assert torch.equal(resize_image(torch.from_numpy(RGB), (3, 4)), torch.from_numpy(expected))
    square = np.array(Image.fromarray(RGB).resize((5, 5), Image.Resampling.BILINEAR))
    assert torch.equal(decode_image(png_bytes(RGB), size=5), torch.from_numpy(square))
    same = torch.from_numpy(RGB)
    assert resize_image(same, (6, 10)) is same


@pytest.mark.parametrize("source", [b"not an image", png_bytes(RGB)[:40]])
def test_corrupt_bytes_raise_one_error_type(source):
    with pytest.raises(UnreadableImage, match="image bytes: cannot decode"):
        decode_image(source)
    assert issubclass(UnreadableImage, DataError)


def test_missing_or_corrupt_file_names_the_path(tmp_path):
    with pytest.raises(UnreadableImage, match="nope.png"):
        decode_image(tmp_path / "nope.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(UnreadableImage, match="bad.jpg: cannot decode"):
        decode_image(tmp_path / "bad.jpg")


def test_stack_of_mixed_sizes_makes_centre_squares_whatever_the_order():
    """Images of different sizes were squashed to the FIRST one's size: every other aspect
    distorted, and scores changed when a file was renamed. They become centre squares at the
    median shorter side (here 5 of 6 and 4), as CLIP's shorter-side resize and centre crop
    would cut them; told once, naming where."""
    first = torch.from_numpy(RGB)  # 6 x 10
    gray = torch.from_numpy(GRAY[:4, :5, None].copy())  # 4 x 5
    with pytest.warns(UserWarning, match=r"^x\.csv: 2 images of 2 sizes \(5x4, 10x6\) are made "
                      r"5x5 squares \(shorter side resized to 5 px, centre crop\); give "
                      r"image_size: N"):
        out = stack_images([first, gray], "x.csv")
    assert out.shape == (2, 5, 5, 3)
    bilinear = Image.Resampling.BILINEAR
    first_5 = np.array(Image.fromarray(RGB).resize((8, 5), bilinear))[:, 1:6]  # 10*5/6 -> 8
    gray_5 = np.array(Image.fromarray(GRAY[:4, :5]).resize((6, 5), bilinear))[:, 0:5]  # 6.25
    assert torch.equal(out[0], torch.from_numpy(first_5))
    assert all(torch.equal(out[1, ..., c], torch.from_numpy(gray_5)) for c in range(3))
    with pytest.warns(UserWarning):
        assert torch.equal(stack_images([gray, first]), out.flip(0))  # order does not matter
    assert stack_images([gray, gray]).shape == (2, 4, 5, 1)  # one size, grayscale: as they are
    assert torch.equal(stack_images([first, first])[0], first)


def test_encode_png_round_trips_and_jpg_is_close():
    for image in (torch.from_numpy(RGB), torch.from_numpy(GRAY[..., None].copy())):
        assert torch.equal(decode_image(encode_image(image, "png"), channels=None), image)
    smooth = torch.arange(64, dtype=torch.uint8).repeat(64, 1)[..., None].expand(-1, -1, 3) * 4
    back = decode_image(encode_image(smooth.contiguous(), "jpg", quality=95))
    assert (back.float() - smooth.float()).abs().mean() < 2


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG/TIFF gradient (PIL mode I;16) decodes to the 8-bit gradient (value >> 8)
    in every reader — the one decoder, the index/curate reader, a batch of PIL images and the
    search upload; PIL's own convert clipped it to near white."""
    import io

    from cliplab.data.collection import open_rgb
    from cliplab.models.preprocess import to_uint8_batch
    from cliplab.serve.image_files import read_upload

    values = np.linspace(0, 65535, 32 * 32).astype(np.uint16).reshape(32, 32)
    expected = (values >> 8).astype(np.uint8)
    for suffix in ("png", "tiff"):
        path = tmp_path / f"g16.{suffix}"
        Image.fromarray(values).save(path)
        assert Image.open(path).mode in ("I;16", "I")  # "I" before Pillow 11.1
        assert np.array_equal(decode_image(path, channels=1)[..., 0].numpy(), expected)
        rgb = decode_image(path.read_bytes()).numpy()
        assert all(np.array_equal(rgb[..., c], expected) for c in range(3))
        assert np.array_equal(np.asarray(open_rgb(path))[..., 1], expected)
        assert np.array_equal(to_uint8_batch(Image.open(path))[0, ..., 2].numpy(), expected)
        assert np.array_equal(np.asarray(read_upload(path.read_bytes()))[..., 0], expected)
    # 8-bit values held in PIL's 32-bit mode I stay as they are
    small = np.arange(256, dtype=np.int32).reshape(16, 16)
    buf = io.BytesIO()
    Image.fromarray(small).save(buf, format="TIFF")
    assert np.array_equal(decode_image(buf.getvalue(), channels=1)[..., 0].numpy(), small)


def test_16_bit_values_in_pil_mode_i_are_scaled_not_clipped():
    """A PIL mode I image holding 16-bit values (0..65535) is scaled to 0..255 (value >> 8)."""
    import io

    from cliplab.models.preprocess import convert_image

    values = np.linspace(0, 65535, 16 * 16).astype(np.int32).reshape(16, 16)
    image = Image.fromarray(values)
    assert image.mode == "I"
    expected = (values >> 8).astype(np.uint8)
    assert np.array_equal(np.asarray(convert_image(image, "L")), expected)
    rgb = np.asarray(convert_image(image))
    assert all(np.array_equal(rgb[..., c], expected) for c in range(3))
    buf = io.BytesIO()
    image.save(buf, format="TIFF")
    assert np.array_equal(decode_image(buf.getvalue(), channels=1)[..., 0].numpy(), expected)


def test_dark_16_bit_greyscale_is_scaled_even_when_every_value_is_below_256():
    """Only PIL's 32-bit mode I may hold 8-bit values; an I;16 image is always 16-bit, so
    200 is 200 / 65535 of full scale: 200 >> 8 = 0, black (not the 8-bit grey 200)."""
    from cliplab.models.preprocess import convert_image

    image = Image.fromarray(np.full((4, 4), 200, np.uint16))
    assert image.mode == "I;16"
    assert np.array_equal(np.asarray(convert_image(image, "L")), np.zeros((4, 4), np.uint8))
    assert np.asarray(convert_image(image)).max() == 0


def test_encode_jpg_uses_the_asked_quality_as_pil_does():
    import io

    for quality in (95, 50):
        buf = io.BytesIO()
        Image.fromarray(RGB).save(buf, format="JPEG", quality=quality)
        assert encode_image(torch.from_numpy(RGB), "jpg", quality=quality) == buf.getvalue()


@pytest.mark.parametrize("orientation, corner", [(1, (0, 0)), (3, (3, 5)), (6, (0, 3)),
                                                 (8, (5, 0))])
def test_images_are_turned_as_their_exif_orientation_says(tmp_path, orientation, corner):
    """A photo stored sideways with an EXIF orientation tag (as phones write it) is seen as a
    viewer shows it, by every reader: a 4x6 image with its top-left pixel white, tagged 3
    (turn 180°), 6 (90° clockwise) or 8 (90° anticlockwise), puts that pixel at the corner
    worked out by hand."""
    from cliplab.data.collection import open_rgb

    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[0, 0] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    image.save(path, quality=100, exif=exif.tobytes())
    shape = (4, 6) if orientation in (1, 3) else (6, 4)
    for decoded in (decode_image(path), decode_image(path.read_bytes()),
                    torch.from_numpy(np.array(open_rgb(path)))):
        assert tuple(decoded.shape[:2]) == shape
        bright = decoded[..., 0] > 128
        assert bright.sum() == 1 and tuple(torch.nonzero(bright)[0].tolist()) == corner


def test_an_unreadable_exif_block_keeps_the_image_as_stored(monkeypatch):
    from cliplab.models import preprocess

    image = Image.fromarray(np.zeros((4, 6, 3), np.uint8))
    monkeypatch.setattr(Image.Image, "getexif", lambda self: (_ for _ in ()).throw(SyntaxError))
    assert preprocess.convert_image(image).size == (6, 4)


def test_an_image_stack_holds_the_images_as_torch_stack_does():
    from cliplab.data.images import ImageStack

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (5, 7, 3), generator=g, dtype=torch.uint8) for _ in range(6)]
    for capacity in (6, 8, 100, 2):  # exact, a few skipped, most skipped, fewer than given
        stack = ImageStack(capacity)
        for image in images:
            stack.append(image)
        assert len(stack) == 6
        assert torch.equal(stack.stacked(), torch.stack(images))


def test_an_image_stack_past_its_capacity_grows_without_a_second_copy(monkeypatch):
    """More images than the capacity given (a count not known up front) turned the stack into
    a list that `torch.stack` copied whole at the end: the set held twice."""
    import cliplab.data.images as images_module

    g = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, 4, 3), generator=g, dtype=torch.uint8)
              for _ in range(2600)]
    want = torch.stack(images)

    def no_stack(*args, **kwargs):
        raise AssertionError("the images were copied whole by torch.stack")
    monkeypatch.setattr(torch, "stack", no_stack)
    monkeypatch.setattr(images_module, "stack_images", no_stack)
    for capacity in (1, 1024, 2599):
        stack = images_module.ImageStack(capacity)
        for image in images:
            stack.append(image)
        assert len(stack) == 2600
        got = stack.stacked()
        assert torch.equal(got, want) and len(stack) == 2600
        assert torch.equal(stack.stacked(), want)  # asked again: the same images


def test_an_image_stack_of_different_shapes_is_squared_as_stack_images_squares_them():
    from cliplab.data.images import ImageStack, stack_images

    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
              for shape in [(8, 8, 3), (8, 8, 3), (10, 6, 3), (8, 8, 1)]]
    stack = ImageStack(4)
    for image in images:
        stack.append(image)
    with pytest.warns(UserWarning, match="squares"):
        got = stack.stacked("set")
    with pytest.warns(UserWarning, match="squares"):
        assert torch.equal(got, stack_images(images, "set"))


def test_a_pillow_without_avif_reads_what_it_can_and_refuses_the_rest_as_unidentified():
    """Pillow before 11.2 has no AVIF plugin: naming it among the formats made every file the
    others refuse a ``KeyError: 'AVIF'`` (a 500 for a text upload to the server); the server's
    415 no longer offers AVIF there."""
    import subprocess
    import sys

    script = (
        "from PIL import Image, UnidentifiedImageError\n"
        "Image.init(); Image.OPEN.pop('AVIF', None)\n"
        "from cliplab.data.images import READ_FORMATS, open_image\n"
        "assert 'AVIF' not in READ_FORMATS and 'PNG' in READ_FORMATS, READ_FORMATS\n"
        "try:\n"
        "    open_image(b'plain text, no image')\n"
        "except UnidentifiedImageError:\n"
        "    print('unidentified')\n"
        "from starlette.exceptions import HTTPException\n"
        "from cliplab.serve.image_files import read_upload\n"
        "try:\n"
        "    read_upload(b'plain text, no image', 'file', None)\n"
        "except HTTPException as err:\n"
        "    print(err.status_code, err.detail)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip().splitlines() == [
        "unidentified", "415 file is not an image in a format cliplab reads (PNG, JPEG, WebP, "
        "GIF, BMP, TIFF, PPM, JPEG 2000)"], done.stderr[-2000:]


@pytest.mark.parametrize("command", ["index", "eval"])
def test_an_image_over_pils_pixel_limit_is_warned_of_once_by_name(tmp_path, capsys, monkeypatch,
                                                                  command):
    """PIL's DecompressionBombWarning (90 to 179 megapixels) names no file, and is shown in
    Python's two-line form: the CLI says which image, once, in its own one line; the image is
    still read. Over twice the limit it is skipped as unreadable, as before."""
    from cliplab.cli import main

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 90 megapixels stands at 1000 pixels
    for name, side in (("cat", 40), ("dog", 20), ("eel", 50)):  # 1600: over; 400; 2500: refused
        (tmp_path / "photos" / name).mkdir(parents=True)
        Image.new("RGB", (side, side), "red").save(tmp_path / "photos" / name / "a.png")
        Image.new("RGB", (20, 20), "blue").save(tmp_path / "photos" / name / "b.png")
    if command == "index":
        args = ["index", "--model", "tiny-clip", "--data", str(tmp_path / "photos")]
    else:
        suite = tmp_path / "zs.yaml"
        suite.write_text(f"tasks: [{{task: zeroshot, data: {{source: image-folder, path: "
                         f"{tmp_path / 'photos'}}}}}]\n", encoding="utf-8")
        args = ["eval", "--model", "tiny-clip", "--config", str(suite)]
    assert main([*args, "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "pixels" in line]
    assert warned == [f"cliplab: warning: {tmp_path / 'photos' / 'cat' / 'a.png'}: 40x40 pixels "
                      "(0 megapixels), over PIL's decompression-bomb limit (0 megapixels): "
                      "decoded all the same (over twice the limit an image is skipped as "
                      "unreadable_image)"]
    assert "DecompressionBomb" not in captured.err
    if command == "index":
        assert "index " in captured.out and "5 items (1 skipped)" in captured.out
    else:
        assert '"n": 5' in captured.out


def test_encoded_bytes_over_the_pixel_limit_are_warned_of_by_the_name_given(monkeypatch):
    from cliplab.data.images import LargeImageWarning

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = png_bytes(np.full((40, 40, 3), 200, dtype=np.uint8))
    with pytest.warns(LargeImageWarning, match=r"^shards/00000\.tar:000000007: 40x40 pixels"):
        assert decode_image(data, name="shards/00000.tar:000000007").shape == (40, 40, 3)
    with pytest.warns(LargeImageWarning, match=r"^image bytes: 40x40"):  # unnamed: each time
        decode_image(data)
    with pytest.warns(LargeImageWarning, match=r"^image bytes: 40x40"):
        decode_image(data)
