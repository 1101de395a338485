"""Step ``semantic_dedup``: its decision on planted embeddings, and map + decide with a model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cliplab.curate.steps.base import PoolBatch, PoolItems, StepContext
from cliplab.curate.steps.registry import make_step, step_spec
from cliplab.curate.steps.semantic_dedup import SemanticDedup, Spec
from cliplab.errors import ConfigError

TINY = {"name": "tiny-clip", "options": {"image_size": 16, "patch_size": 8, "width": 32,
                                         "layers": 1, "heads": 2, "embed_dim": 16,
                                         "context_length": 32}}


def unit(*parts: tuple[int, float], dim: int = 6) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    for axis, value in parts:
        v[axis] = value
    return v / np.linalg.norm(v)


def test_a_cosine_just_above_the_threshold_reads_above_it_in_the_reason():
    """Cosine 0.9502 over 0.95 read "cosine 0.950 above 0.950" at three decimals."""
    step = SemanticDedup(Spec(step="semantic_dedup", model="tiny-clip", n_clusters=1, eps=0.05))
    near = unit((0, 1), (1, float(np.sqrt(1 / 0.9502 ** 2 - 1))))
    decision = step.decide(PoolItems(["a", "near"], ["", ""]),
                           {"embedding": np.stack([unit((0, 1)), near])})
    assert decision.keep.tolist() == [True, False]
    assert decision.reasons[1] == "near duplicate of a (cosine 0.9502 above 0.9500)"


def test_decide_drops_planted_near_duplicates_with_reasons_clusters_and_scores():
    step = SemanticDedup(Spec(step="semantic_dedup", model="tiny-clip", n_clusters=2, eps=0.05))
    keys = ["a", "b", "a-copy", "a-topic", "b-copy"]
    embeddings = np.stack([unit((0, 1)), unit((2, 1)), unit((0, 1), (1, 0.1)),
                           unit((0, 1), (3, 0.8)), unit((2, 1), (4, 0.2))])
    decision = step.decide(PoolItems(keys, [""] * 5), {"embedding": embeddings})
    assert decision.keep.tolist() == [True, True, False, True, False]
    assert decision.reasons[2] == "near duplicate of a (cosine 0.995 above 0.950)"
    assert decision.reasons[4] == "near duplicate of b (cosine 0.981 above 0.950)"
    assert decision.report["clusters"] == [["a", "a-copy"], ["b", "b-copy"]]
    assert decision.threshold == pytest.approx(0.95)
    np.testing.assert_allclose(decision.scores[[2, 4]], [1 / np.sqrt(1.01), 1 / np.sqrt(1.04)],
                               atol=1e-5)


def test_spec_through_the_registry_and_bad_keys():
    spec = step_spec({"step": "semantic_dedup", "model": "tiny-clip"}, "c.yaml", "steps[0]")
    assert isinstance(spec, Spec) and spec.n_clusters == "auto" and spec.keep == "first"
    assert isinstance(make_step(spec), SemanticDedup)
    with pytest.raises(ConfigError, match=r"steps\[0\]\.eps"):
        step_spec({"step": "semantic_dedup", "model": "tiny-clip", "eps": 1.5}, "c.yaml", "steps[0]")
    with pytest.raises(ConfigError, match="n_clusters"):
        step_spec({"step": "semantic_dedup", "model": "tiny-clip", "n_clusters": 0}, "c.yaml")
    with pytest.raises(ConfigError, match="keep"):
        step_spec({"step": "semantic_dedup", "model": "tiny-clip", "keep": "last"}, "c.yaml")


def test_map_embeds_images_and_exact_copies_are_dropped(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(4)]
    images = [Image.fromarray(a) for a in arrays] + [Image.fromarray(arrays[1]),
                                                      Image.fromarray(arrays[3]).resize((40, 40))]
    keys = [f"k{i}" for i in range(6)]
    step = SemanticDedup(Spec(step="semantic_dedup", model=TINY, n_clusters=1, eps=1e-4,
                              batch_size=4))
    step.prepare(StepContext(work=tmp_path, seed=0, progress=False))
    columns = {}
    for start in (0, 3):  # two chunks, as the engine maps them
        batch = PoolBatch(keys[start:start + 3], [""] * 3, images[start:start + 3])
        for name, values in step.map(batch).items():
            columns.setdefault(name, []).append(values)
    columns = {name: np.concatenate(parts) for name, parts in columns.items()}
    assert columns["embedding"].shape == (6, 16) and columns["embedding"].dtype == np.float32
    np.testing.assert_allclose(columns["embedding"][4], columns["embedding"][1], atol=1e-6)
    decision = step.decide(PoolItems(keys, [""] * 6), columns)
    assert decision.keep.tolist()[:5] == [True, True, True, True, False]
    assert decision.reasons[4].startswith("near duplicate of k1 (cosine 1.000")


def test_as_many_clusters_as_items_is_warned_about():
    """n_clusters=1000 on a 20-item pool was clamped to 20 clusters of one item each, and the
    step silently dropped nothing."""
    step = SemanticDedup(Spec(step="semantic_dedup", model="tiny-clip", n_clusters=1000))
    embeddings = np.stack([unit((0, 1)), unit((0, 1), (1, 0.01)), unit((2, 1))])
    with pytest.warns(UserWarning, match=r"^semantic_dedup: n_clusters 1000 is not below the "
                      r"pool's 3 items, so each item is a cluster of its own"):
        decision = step.decide(PoolItems(["a", "a2", "b"], [""] * 3), {"embedding": embeddings})
    assert decision.keep.tolist() == [True, True, True]  # the near copy is not found
    exact = SemanticDedup(Spec(step="semantic_dedup", model="tiny-clip", n_clusters=1))
    assert exact.decide(PoolItems(["a", "a2", "b"], [""] * 3),
                        {"embedding": embeddings}).keep.tolist() == [True, False, True]
