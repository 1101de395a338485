"""Shared helpers of the serve tests: a tiny saved model and small indexes."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from cliplab.config import validate
from cliplab.serve.build import build_index
from cliplab.serve.settings import IndexConfig

SHAPES = {"source": "shapes", "n": 40, "seed": 3, "kinds": ["single"], "image_size": 32}


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A tiny-clip saved as a model folder; another ``seed`` gives other weights."""
    from cliplab.models import build_model

    model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                        embed_dim=16, context_length=32)
    if seed:  # the preset's initialisation is fixed; move the weights off it
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    model.save(folder)
    return folder


def index_config(model: Path, data, out: Path, **kw) -> IndexConfig:
    return validate(IndexConfig, {"model": str(model), "data": data, "out": str(out), **kw})


def build(model: Path, data, out: Path, **kw) -> dict:
    return build_index(index_config(model, data, out, **kw), progress=False)


def shapes_index(root: Path):
    """``(SearchIndex, DualEncoder)``: a tiny model and the `SHAPES` index built with it under
    ``root``."""
    from cliplab.models.dual_encoder import DualEncoder
    from cliplab.serve.index import SearchIndex

    model_dir = save_tiny_model(root / "model")
    build(model_dir, SHAPES, root / "idx")
    return SearchIndex(root / "idx"), DualEncoder.load(model_dir)


def direct_image_embeddings(model, images: torch.Tensor) -> np.ndarray:
    """Embeddings computed straight from the model (no index code)."""
    with torch.no_grad():
        return model.encode_image(model.preprocess(images)).numpy()


def start_server(index: Path, port: int, *args: str) -> subprocess.Popen:
    """`cliplab serve INDEX --port PORT ARGS...` in its own process (text pipes for its
    output); `wait_until_up` waits for it."""
    return subprocess.Popen([sys.executable, "-m", "cliplab", "serve", str(index), "--port",
                             str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 300) -> None:
    """Poll ``url`` until it answers 200 (an AssertionError with the server's stderr if it
    exits first, or after ``seconds``)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if server.poll() is not None:
            raise AssertionError(f"cliplab serve exited: {server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"cliplab serve did not answer {url} in {seconds} s")
