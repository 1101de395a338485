"""Odd inputs from Python (the library, not the CLI): one clear `CliplabError` naming what was
given and what is expected, or the harmless form accepted with the right result."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cliplab
from cliplab.errors import ConfigError, InputError
from cliplab.evaluate.zeroshot import zeroshot_metrics
from cliplab.merge.soup import greedy_soup, uniform_soup
from cliplab.serve.build import build_index
from cliplab.serve.index import SearchIndex
from cliplab.serve.milvus_index import MilvusVectors
from tests.serve_helpers import SHAPES, build, save_tiny_model


# ---------------------------------------------------------------- zeroshot_metrics

def _zeroshot_inputs():
    gen = torch.Generator().manual_seed(0)
    classifier = F.normalize(torch.randn(3, 4, generator=gen), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    images = F.normalize(classifier[labels] + 0.8 * torch.randn(7, 4, generator=gen), dim=-1)
    return images, labels, classifier


def test_zeroshot_metrics_accepts_numpy_and_lists_with_the_same_result():
    images, labels, classifier = _zeroshot_inputs()
    expected = zeroshot_metrics(images, labels, classifier)
    assert zeroshot_metrics(images.numpy(), labels.numpy(), classifier.numpy()) == expected
    assert zeroshot_metrics(images.tolist(), labels.tolist(), classifier) == expected
    assert zeroshot_metrics(images, labels.float(), classifier) == expected  # whole floats
    # whole numbers are numbers (README: "also takes NumPy arrays or lists"): were refused
    assert zeroshot_metrics([[1, 0], [0, 1], [2, 1]], [0, 1, 0], [[1, 0], [0, 1]])["acc1"] == 1.0
    with pytest.raises(InputError, match=r"classifier is bool .*expected real numbers"):
        zeroshot_metrics(images, labels, classifier > 0)


@pytest.mark.parametrize("change, named", [
    (lambda e, y, c: (e, y[:2], c), r"labels is int64 of shape \[2\], expected 7 integer"),
    (lambda e, y, c: (e[0], y, c),
     r"image_embeddings is float32 of shape \[4\], expected .*\[N, D\]"),
    (lambda e, y, c: (e, y, torch.randn(3, 7)),
     r"image_embeddings have 4 dimensions, the classifier 7"),
    (lambda e, y, c: (e, y + 5, c),
     r"label 5 is out of range: the classifier has 3 classes.*0\.\.2"),
    (lambda e, y, c: (e, y * 0.5, c), r"labels is float32 .*integer class indices"),
])
def test_zeroshot_metrics_names_a_mismatched_argument(change, named):
    with pytest.raises(InputError, match=named):
        zeroshot_metrics(*change(*_zeroshot_inputs()))


@pytest.mark.parametrize("classes", [["Shirt", "Bag"], [0, 9]])
def test_zeroshot_metrics_refuses_classes_that_are_not_class_indices(classes):
    images, labels, classifier = _zeroshot_inputs()
    with pytest.raises(InputError, match=r"classes=.*expected distinct class indices 0\.\.2.*"
                                         r"classnames\.index"):
        zeroshot_metrics(images, labels, classifier, classes=classes)


# ---------------------------------------------------------------- SearchIndex.search

@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd_index")
    build(save_tiny_model(root / "model"), SHAPES, root / "idx", index_type="flat")
    return SearchIndex(root / "idx")


def test_one_vector_is_one_query(index):
    query = np.array(index.vectors[5], dtype=np.float32)  # a writable copy
    scores, ids = index.search(query[None, :], 4, 1)
    for one in (query, torch.from_numpy(query), query.tolist()):
        got_scores, got_ids = index.search(one, 4, 1)
        assert got_ids.shape == (1, 4)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_scores, scores)


def test_a_query_of_another_dimension_names_both_dimensions(index):
    with pytest.raises(InputError, match=r"queries of shape \[1, 7\]; index .* holds vectors of "
                                         r"16 dimensions"):
        index.search(np.zeros((1, 7), np.float32), 3)


@pytest.mark.parametrize("k, offset, named", [
    (0, 0, r"k=0; k must be an integer >= 1"), (-2, 0, r"k=-2; k must be an integer >= 1"),
    (3, -1, r"offset=-1; offset must be an integer >= 0")])
def test_k_and_offset_are_checked_as_the_http_api_checks_them(index, k, offset, named):
    with pytest.raises(InputError, match=named):
        index.search(np.asarray(index.vectors[:1]), k, offset)


class _FakeMilvusClient:
    """Records what `MilvusVectors.search` sends; finds nothing."""

    def __init__(self):
        self.data = None

    def search(self, collection, data, limit, search_params, output_fields):
        self.data = data
        return [[] for _ in data]

    def has_collection(self, collection):
        return True


def _fake_milvus() -> MilvusVectors:
    vectors = object.__new__(MilvusVectors)  # no server: only `search` is exercised
    vectors.uri, vectors.collection, vectors.client = "fake.db", "fake", _FakeMilvusClient()
    return vectors


def test_milvus_backend_takes_one_vector_as_one_query_and_checks_k():
    vectors = _fake_milvus()
    scores, ids = vectors.search(np.array([0.6, 0.8], np.float32), 2)
    assert vectors.client.data == [[pytest.approx(0.6), pytest.approx(0.8)]]
    assert ids.shape == scores.shape == (1, 2)
    with pytest.raises(InputError, match=r"k=0; k must be an integer >= 1"):
        vectors.search(np.zeros((1, 2), np.float32), 0)


# ---------------------------------------------------------------- soups

def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), value), "ids": torch.tensor([0, 1])}


@pytest.mark.parametrize("states", [["/models/a", "/models/b"], "/models/a"])
def test_a_soup_of_model_folders_says_how_to_load_state_dicts(states):
    with pytest.raises(InputError, match=r"uniform_soup.*a str '/models/a'.*not a state dict|"
                                         r"uniform_soup takes a list of state dicts.*'/models/a'"
                       ) as err:
        uniform_soup(states)
    assert "cliplab.merge.checkpoints.load_ingredient(path).state" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_soup_of_modules_or_one_state_dict_says_what_to_pass():
    with pytest.raises(InputError, match=r"states\[1\] is a Linear.*state_dict\(\)"):
        uniform_soup([_state(1.0), torch.nn.Linear(2, 2)])
    with pytest.raises(InputError, match=r"not a dict; wrap one state dict in a list"):
        uniform_soup(_state(1.0))
    with pytest.raises(InputError, match=r"greedy_soup: states\[0\] is a str"):
        greedy_soup(["/models/a"], evaluate=lambda s: 0.0)


MERGES_OF_FOLDERS = [
    ("task_vector", lambda m: m.task_vector("/models/ft", _state(0.0)), "finetuned is a str"),
    ("task_vector", lambda m: m.task_vector(_state(0.0), "/models/base"), "base is a str"),
    ("apply_task_vector", lambda m: m.apply_task_vector("/models/base", _state(0.0)),
     "base is a str"),
    ("combine_task_vectors", lambda m: m.combine_task_vectors(["/models/a"]),
     r"vectors\[0\] is a str"),
    ("ties_merge", lambda m: m.ties_merge("/models/base", [_state(1.0)]), "base is a str"),
    ("ties_merge", lambda m: m.ties_merge(_state(0.0), ["/models/a", "/models/b"]),
     r"finetuned\[0\] is a str"),
    ("dare_merge", lambda m: m.dare_merge(_state(0.0), ["/models/a"]),
     r"finetuned\[0\] is a str"),
    ("model_stock", lambda m: m.model_stock(_state(0.0), ["/models/a", "/models/b"]),
     r"finetuned\[0\] is a str"),
]


@pytest.mark.parametrize("name, merge, said", MERGES_OF_FOLDERS)
def test_every_merge_given_a_model_folder_says_how_to_load_state_dicts(name, merge, said):
    """Task arithmetic, TIES, DARE and Model Stock took a path's characters for tensor names
    (`lacks tensor 'c'`) or failed in Python (`'str' object has no attribute 'keys'`)."""
    import cliplab.merge

    with pytest.raises(InputError, match=rf"{name}: {said} '/models/.*not a state dict") as err:
        merge(cliplab.merge)
    assert "load_ingredient(path).state" in str(err.value)


def test_a_merge_given_one_state_dict_for_a_list_says_to_wrap_it():
    from cliplab.merge import ties_merge

    with pytest.raises(InputError, match=r"ties_merge takes a list of state dicts .* as "
                                         r"finetuned, not a dict; wrap one state dict"):
        ties_merge(_state(0.0), _state(1.0))


@pytest.mark.parametrize("weights", [[float("nan"), 1.0], [float("inf"), 1.0], ["1", "2"]])
def test_soup_weights_must_be_finite_numbers(weights):
    with pytest.raises(ConfigError, match=r"soup weights .* must be 2 finite non-negative numbers"):
        uniform_soup([_state(1.0), _state(0.0)], weights=weights)


# ---------------------------------------------------------------- build_index

def test_build_index_takes_a_dict_config_validated_like_any_config(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    data = {**SHAPES, "n": 12}
    with pytest.raises(ConfigError, match=r"the index config: unknown key bogus"):
        build_index({"model": str(model), "data": data, "out": str(tmp_path / "bad"), "bogus": 1},
                    progress=False)
    assert not (tmp_path / "bad").exists()
    record = build_index({"model": str(model), "data": data, "out": str(tmp_path / "idx")},
                         progress=False)
    assert record["count"] == 12 and SearchIndex(tmp_path / "idx").count == 12


# ---------------------------------------------------------------- the package

ENTRY_POINTS = ("cliplab.models.resolve.load_model", "cliplab.evaluate.zeroshot.zeroshot_metrics",
                "cliplab.evaluate.suite.run_suite", "cliplab.adapt.run.run_adapt",
                "cliplab.merge.uniform_soup", "cliplab.merge.run.run_merge",
                "cliplab.serve.build.build_index", "cliplab.serve.index.SearchIndex")


def test_help_of_the_package_lists_entry_points_that_exist_without_loading_torch():
    code = ("import sys, cliplab; print(cliplab.__doc__); "
            "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.rstrip().endswith("HEAVY []")
    for name in ENTRY_POINTS:
        assert name in out
    # every dotted name the docstring lists resolves
    for name in set(re.findall(r"``(cliplab(?:\.\w+)+)", cliplab.__doc__)):
        module, attr = name.rsplit(".", 1)
        try:
            getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError:  # a module named whole, e.g. ``cliplab.merge``
            importlib.import_module(name)
    assert {"CliplabError", "InputError", "ConfigError"} <= set(cliplab.__all__)
