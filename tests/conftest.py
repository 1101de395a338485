import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model():
    """A very small tiny-clip (fresh per session; tests must not train it in place)."""
    from cliplab.models import build_model

    return build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                       embed_dim=16, context_length=32)
