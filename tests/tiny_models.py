"""Very small models the tests train in seconds (fresh on every call: tests may change them)."""

from cliplab.models import DualEncoder, build_model


def small_model(seed: int = 0, **overrides) -> DualEncoder:
    """tiny-clip at 16 px, width 32, one block per tower (``overrides`` change any option)."""
    options = dict(image_size=16, patch_size=8, width=32, layers=1, heads=2, embed_dim=16,
                   context_length=48, seed=seed)
    return build_model("tiny-clip", **{**options, **overrides})
