"""Few-shot: k-shot sampling, nearest class mean by hand, mean ± std over seeds."""

import pytest
import torch

from cliplab.evaluate.few_shot import few_shot, nearest_class_mean, sample_k_shot


def test_k_shot_takes_k_per_class_deterministically():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    idx = sample_k_shot(labels, 4, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [4, 3, 4]  # class 1 has only 3
    assert torch.equal(idx, sample_k_shot(labels, 4, seed=0))
    assert not torch.equal(idx, sample_k_shot(labels, 4, seed=1))


def test_nearest_class_mean_by_hand():
    train_x = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.2, 1.0]])
    train_y = torch.tensor([0, 0, 1, 1])
    test_x = torch.tensor([[0.9, 0.1], [0.6, 0.5], [0.1, 0.8]])
    test_y = torch.tensor([0, 1, 1])
    # class means point at ~(1, .1) and ~(.1, 1): (0.6, 0.5) is nearer class 0 -> 2 of 3 right
    m = nearest_class_mean(train_x, train_y, test_x, test_y)
    assert m["acc1"] == pytest.approx(2 / 3)


def test_nearest_class_mean_normalises_training_rows_before_averaging():
    """A class-0 training row of large norm pointing near class 1 counts as one unit vector:
    class 0's mean stays at ~30 degrees, so a test row at ~75 degrees is class 1. Averaged
    unnormalised, the long row would drag class 0's mean to ~81 degrees and take that row."""
    train_x = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.2, 1.0], [3.0, 30.0]])
    train_y = torch.tensor([0, 0, 1, 1, 0])
    test_x = torch.tensor([[0.9, 0.1], [0.6, 0.5], [0.1, 0.8], [0.26, 0.97]])
    test_y = torch.tensor([0, 1, 1, 1])
    # predictions 0, 0, 1, 1: only (0.6, 0.5) wrong; class 1 recall 2/3
    m = nearest_class_mean(train_x, train_y, test_x, test_y)
    assert m["acc1"] == pytest.approx(3 / 4)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 2 / 3) / 2)


def test_nearest_class_mean_compares_directions_of_the_class_means():
    """Class 0's rows agree, (1, 0) twice: mean (1, 0). Class 1's spread: (0.8, 0.6) and
    (-0.8, 0.6) average to (0, 0.6), direction (0, 1). The test row (0.6, 0.8) has cosine 0.8
    with class 1 and 0.6 with class 0, so it is class 1; by raw dot product with the means
    (0.48 against 0.6) it would be class 0."""
    train_x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [-0.8, 0.6]])
    train_y = torch.tensor([0, 0, 1, 1])
    m = nearest_class_mean(train_x, train_y, torch.tensor([[0.6, 0.8]]), torch.tensor([1]))
    assert m["acc1"] == 1.0


def test_nearest_class_mean_never_predicts_a_class_without_shots():
    """Class 2 has test rows but no shots: its mean is the zero vector (cosine 0). The row
    (-1, -0.5) has negative cosine with both class means (-0.89 and -0.45), so it goes to
    class 1, never to the empty class 2: wrong, as is every row of a class without shots."""
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    train_y = torch.tensor([0, 1])
    test_x = torch.tensor([[-1.0, -0.5], [0.2, 1.0]])
    m = nearest_class_mean(train_x, train_y, test_x, torch.tensor([2, 1]))
    assert m["acc1"] == pytest.approx(0.5)  # only the class-1 row is right
    assert m["mean_per_class_recall"] == pytest.approx(0.5)


def test_few_shot_reports_mean_and_std_and_more_shots_help():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 1.2
    y = torch.arange(800) % 4
    x = centres[y] + torch.randn(800, 16, generator=g) * 1.5
    out = few_shot(x[:600], y[:600], x[600:], y[600:], shots=(1, 16), seeds=(0, 1, 2))
    for key in ("ncm_1shot", "ncm_16shot", "linear_probe_1shot", "linear_probe_16shot"):
        r = out[key]
        assert len(r["acc1_per_seed"]) == 3
        assert r["acc1_mean"] == pytest.approx(sum(r["acc1_per_seed"]) / 3)
        assert r["acc1_std"] == pytest.approx(torch.tensor(r["acc1_per_seed"]).std(unbiased=False).item())
    assert out["ncm_16shot"]["acc1_mean"] > out["ncm_1shot"]["acc1_mean"]
    assert out["linear_probe_16shot"]["acc1_mean"] > out["linear_probe_1shot"]["acc1_mean"]
    with pytest.raises(ValueError, match="unknown few-shot method"):
        few_shot(x, y, x, y, methods=("knn",))


def test_few_shot_scores_each_seed_on_its_own_k_shot_sample():
    """Seed i's accuracy is that of the classifier fitted on ``sample_k_shot(train_y, k,
    seeds[i])`` (recomputed here); on noisy data one shot per class varies with the draw, so
    the std over seeds is above zero."""
    from cliplab.evaluate.linear_probe import linear_probe

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 1.2
    y = torch.arange(800) % 4
    x = centres[y] + torch.randn(800, 16, generator=g) * 1.5
    train_x, train_y, test_x, test_y = x[:600], y[:600], x[600:], y[600:]
    seeds = (3, 11, 42)
    out = few_shot(train_x, train_y, test_x, test_y, shots=(1, 4), seeds=seeds, l2=1e-2)
    for k in (1, 4):
        for i, seed in enumerate(seeds):
            idx = sample_k_shot(train_y, k, seed)
            assert len(idx) == 4 * k
            want = nearest_class_mean(train_x[idx], train_y[idx], test_x, test_y)["acc1"]
            assert out[f"ncm_{k}shot"]["acc1_per_seed"][i] == pytest.approx(want, abs=1e-9)
            want = linear_probe(train_x[idx], train_y[idx], test_x, test_y, l2=1e-2)["acc1"]
            assert out[f"linear_probe_{k}shot"]["acc1_per_seed"][i] == pytest.approx(want,
                                                                                   abs=1e-9)
    assert out["ncm_1shot"]["acc1_std"] > 0.0
    assert out["linear_probe_1shot"]["acc1_std"] > 0.0


def test_k_shot_indices_come_back_sorted():
    """Guards the documented order (sorted, not class by class): with k at least every class's
    size all rows are drawn, so the answer is exactly 0..5 whatever the shuffles; with k = 1
    one row of each class, ascending."""
    labels = torch.tensor([1, 0, 1, 0, 2, 2])
    assert sample_k_shot(labels, 2, seed=0).tolist() == [0, 1, 2, 3, 4, 5]
    for seed in range(5):
        idx = sample_k_shot(labels, 1, seed=seed).tolist()
        assert idx == sorted(idx) and sorted(labels[idx].tolist()) == [0, 1, 2]


def test_few_shot_without_training_features_or_a_draw_says_so():
    test_x, test_y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="^few_shot needs train_x and train_y to draw shots "
                                         "from, or draw$"):
        few_shot(None, None, test_x, test_y, shots=[1])
