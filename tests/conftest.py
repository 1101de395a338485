import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# matplotlib (reports) caches its font list under ~/.cache and ~/.config: the suite writes
# nothing into the developer's home (subprocesses inherit this)
if "MPLCONFIGDIR" not in os.environ:
    os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="cliplab-tests-matplotlib-")
    atexit.register(shutil.rmtree, os.environ["MPLCONFIGDIR"], ignore_errors=True)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model():
    """A very small tiny-clip (fresh per session; tests must not train it in place)."""
    from cliplab.models import build_model

    return build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                       embed_dim=16, context_length=32)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory):
    """``tiny_model`` saved as a model folder (read-only: tests write elsewhere)."""
    return tiny_model.save(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_shapes_run(tmp_path_factory):
    """A run folder of `cliplab pretrain` with the shipped tiny-shapes recipe, shortened
    (about a minute on 2 cores); slow tests share it."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("tiny-shapes") / "run"
    recipe = Path(__file__).parents[1] / "configs" / "pretrain" / "tiny-shapes.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "cliplab", "pretrain", "--config", str(recipe), "--out", str(out),
         "--no-progress", "data.train.n=3000", "train.epochs=4"],
        capture_output=True, text=True, timeout=900, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def tiny_lit_run(tmp_path_factory):
    """A run folder of `cliplab quickstart` shortened to seconds (a 2-block ViT, 12 000
    Fashion-MNIST images, 2 epochs of batch 256): a real LiT model for the adaptation tests
    (the batch and the jitter augmentation pinned so the numbers their docstrings quote stay
    the ones measured)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("tiny-lit") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "cliplab", "quickstart", "--out", str(out), "--no-progress",
         "data.train_limit=12000", "data.test_limit=1000", "train.epochs=2", "train.batch_size=256",
         "train.augment={hflip: false}",
         "model.options={image_size: 28, patch_size: 7, width: 96, layers: 2, heads: 3}",
         "eval.probe_train_size=1000"],
        capture_output=True, text=True, timeout=900, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture()
def stacked(monkeypatch):
    """The most decoded images stacked together (a listing's placeholders left out): how many
    images a run held at once."""
    from cliplab.data.images import ImageStack

    seen = [0]
    stack = ImageStack.stacked

    def recording(self, where="images"):
        images = stack(self, where)
        if images.shape[1] > 1:
            seen[0] = max(seen[0], len(images))
        return images

    monkeypatch.setattr(ImageStack, "stacked", recording)
    return seen
