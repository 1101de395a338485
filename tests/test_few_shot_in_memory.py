"""The ``few_shot`` task on a set held in memory (digits, fashion-mnist, shapes) embeds only
the images its draws take, not the whole train set, and scores as the whole set would; a
train set another task of the suite embedded whole is taken from the cache."""

from __future__ import annotations

import contextlib

import pytest
import torch

from cliplab.data.sources import load_source
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.few_shot import few_shot, sample_k_shot
from cliplab.evaluate.suite import run_suite
from cliplab.evaluate.tasks import TaskContext

TRAIN = {"source": "digits", "split": "train"}
TEST = {"source": "digits", "split": "test"}  # 540 images
SHOTS, SEEDS = [1, 3], [0, 1]


def _task(**extra) -> dict:
    return {"name": "fs", "task": "few_shot", "train": TRAIN, "test": TEST, "shots": SHOTS,
            "seeds": SEEDS, **extra}


@contextlib.contextmanager
def towered(model):
    """The number of images of each batch sent through ``model``'s image tower."""
    sizes: list[int] = []

    def count(module, args, kwargs):
        sizes.append(len(args[0] if args else kwargs["pixel_values"]))

    hook = model.vision_tower.embeddings.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield sizes
    finally:
        hook.remove()


def _drawn(labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([sample_k_shot(labels, k, s) for k in SHOTS for s in SEEDS]).unique()


@pytest.mark.parametrize("features", ["embeddings", "tokens"])
def test_only_the_drawn_images_are_embedded_and_score_as_the_whole_set(tiny_model, features):
    train, test = load_source(TRAIN, progress=False), load_source(TEST, progress=False)
    for hold in (True, False):  # training's evaluations, and a one-off one (cliplab eval)
        with towered(tiny_model) as sizes:
            got = run_suite(tiny_model, {"tasks": [_task(features=features)]},
                            TaskContext(progress=False, hold=hold))
        # the test images and the union of the draws: at most 3 per class per seed, not 1257
        assert sum(sizes) == len(test.labels) + len(_drawn(train.labels)) <= 540 + 3 * 10 * 2
    # the old path: the whole train set embedded, `sample_k_shot`'s rows of it
    probe = None if features == "embeddings" else features
    whole = encode_images(tiny_model, train.images, progress=False, probe=probe).get(features)
    test_x = encode_images(tiny_model, test.images, progress=False, probe=probe).get(features)
    want = few_shot(whole, train.labels, test_x, test.labels, shots=SHOTS, seeds=SEEDS)
    assert got["fs"] == {**want, "n": len(test.labels)}  # equal, not close


def test_a_train_set_a_probe_embedded_whole_is_taken_from_the_cache(tiny_model):
    """As `benchmarks/eval_suite.py` runs it: a linear probe over the same train set first;
    few_shot then embeds nothing of train (its features the probe's cache entry)."""
    probe = {"name": "probe", "task": "linear_probe", "train": TRAIN, "test": TEST, "l2": 0.01}
    train = load_source(TRAIN, progress=False)
    for features in ("embeddings", "tokens"):  # the probe's tokens entry serves embeddings
        cache = FeatureCache()
        with towered(tiny_model) as sizes:
            got = run_suite(tiny_model, {"tasks": [{**probe, "features": features},
                                                   _task(methods=["ncm"])]},
                            TaskContext(cache, progress=False))
        assert sum(sizes) == len(train.labels) + 540  # each set once, by the probe
        assert (cache.misses, cache.hits) == (2, 2)  # few_shot's train and test: hits
    alone = run_suite(tiny_model, {"tasks": [_task(methods=["ncm"])]},
                      TaskContext(progress=False))
    assert got["fs"] == alone["fs"]


def test_a_train_set_a_cache_folder_holds_is_read_from_it(tiny_model, tmp_path):
    """A later run with the same ``--cache-dir``: few_shot alone reads the whole train set's
    features a probe wrote there, and embeds only its test images."""
    probe = {"name": "probe", "task": "linear_probe", "train": TRAIN, "test": TEST, "l2": 0.01,
             "features": "embeddings"}
    run_suite(tiny_model, {"tasks": [probe]},
              TaskContext(FeatureCache(tmp_path / "cache"), progress=False))
    with towered(tiny_model) as sizes:
        got = run_suite(tiny_model, {"tasks": [_task()]},
                        TaskContext(FeatureCache(tmp_path / "cache"), progress=False))
    assert sizes == []  # the test set is the probe's too
    assert got["fs"] == run_suite(tiny_model, {"tasks": [_task()]},
                                  TaskContext(progress=False))["fs"]
