"""Merges linear in the models (uniform soup, task arithmetic) are summed as each model loads:
a merge of N models held all N (16 ViT-B ingredients: ~10 GB uniform, ~20 GB task
arithmetic). Same bits as the operations on all states at once."""

import pytest
import torch

import cliplab.merge.run as merge_run
from cliplab.errors import ModelError
from cliplab.merge.soup import uniform_soup
from cliplab.merge.streamed import LinearMerge
from cliplab.merge.task_arithmetic import apply_task_vector, combine_task_vectors, task_vector
from tests import test_merge_folders
from tests.test_merge_folders import _state

family = test_merge_folders.family  # the fixture: a base tiny-clip and three fine-tunes


@pytest.fixture
def held(monkeypatch):
    """How many loaded models hold their float weights each time one is summed."""
    loaded, counts = [], []
    load, add = merge_run.load_ingredient, LinearMerge.add

    def loading(path):
        loaded.append(load(path))
        return loaded[-1]

    def adding(self, state, name):
        counts.append(sum(any(t.is_floating_point() and t.device.type != "meta"
                              for t in i.state.values()) for i in loaded))
        return add(self, state, name)

    monkeypatch.setattr(merge_run, "load_ingredient", loading)
    monkeypatch.setattr(LinearMerge, "add", adding)
    return counts


def test_a_uniform_soup_holds_one_model_at_a_time_and_equals_the_soup(family, tmp_path,
                                                                       held):
    _, _, fts = family
    out = tmp_path / "soup"
    merge_run.run_merge({"method": "uniform", "models": [str(f) for f in fts],
                         "weights": [1.0, 2.0, 0.5], "out": str(out)}, progress=False)
    assert held == [1, 1, 1]  # the model being summed only
    want = uniform_soup([_state(f) for f in fts], [1.0, 2.0, 0.5])
    got = _state(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_task_arithmetic_holds_the_base_and_one_model_and_equals_the_vectors(family, tmp_path,
                                                                             held):
    _, base, fts = family
    out = tmp_path / "ta"
    merge_run.run_merge({"method": "task-arithmetic", "models": [str(f) for f in fts],
                         "base": str(base), "scale": [0.5, -0.3, 0.2], "out": str(out)},
                        progress=False)
    assert held == [2, 2, 2]  # the base and the model being summed
    b = _state(base)
    vector = combine_task_vectors([task_vector(_state(f), b) for f in fts], [0.5, -0.3, 0.2])
    want, got = apply_task_vector(b, vector), _state(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_heldout_scores_of_summed_models_are_their_own(family, tmp_path):
    """The ingredients' held-out scores, with their weights read again after summing, equal a
    merge that holds them all (greedy, which needs every state)."""
    _, _, fts = family
    heldout = {"task": "zeroshot", "data": {"source": "digits", "split": "test"}}
    summed = merge_run.run_merge({"method": "uniform", "models": [str(f) for f in fts],
                                  "heldout": heldout, "out": str(tmp_path / "u")},
                                 progress=False)
    greedy = merge_run.run_merge({"method": "greedy", "models": [str(f) for f in fts],
                                  "heldout": heldout, "out": str(tmp_path / "g")},
                                 progress=False)
    assert summed["heldout"]["scores"] == greedy["heldout"]["scores"]
    assert len(set(summed["heldout"]["scores"].values())) > 1  # the models do differ


def test_an_integer_buffer_differing_from_the_base_is_refused():
    base = {"w": torch.zeros(2), "ids": torch.arange(3)}
    merge = LinearMerge([1.0], base)
    with pytest.raises(ModelError, match="ft: non-float tensor 'ids' differs"):
        merge.add({"w": torch.ones(2), "ids": torch.arange(3) + 1}, "ft")


def test_a_method_registered_as_streamed_without_its_sum_is_refused():
    """linear_merge sums uniform and task-arithmetic only: another method marked streamed in
    the registry would have been merged as task arithmetic."""
    from cliplab.merge.streamed import linear_merge

    with pytest.raises(ValueError, match="^merge method 'dare' is registered as streamed, but "
                                         "linear_merge sums only uniform and task-arithmetic$"):
        linear_merge("dare", 2, None, 1.0, None)
