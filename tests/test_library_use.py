"""cliplab used as a library from a notebook: it leaves the process as it found it (the
caller's random generator, environment, transformers' logging, thread count) and takes the
inputs a script naturally has (one string, a NumPy integer), refusing nonsense in one line."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cliplab.errors import InputError
from cliplab.models import build_model
from tests.serve_helpers import SHAPES, build, save_tiny_model


def test_building_a_preset_leaves_the_callers_generator_alone():
    """build_model seeded the global generator with the preset's seed: every seed a user set
    before it gave the same draws after it."""
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2)
        draws.append(torch.rand(3))
    assert not torch.equal(draws[0], draws[1])
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), draws[0])  # as if no model had been built
    a, b = (build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2)
            for _ in range(2))  # the preset's own seed still makes its weights
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                 b.model.state_dict().values()))


def test_a_lit_model_and_a_load_leave_the_environment_and_transformers_logging_alone(
        monkeypatch):
    """lit-minilm set HF_HUB_OFFLINE=1 for the whole process (a later Hub load then never
    fetched), and importing cliplab.models silenced the user's transformers warnings."""
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    try:
        model = build_model("lit-minilm", width=32, layers=1, heads=2)
        assert "HF_HUB_OFFLINE" not in os.environ
        assert hf_logging.get_verbosity() == hf_logging.WARNING
        assert hf_logging.is_progress_bar_enabled()
    finally:  # the test process's own settings back
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    assert model.encode_texts("a red square").shape == (1, model.embed_dim)


def test_one_text_is_one_text_and_batch_sizes_are_whole_numbers(tiny_model):
    """tokenize("a cat") made one text of each character; batch_size=-1 gave no embeddings
    for three images, 0 a range() error."""
    from cliplab.evaluate.features import encode_images
    from cliplab.models.embed import embed_texts

    one = tiny_model.tokenize("a photo of a cat")
    assert one["input_ids"].shape[0] == 1
    assert torch.equal(one["input_ids"], tiny_model.tokenize(["a photo of a cat"])["input_ids"])
    images = torch.zeros(3, 16, 16, 3, dtype=torch.uint8)
    for size in (-1, 0, 2.5, True):
        with pytest.raises(InputError, match=rf"^batch_size must be a whole number of 1 or more, "
                                             rf"got {size!r}$"):
            encode_images(tiny_model, images, batch_size=size, progress=False)
        with pytest.raises(InputError, match="^batch_size must be"):
            tiny_model.encode_texts(["a", "b"], batch_size=size)
        with pytest.raises(InputError, match="^batch_size must be"):
            embed_texts(tiny_model, ["a", "b"], batch_size=size)
    assert encode_images(tiny_model, images, batch_size=np.int64(2),
                         progress=False).embeddings.shape[0] == 3


def test_an_index_takes_numpy_integers_refuses_nan_and_keeps_the_thread_count(tmp_path):
    """Opening an index set OpenMP (torch's threads too) to one thread for the process; a
    NumPy k passed the check and died in FAISS's bindings; a NaN query answered as if the
    index were empty."""
    from cliplab.serve.index import SearchIndex

    build(save_tiny_model(tmp_path / "tiny"), SHAPES, tmp_path / "idx", chunk=16)
    threads = torch.get_num_threads()
    index = SearchIndex(tmp_path / "idx")
    assert torch.get_num_threads() == threads
    query = np.asarray(index.vectors[3])
    scores, ids = index.search(query, np.int64(3), offset=np.int64(0))
    assert ids.shape == (1, 3) and ids[0, 0] == 3
    assert np.array_equal(ids, index.search(query, 3)[1])
    with pytest.raises(InputError, match="queries hold NaN or infinite values"):
        index.search(np.full_like(query, np.nan), 3)
    index.close()
    assert torch.get_num_threads() == threads


