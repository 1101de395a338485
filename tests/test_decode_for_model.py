"""Image files are decoded to what the model takes: a set in memory costs the model's input per
image (a 500x375 photo kept 0.6 MB, three copies while loading; 50k photos did not fit in
24 GiB), and the model still sees the pixels its own preprocessing makes of each file."""

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.data.images import decode_image, decoding_for, fit_to_model
from cliplab.data.sources import load_source
from cliplab.evaluate.suite import run_suite
from cliplab.evaluate.tasks import TaskContext
from cliplab.models.preprocess import PreprocessConfig, resize_center_crop, to_float


def _photo(h: int, w: int, seed: int) -> Image.Image:
    g = np.random.default_rng(seed)
    # smooth content (a gradient plus blobs), so resizing is tested on real structure
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
    noise = g.normal(0, 20, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _folder(root, sizes):
    for i, (h, w) in enumerate(sizes):
        cls = root / ("cat" if i % 2 else "dog")
        cls.mkdir(parents=True, exist_ok=True)
        _photo(h, w, i).save(cls / f"{i}.png")
    return root


@pytest.mark.parametrize("mode,interpolation", [("shortest", "bilinear"),
                                                ("shortest", "bicubic"),
                                                ("squash", "bicubic")])
@pytest.mark.parametrize("h,w", [(75, 100), (100, 75), (40, 40)])
def test_a_fitted_image_is_what_the_models_preprocessing_makes_of_the_file(
        tmp_path, mode, interpolation, h, w):
    file = tmp_path / "a.png"
    _photo(h, w, 1).save(file)
    model_input = PreprocessConfig(image_size=32, resize_mode=mode, interpolation=interpolation)
    with decoding_for(model_input):
        fitted = decode_image(file)
    assert fitted.shape == (32, 32, 3)
    full = decode_image(file)
    assert full.shape == (h, w, 3)  # outside the context nothing changes
    # the model resizes in float (within PIL's uint8 rounding of what PIL does)
    want = resize_center_crop(to_float(full[None]), 32, mode, interpolation)[0]
    got = to_float(fitted[None])[0]
    assert (got - want).abs().max() <= 2.5 / 255


def test_images_the_model_would_enlarge_or_pad_are_kept_as_they_are():
    image = _photo(20, 30, 0)
    assert fit_to_model(image, PreprocessConfig(image_size=32)) is image  # enlarged later
    assert fit_to_model(image, PreprocessConfig(image_size=16, resize_mode="longest")) is image
    square = _photo(32, 32, 0)
    assert fit_to_model(square, PreprocessConfig(image_size=32)) is square


def test_load_source_fits_unless_image_size_or_a_shift_is_given(tmp_path):
    root = _folder(tmp_path / "photos", [(75, 100), (100, 75), (60, 90), (90, 60)])
    model_input = PreprocessConfig(image_size=32)
    spec = {"source": "image-folder", "path": str(root)}
    assert load_source(spec, False).images.shape[1:3] != (32, 32)  # no model: as the files
    assert load_source(spec, False, model_input=model_input).images.shape == (4, 32, 32, 3)
    # image_size: the user's own size (a squash) wins
    sized = load_source({**spec, "image_size": 48}, False, model_input=model_input)
    assert sized.images.shape == (4, 48, 48, 3)
    # a shift blurs or adds noise in the file's pixels: it gets the files' pixels
    with pytest.warns(UserWarning, match="squares"):
        shifted = load_source({**spec, "shift": "blur:1"}, False, model_input=model_input)
    assert shifted.images.shape[1] == 67  # the median shorter side, not the model's 32


@pytest.mark.parametrize("mode,interpolation", [("shortest", "bilinear"),
                                                ("squash", "bicubic")])
def test_files_smaller_and_larger_than_the_input_are_each_the_models_input(
        tmp_path, mode, interpolation):
    """A set mixing files smaller and larger than the model's input was made centre squares at
    the median shorter side: the larger files, already fitted to the input, were shrunk and
    enlarged again, and a squash model's small files were cropped (2-65/255 off what the model
    makes of each file alone). Each is the model's input now, loaded whole or drawn."""
    from cliplab.data.listed import ShotDraws, list_source
    from cliplab.models.preprocess import ImagePreprocessor

    sizes = [(20, 30), (75, 100), (16, 16), (100, 40), (30, 20), (64, 48)]
    root = _folder(tmp_path / "photos", sizes)
    model_input = PreprocessConfig(image_size=32, resize_mode=mode, interpolation=interpolation)
    spec = {"source": "image-folder", "path": str(root)}
    loaded = load_source(spec, False, model_input=model_input)
    assert loaded.images.shape == (6, 32, 32, 3)
    files = sorted(root.rglob("*.png"), key=lambda f: (f.parent.name, f.name))
    model = ImagePreprocessor(model_input)
    for file, image in zip(files, loaded.images):
        alone = model([decode_image(file)])  # the file alone through the model's preprocessing
        assert (model([image]) - alone).abs().max() * 0.27 <= 1.5 / 255  # 0.27: CLIP's std
    listed = list_source(spec, False, model_input=model_input)
    drawn, index = ShotDraws(listed, False).draw(2, seed=0)
    assert torch.equal(drawn.images, loaded.images[index])


def test_eval_on_photos_holds_the_models_input_and_scores_as_on_the_whole_files(
        tmp_path, tiny_model):
    root = _folder(tmp_path / "photos", [(75, 100), (100, 75), (64, 96), (96, 64)] * 2)
    suite = {"tasks": [{"task": "zeroshot", "data": {"source": "image-folder",
                                                      "path": str(root)}}]}
    context = TaskContext(progress=False)
    got = run_suite(tiny_model, suite, context)["zeroshot-0"]
    (loaded,) = context.datasets.values()
    size = tiny_model.preprocess_config.image_size
    assert loaded.images.shape == (8, size, size, 3)
    # the reference: each file alone through the model's own preprocessing
    from cliplab.evaluate.features import encode_images
    from cliplab.evaluate.zeroshot import zeroshot_classifier
    files = sorted(root.rglob("*.png"), key=lambda f: (f.parent.name, f.name))
    full = [decode_image(f) for f in files]
    emb = torch.cat([encode_images(tiny_model, im[None], progress=False).embeddings
                     for im in full])
    fitted = encode_images(tiny_model, loaded.images, progress=False).embeddings
    assert torch.allclose(emb, fitted, atol=0.02)
    head = zeroshot_classifier(tiny_model, loaded.classnames, loaded.templates)
    want = ((emb @ head.t()).argmax(1) == loaded.labels).float().mean().item()
    assert got["acc1"] == pytest.approx(want)


def test_adapt_and_pretrain_load_their_files_for_the_model(tmp_path, monkeypatch):
    root = _folder(tmp_path / "photos", [(75, 100), (100, 75), (64, 96), (96, 64)] * 4)
    seen = []

    def spy(spec, progress=None, where=None, model_input=None):
        seen.append((where, model_input))
        return real(spec, progress, where, model_input)

    import cliplab.adapt.run as adapt_run
    import cliplab.data.listed as listed
    import cliplab.train.pretrain as pretrain
    real = load_source
    monkeypatch.setattr(adapt_run, "load_source", spy)
    monkeypatch.setattr(listed, "load_source", spy)  # adapt lists a test folder (streamed)
    monkeypatch.setattr(pretrain, "load_source", spy)
    data = {"source": "image-folder", "path": str(root)}
    adapt_run.run_adapt({"method": "zeroshot", "model": "tiny-clip",
                         "data": {"train": data, "test": data}}, progress=False, write=False)
    pretrain.run_pretrain({"model": "tiny-clip", "data": {"train": data},
                           "train": {"steps": 1, "batch_size": 4},
                           "out": str(tmp_path / "run")}, progress=False)
    assert {where for where, _ in seen} >= {"data.train", "data.test"}
    assert all(m is not None and m.image_size == 32 for _, m in seen)  # tiny-clip's input


def test_merge_scores_held_out_files_loaded_once_for_the_model(tmp_path, tiny_model,
                                                                monkeypatch):
    import cliplab.evaluate.tasks.base as base
    from cliplab.merge.run import heldout_evaluator

    root = _folder(tmp_path / "photos", [(75, 100), (100, 75)] * 2)
    seen = []

    def spy(spec, progress=None, where=None, model_input=None):
        seen.append(model_input)
        return load_source(spec, progress, where, model_input)
    monkeypatch.setattr(base, "load_source", spy)
    score = heldout_evaluator(tiny_model, {"task": "zeroshot", "data": {
        "source": "image-folder", "path": str(root)}}, "acc1")
    for _ in range(2):  # two sets of weights: the data is read once
        score(tiny_model.model.state_dict())
    assert len(seen) == 1 and seen[0].image_size == tiny_model.preprocess_config.image_size


def test_run_task_loads_a_tasks_files_for_its_model(tmp_path, tiny_model):
    from cliplab.evaluate.suite import run_task

    root = _folder(tmp_path / "photos", [(75, 100), (100, 75)] * 2)
    context = TaskContext(progress=False)
    run_task(tiny_model, {"task": "zeroshot", "data": {"source": "image-folder",
                                                       "path": str(root)}}, context)
    (loaded,) = context.datasets.values()
    size = tiny_model.preprocess_config.image_size
    assert loaded.images.shape[1:3] == (size, size)