def test_zeroshot_classifier_runs_in_the_precision_asked(tiny_model):
    """Without a text cache, precision was ignored (bf16 images met fp32 prompts) and a typo
    passed silently."""
    from cliplab.evaluate.text_cache import TextFeatureCache
    from cliplab.evaluate.zeroshot import zeroshot_classifier

    names, templates = ["cat", "dog", "car"], ["a photo of a {}."]
    fp32 = zeroshot_classifier(tiny_model, names, templates)
    bf16 = zeroshot_classifier(tiny_model, names, templates, precision="bf16")
    assert not torch.equal(fp32, bf16) and torch.allclose(fp32, bf16, atol=0.05)
    cached = zeroshot_classifier(tiny_model, names, templates, TextFeatureCache(), "bf16")
    assert torch.allclose(bf16, cached, atol=0.02)
    with pytest.raises(InputError, match="precision must be fp32 or bf16, not 'fp16'"):
        zeroshot_classifier(tiny_model, names, templates, precision="fp16")


def test_a_trainers_tower_lock_holds_while_it_trains_only():
    """Trainer(lock_text) froze the model's text tower for good: a later Trainer without the
    lock left it untrained, silently. A tower the user froze by hand stays frozen."""
    from cliplab.data.shapes import load_shapes
    from cliplab.train.trainer import Trainer

    pairs = load_shapes(n=16, seed=0, image_size=32)
    model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2)
    settings = {"steps": 1, "batch_size": 8, "augment": False, "progress": False, "lr": 1e-2}
    text = [p.detach().clone() for p in model.text_tower.parameters()]
    Trainer(model, {**settings, "lock_text": True}).fit(pairs)
    assert all(torch.equal(a, b) for a, b in zip(text, model.text_tower.parameters()))
    assert not model.tower_is_frozen("text")  # as it was before the trainer
    Trainer(model, settings).fit(pairs)
    assert not any(torch.equal(a, b) for a, b in zip(text, model.text_tower.parameters()))
    model.freeze_tower("image")  # the user's own freeze
    Trainer(model, settings).fit(pairs)
    assert model.tower_is_frozen("image")
    Trainer(model, {**settings, "lock_text": True})  # made and never fit (or failing to start)
    assert not model.tower_is_frozen("text")


def test_training_and_probing_inside_no_grad_or_inference_mode(tiny_model):
    """A notebook's torch.no_grad() (or inference_mode, torch's advice for evaluation) made
    CoOp and the Trainer die with a raw autograd error, and the linear-probe and few-shot
    tasks in inference mode: they train as outside it, or say in one line why they cannot."""
    from cliplab.adapt import AdaptContext, get_method
    from cliplab.data.shapes import load_shapes
    from cliplab.evaluate.feature_cache import FeatureCache
    from cliplab.evaluate.suite import run_task
    from cliplab.evaluate.tasks import TaskContext

    shapes = {"source": "shapes", "n": 40, "image_size": 32, "attribute": "color"}
    probe = {"task": "linear_probe", "train": {**shapes, "seed": 2}, "test": {**shapes, "seed": 1}}
    plain = run_task(tiny_model, probe, TaskContext(progress=False))
    with torch.inference_mode():
        assert run_task(tiny_model, probe, TaskContext(progress=False)) == plain
    from cliplab.data.sources import load_source

    train = load_source({**shapes, "seed": 2})
    coop = get_method("coop")
    model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2)
    ctx = AdaptContext(FeatureCache(), progress=False)
    outside = coop.fit(model, train, {"epochs": 2}, ctx).learner.ctx.detach().clone()
    with torch.no_grad():
        inside = coop.fit(model, train, {"epochs": 2}, ctx).learner.ctx.detach()
    assert torch.equal(inside, outside)
    with torch.inference_mode(), pytest.raises(InputError, match="outside torch.inference_mode"):
        coop.fit(model, train, {"epochs": 2}, ctx)
    from cliplab.train.trainer import Trainer

    with torch.no_grad():
        Trainer(model, {"steps": 1, "batch_size": 8, "augment": False, "progress": False}) \
            .fit(load_shapes(n=16, seed=0, image_size=32))


def test_methods_that_draw_at_random_draw_from_their_seed_and_leave_the_callers_generator():
    """LoRA's adapters drew from torch's global generator (two fits with seed 0 in one process
    differed: the CLI seeded it for them); CLIP-Adapter and CoCoOp reseeded the caller's."""
    from cliplab.adapt import AdaptContext, get_method
    from cliplab.data.sources import load_source
    from cliplab.evaluate.feature_cache import FeatureCache

    train = load_source({"source": "shapes", "n": 24, "image_size": 32, "attribute": "color"})

    def fit(method: str, options: dict):
        model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1,
                            heads=2)
        torch.manual_seed(123)
        adapter = get_method(method).fit(model, train, options,
                                         AdaptContext(FeatureCache(), seed=0, progress=False))
        return adapter, torch.rand(2)  # what the caller draws next

    lora = {"train": {"epochs": 1, "batch_size": 8}}
    (a, after_a), (b, _) = fit("lora", lora), fit("lora", lora)
    weights = [{k: v for k, v in x.peft_model.state_dict().items() if "lora_A" in k}
               for x in (a, b)]
    assert weights[0] and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    torch.manual_seed(123)
    untouched = torch.rand(2)
    assert torch.equal(after_a, untouched)
    for method in ("clip-adapter", "cocoop"):
        assert torch.equal(fit(method, {"epochs": 1})[1], untouched)


def test_dropout_draws_from_the_training_seed(tmp_path):
    """Training a model with dropout (lit-minilm's text tower) from a model folder drew its
    masks from an unseeded generator: three identical pretrain runs gave 14%, 8% and 12%."""
    from cliplab.data.shapes import load_shapes
    from cliplab.models.resolve import load_model
    from cliplab.train.trainer import Trainer

    folder = build_model("lit-minilm", image_size=32, patch_size=8, width=32, layers=1,
                         heads=2).save(tmp_path / "lit")
    pairs = load_shapes(n=16, seed=0, image_size=32)

    def trained(seed: int) -> list[torch.Tensor]:
        model = load_model(str(folder))
        Trainer(model, {"steps": 2, "batch_size": 8, "augment": False, "progress": False,
                        "lr": 1e-3, "seed": seed}).fit(pairs)
        return [p.detach().clone() for p in model.text_tower.parameters()]

    torch.manual_seed(1)
    first = trained(0)
    torch.manual_seed(2)  # whatever the caller's generator holds
    again, other = trained(0), trained(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_warnings_are_python_warnings_a_script_can_record_or_silence(tmp_path, capsys):
    """Eighteen of cliplab's warnings were printed to stderr: a notebook could neither silence
    them nor a test record them. Each is a CliplabWarning; the command line prints it on one
    line as ``cliplab: warning: ...``."""
    import warnings

    from PIL import Image

    from cliplab import CliplabWarning
    from cliplab.cli import main
    from cliplab.data.image_folder import load_image_folder

    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "pets" / "cat" / "a.png")
    told = "image folder {}: 1 class folder(s) hold no readable image: dog"
    with pytest.warns(CliplabWarning) as caught:
        load_image_folder(tmp_path / "pets", progress=False)
    assert [str(w.message) for w in caught] == [told.format(tmp_path / "pets")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CliplabWarning)
        load_image_folder(tmp_path / "pets", progress=False)
    assert capsys.readouterr().err == ""  # nothing printed past the filter

    model = save_tiny_model(tmp_path / "model")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"tasks:\n  - {{name: pets, task: zeroshot, data: {{source: image-folder, "
                     f"path: '{tmp_path / 'pets'}'}}}}\n", encoding="utf-8")
    assert main(["eval", "--model", str(model), "--config", str(suite), "--no-progress",
                 "--out", str(tmp_path / "eval")]) == 0
    err = capsys.readouterr().err
    assert f"cliplab: warning: {told.format(tmp_path / 'pets')}\n" in err, err
