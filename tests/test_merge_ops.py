"""Merge operations on small hand-built state dicts, against hand-computed results."""

import math

import pytest
import torch

from cliplab.errors import ConfigError, ModelError
from cliplab.merge import (apply_task_vector, combine_task_vectors, dare_merge, disjoint_mean,
                           drop_and_rescale, elect_sign, greedy_soup, model_stock,
                           model_stock_ratio, task_vector, ties_merge, trim_top_fraction,
                           uniform_soup)
from cliplab.merge.methods import MERGE_METHODS, MergeInputs
from cliplab.merge.stock import ratio_summary
from cliplab.merge.state import check_same_keys

T = torch.tensor


def test_uniform_soup_is_the_mean_and_copies_integer_buffers():
    a = {"w": T([[1.0, 2.0], [3.0, 4.0]]), "b": T([0.0, 2.0]), "ids": T([0, 1, 2])}
    b = {"w": T([[3.0, 0.0], [1.0, 8.0]]), "b": T([4.0, -2.0]), "ids": T([0, 1, 2])}
    soup = uniform_soup([a, b])
    assert torch.equal(soup["w"], T([[2.0, 1.0], [2.0, 6.0]]))
    assert torch.equal(soup["b"], T([2.0, 0.0]))
    assert torch.equal(soup["ids"], T([0, 1, 2])) and soup["ids"].dtype == torch.int64
    weighted = uniform_soup([a, b], weights=[3, 1])  # 0.75 a + 0.25 b
    assert torch.equal(weighted["b"], T([1.0, 1.0]))
    assert torch.equal(weighted["w"], T([[1.5, 1.5], [2.5, 5.0]]))


def test_uniform_soup_keeps_dtype_and_rejects_bad_input():
    a = {"w": T([1.0, 2.0], dtype=torch.bfloat16)}
    b = {"w": T([2.0, 4.0], dtype=torch.bfloat16)}
    soup = uniform_soup([a, b])
    assert soup["w"].dtype == torch.bfloat16 and torch.equal(soup["w"].float(), T([1.5, 3.0]))
    with pytest.raises(ModelError, match="'ids'"):
        uniform_soup([{"ids": T([0, 1])}, {"ids": T([1, 0])}], names=["A", "B"])
    with pytest.raises(ConfigError, match="weights"):
        uniform_soup([a, b], weights=[1.0])


def test_state_checks_name_the_model_and_the_key():
    ref = {"x": torch.zeros(2, 3), "y": torch.zeros(3)}
    with pytest.raises(ModelError, match=r"B lacks tensor 'y'"):
        check_same_keys([ref, {"x": torch.zeros(2, 3)}], ["A", "B"])
    with pytest.raises(ModelError, match=r"B has an extra tensor 'z'"):
        check_same_keys([ref, {**ref, "z": torch.zeros(1)}], ["A", "B"])
    with pytest.raises(ModelError, match=r"B: tensor 'x' is \(3, 2\)"):
        check_same_keys([ref, {**ref, "x": torch.zeros(3, 2)}], ["A", "B"])
    with pytest.raises(ModelError, match=r"B: tensor 'y' is \(3,\) torch.float16"):
        check_same_keys([ref, {**ref, "y": torch.zeros(3, dtype=torch.float16)}], ["A", "B"])


def _score(state):
    """A fake held-out accuracy: best when w is 1.2."""
    return -(state["w"].item() - 1.2) ** 2


def test_greedy_soup_keeps_only_ingredients_that_do_not_hurt():
    values = {"A": 1.0, "B": 3.0, "C": -1.5, "D": 1.5}
    states = [{"w": T(v)} for v in values.values()]
    calls = []

    def evaluate(state):
        calls.append(state["w"].item())
        return _score(state)

    soup = greedy_soup(states, evaluate, names=list(values))
    # own scores -0.04, -3.24, -7.29, -0.09 -> order A, D, B, C
    assert [s["ingredient"] for s in soup.steps] == ["A", "D", "B", "C"]
    # A+D = 1.25 (score -0.0025, kept); A+D+B = 11/6 (dropped); A+D+C = 1/3 (dropped)
    assert [s["kept"] for s in soup.steps] == [True, True, False, False]
    assert soup.kept == [0, 3]
    assert soup.state["w"].item() == pytest.approx(1.25)
    assert soup.score == pytest.approx(-0.0025)
    assert calls[4:] == pytest.approx([1.25, 11 / 6, 1 / 3])  # 4 own scores, then 3 soups
    # the uniform soup of all four is worse: (1 + 3 - 1.5 + 1.5) / 4 = 1.0
    assert _score(uniform_soup(states)) < soup.score


def test_greedy_soup_keeps_an_ingredient_that_ties():
    states = [{"w": T(1.0)}, {"w": T(3.0)}]
    soup = greedy_soup(states, lambda s: 0.5)  # held-out score never drops
    assert soup.kept == [0, 1] and soup.state["w"].item() == 2.0


def test_model_stock_ratio_formula():
    assert model_stock_ratio(0.5, 2) == pytest.approx(2 / 3)  # 2*0.5 / (0.5 + 1)
    assert model_stock_ratio(0.5, 3) == pytest.approx(0.75)   # 1.5 / (1 + 1)
    assert model_stock_ratio(1.0, 5) == pytest.approx(1.0)
    assert model_stock_ratio(0.0, 2) == 0.0
    assert model_stock_ratio(-0.3, 2) == 0.0  # obtuse: fall back to the pretrained weights


def test_model_stock_with_deltas_at_a_known_angle():
    base = {"w": T([1.0, 1.0, 0.0]), "frozen": T([5.0, 5.0]), "step": T(7)}
    d1 = T([1.0, 0.0, 0.0])
    d2 = T([math.cos(math.pi / 3), math.sin(math.pi / 3), 0.0])  # 60 degrees from d1
    f1 = {"w": base["w"] + 2 * d1, "frozen": T([5.0, 5.0]), "step": T(7)}
    f2 = {"w": base["w"] + 3 * d2, "frozen": T([5.0, 5.0]), "step": T(7)}
    merged, ratios = model_stock(base, [f1, f2])
    t = 2 * 0.5 / (0.5 + 1)
    assert ratios["w"] == pytest.approx(t)
    expected = t * (f1["w"] + f2["w"]) / 2 + (1 - t) * base["w"]
    torch.testing.assert_close(merged["w"], expected)
    assert torch.equal(merged["frozen"], base["frozen"])  # zero deltas: t = 0, stays put
    assert ratios["frozen"] == 0.0 and merged["step"].item() == 7 and "step" not in ratios

    # three deltas with pairwise cosine 1/2: t = 3*0.5 / (2*0.5 + 1) = 0.75
    zero = {"w": torch.zeros(3)}
    fts = [{"w": T(v) / math.sqrt(2)} for v in ([1.0, 1, 0], [1.0, 0, 1], [0.0, 1, 1])]
    merged3, ratios3 = model_stock(zero, fts)
    assert ratios3["w"] == pytest.approx(0.75)
    torch.testing.assert_close(merged3["w"], 0.75 * torch.stack([f["w"] for f in fts]).mean(0))

    with pytest.raises(ConfigError, match="at least 2"):
        model_stock(base, [f1])


def test_the_mean_pairwise_cosine_in_one_pass_equals_every_pair():
    """Model Stock's angle, from the sum of the unit deltas (every pair: 245 s at 16 models),
    against the pairs one by one; a zero delta's pairs count 0."""
    from itertools import combinations

    from cliplab.merge.stock import mean_pairwise_cosine

    g = torch.Generator().manual_seed(0)
    shared = torch.randn(50, generator=g)
    deltas = [shared + 0.7 * torch.randn(50, generator=g) for _ in range(5)] + [torch.zeros(50)]
    pairs = [torch.nn.functional.cosine_similarity(a, b, dim=0).item() if a.any() and b.any()
             else 0.0 for a, b in combinations(deltas, 2)]
    assert mean_pairwise_cosine(iter(deltas)) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    assert mean_pairwise_cosine([torch.zeros(3), torch.zeros(3)]) == 0.0


def test_model_stock_summary_leaves_out_the_tensors_no_fine_tune_changed():
    """merge.json's mean ratio is over the tensors the fine-tunes changed: a frozen tensor's
    t=0 (by construction) would pull it toward 0."""
    # "once": changed by one fine-tune only (its other delta is zero, so t = 0), still counted
    base = {"w": T([1.0, 1.0]), "frozen": T([5.0, 5.0]), "once": T([0.0, 0.0])}
    fts = [{"w": T([2.0, 1.0]), "frozen": T([5.0, 5.0]), "once": T([1.0, 0.0])},
           {"w": T([2.0, 1.5]), "frozen": T([5.0, 5.0]), "once": T([0.0, 0.0])}]
    _, ratios = model_stock(base, fts)
    summary = ratio_summary(ratios, base, fts)
    assert ratios["frozen"] == ratios["once"] == 0.0 and ratios["w"] > 0.5
    assert summary["mean_ratio"] == pytest.approx(ratios["w"] / 2)
    assert summary["min_ratio"] == 0.0 and summary["max_ratio"] == pytest.approx(ratios["w"])
    assert summary["unchanged_tensors"] == 1 and summary["ratios"] == ratios


def test_task_vectors_add_negate_scale():
    base = {"w": T([1.0, 2.0]), "pos": T([0, 1])}
    fa = {"w": T([2.0, 2.5]), "pos": T([0, 1])}
    fb = {"w": T([0.0, 4.0]), "pos": T([0, 1])}
    ta, tb = task_vector(fa, base), task_vector(fb, base)
    assert set(ta) == {"w"} and torch.equal(ta["w"], T([1.0, 0.5]))
    assert torch.equal(apply_task_vector(base, ta)["w"], fa["w"])            # add: the fine-tune
    assert torch.equal(apply_task_vector(base, ta, -1.0)["w"], T([0.0, 1.5]))  # negate
    assert torch.equal(apply_task_vector(base, ta, 0.5)["w"], T([1.5, 2.25]))  # scale
    both = combine_task_vectors([ta, tb])  # (1, .5) + (-1, 2)
    assert torch.equal(both["w"], T([0.0, 2.5]))
    mixed = combine_task_vectors([ta, tb], [2.0, -1.0])  # (2, 1) - (-1, 2)
    assert torch.equal(apply_task_vector(base, mixed)["w"], T([4.0, 1.0]))
    assert torch.equal(apply_task_vector(base, both)["pos"], base["pos"])
    with pytest.raises(ConfigError, match="2 task vectors"):
        combine_task_vectors([ta, tb], [1.0])
    # entries of other names are refused, not dropped (the base came back unchanged)
    with pytest.raises(ConfigError, match="1 task-vector tensor.* not in the base.*x.w"):
        apply_task_vector(base, {"x.w": ta["w"]})
    with pytest.raises(ConfigError, match="task vectors 0 and 1 cover different tensors"):
        combine_task_vectors([ta, {"v": tb["w"]}])


def _ties_vectors():
    return [{"w": T([4.0, -1.0, 0.5, -3.0, 2.0]), "b": T([1.0, 0.1])},
            {"w": T([-2.0, 3.0, -0.2, -1.0, 5.0]), "b": T([-0.5, 1.5])},
            {"w": T([1.0, -4.0, 0.1, 2.0, -0.3]), "b": T([0.2, -6.0])}]


def test_ties_trim_keeps_the_top_fraction_over_the_whole_vector():
    t1, t2, t3 = (trim_top_fraction(v, 0.4) for v in _ties_vectors())  # 3 of 7 entries
    assert torch.equal(t1["w"], T([4.0, 0, 0, -3.0, 2.0])) and torch.equal(t1["b"], T([0.0, 0]))
    assert torch.equal(t2["w"], T([-2.0, 3.0, 0, 0, 5.0])) and torch.equal(t2["b"], T([0.0, 0]))
    assert torch.equal(t3["w"], T([0.0, -4.0, 0, 2.0, 0])) and torch.equal(t3["b"], T([0.0, -6]))
    with pytest.raises(ConfigError, match="density"):
        trim_top_fraction(_ties_vectors()[0], 0.0)


def test_ties_density_is_a_fraction_of_the_entries_the_fine_tune_changed():
    """A partial fine-tune (here: 4 changed entries among 12, the rest frozen) keeps half of
    its changes at density 0.5, not every change (half of 12 entries would be 6 > 4)."""
    vector = {"tower": T([0.0] * 8), "head": T([1.0, -4.0, 2.0, -0.5])}
    trimmed = trim_top_fraction(vector, 0.5)
    assert torch.equal(trimmed["head"], T([0.0, -4.0, 2.0, 0.0]))
    assert torch.equal(trimmed["tower"], T([0.0] * 8))


def test_ties_sign_election_and_disjoint_mean_by_hand():
    trimmed = [trim_top_fraction(v, 0.4) for v in _ties_vectors()]
    # sums: w (2, -1, 0, -1, 7), b (0, -6); signs sum to -1, so zero sums elect -1
    signs = elect_sign(trimmed)
    assert torch.equal(signs["w"], T([1.0, -1, -1, -1, 1]))
    assert torch.equal(signs["b"], T([-1.0, -1]))
    merged = disjoint_mean(trimmed, signs)
    # w0: only +4 agrees; w1: only -4; w2: none; w3: only -3; w4: (2 + 5) / 2
    assert torch.equal(merged["w"], T([4.0, -4.0, 0.0, -3.0, 3.5]))
    assert torch.equal(merged["b"], T([0.0, -6.0]))


def test_ties_zero_sum_takes_the_majority_sign():
    signs = elect_sign([{"x": T([1.0, 2.0, 0.0])}, {"x": T([-1.0, 1.0, 0.0])}])
    assert torch.equal(signs["x"], T([1.0, 1.0, 1.0]))
    assert torch.equal(disjoint_mean([{"x": T([1.0, 2.0, 0.0])}, {"x": T([-1.0, 1.0, 0.0])}],
                                     signs)["x"], T([1.0, 1.5, 0.0]))
    # no majority either (every sum zero): positive
    opposed = [{"x": T([1.0, -1.0])}, {"x": T([-1.0, 1.0])}]
    signs = elect_sign(opposed)
    assert torch.equal(signs["x"], T([1.0, 1.0]))
    assert torch.equal(disjoint_mean(opposed, signs)["x"], T([1.0, 1.0]))


def test_ties_merge_end_to_end():
    base = {"w": torch.ones(5), "b": T([2.0, 2.0]), "ids": T([3, 4])}
    fts = [{"w": 1 + v["w"], "b": 2 + v["b"], "ids": T([3, 4])} for v in _ties_vectors()]
    merged = ties_merge(base, fts, density=0.4, scale=0.5)
    torch.testing.assert_close(merged["w"], 1 + 0.5 * T([4.0, -4.0, 0.0, -3.0, 3.5]))
    torch.testing.assert_close(merged["b"], 2 + 0.5 * T([0.0, -6.0]))
    assert torch.equal(merged["ids"], base["ids"])


def test_integer_buffers_must_agree_in_task_arithmetic_and_ties():
    """Task arithmetic and TIES kept the base's integer buffers without comparing them, where
    the soups refuse unequal ones."""
    base = {"w": torch.zeros(2), "i": torch.tensor([1, 2])}
    other = {"w": torch.ones(2), "i": torch.tensor([1, 3])}
    with pytest.raises(ModelError, match="non-float tensor 'i' differs"):
        task_vector(other, base)
    with pytest.raises(ModelError, match="non-float tensor 'i' differs"):
        ties_merge(base, [other], density=1.0)
    same = {"w": torch.ones(2), "i": torch.tensor([1, 2])}
    assert torch.equal(apply_task_vector(base, task_vector(same, base))["i"], base["i"])


def test_a_soup_of_weights_near_the_float_limit_is_their_mean():
    """Weights summing past the float range made every weight 0 (w / inf)."""
    states = [{"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 6.0])}]
    soup = uniform_soup(states, [1e308, 1e308])
    assert torch.equal(soup["w"], torch.tensor([2.0, 4.0]))


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_dare_keeps_entries_by_the_seeded_mask_and_rescales_them_exactly():
    """Each kept entry is the task vector's times 1/(1−p) exactly (p = 0.5: ×2, p = 0.75: ×4),
    each dropped one 0; the masks are ``rand >= p`` drawn per tensor in sorted key order."""
    vector = {"b": T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0]), "a": T([[0.5, 1.5], [-2.5, 3.5]])}
    for p, factor in ((0.5, 2.0), (0.75, 4.0)):
        out = drop_and_rescale(vector, p, _seeded(7))
        g = _seeded(7)
        keep_a, keep_b = torch.rand(2, 2, generator=g) >= p, torch.rand(6, generator=g) >= p
        assert 0 < int(keep_a.sum() + keep_b.sum()) < 10  # some kept, some dropped
        for key, keep in (("a", keep_a), ("b", keep_b)):
            assert torch.equal(out[key], torch.where(keep, vector[key] * factor, T(0.0)))
    # without the rescale: the same entries kept, as they were
    plain = drop_and_rescale(vector, 0.5, _seeded(7), rescale=False)
    assert torch.equal(plain["b"] * 2, drop_and_rescale(vector, 0.5, _seeded(7))["b"])
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=rf"^drop_rate .* must be in \[0, 1\), not {bad}$"):
            drop_and_rescale(vector, bad, _seeded(0))


def test_dare_masks_each_model_in_turn_from_one_seeded_generator():
    """base + Σ λ_i δ̂_i with model 0's masks drawn before model 1's; integer buffers copied."""
    base = {"w": T([1.0, 1.0, 1.0, 1.0]), "ids": T([0, 1])}
    fts = [{"w": T([2.0, 3.0, 0.0, 5.0]), "ids": T([0, 1])},
           {"w": T([1.5, 0.0, 2.0, 1.0]), "ids": T([0, 1])}]
    merged = dare_merge(base, fts, drop_rate=0.5, scale=[1.0, -0.5], seed=3)
    g = _seeded(3)
    m0, m1 = (torch.rand(4, generator=g) >= 0.5 for _ in fts)
    d0, d1 = T([1.0, 2.0, -1.0, 4.0]), T([0.5, -1.0, 1.0, 0.0])
    assert torch.equal(merged["w"], base["w"] + 2 * d0 * m0 - 0.5 * 2 * d1 * m1)
    assert torch.equal(merged["ids"], base["ids"])
    with pytest.raises(ModelError, match="non-float tensor 'ids' differs"):
        dare_merge(base, [{"w": T([0.0] * 4), "ids": T([0, 2])}])
    with pytest.raises(ConfigError, match="drop_rate"):
        dare_merge(base, fts, drop_rate=1.0)


def test_dare_without_dropping_is_task_arithmetic_bit_for_bit():
    g = _seeded(0)
    base = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
    fts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
           for _ in range(3)]
    scales = [0.3, 0.7, -0.2]
    ta = apply_task_vector(base, combine_task_vectors([task_vector(f, base) for f in fts], scales))
    dare = dare_merge(base, fts, drop_rate=0.0, scale=scales, seed=5)
    assert all(torch.equal(dare[k], ta[k]) for k in base)


def test_dare_is_reproducible_by_its_seed():
    g = _seeded(1)
    base = {"w": torch.randn(50, generator=g), "v": torch.randn(4, 5, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    first, again = (dare_merge(base, fts, 0.5, 1.0, seed=11) for _ in range(2))
    other = dare_merge(base, fts, 0.5, 1.0, seed=12)
    assert all(torch.equal(first[k], again[k]) for k in base)
    assert not torch.equal(first["w"], other["w"]) and not torch.equal(first["v"], other["v"])


def test_dare_rescaled_vector_is_unbiased():
    """E[δ̂] = δ: over n entries Σδ̂ has mean Σδ and variance Σδ²·p/(1−p) (each entry is
    δ/(1−p) with probability 1−p, else 0); the sum lands within 5 standard deviations (a
    chance of ~6e-7 of failing for a correct DARE). Without the rescale it falls to (1−p)·Σδ,
    hundreds of deviations away; the share of dropped entries is p within 5 binomial sds."""
    n, p = 1_000_000, 0.9
    # not drawn from a seeded generator: randn and the masks' rand from one seed are correlated
    delta = torch.linspace(-1.0, 3.0, n)
    for seed in (0, 1, 2):
        dropped = drop_and_rescale({"d": delta}, p, _seeded(seed))["d"]
        sd = math.sqrt(float((delta.double() ** 2).sum()) * p / (1 - p))
        assert abs(float(dropped.double().sum() - delta.double().sum())) < 5 * sd
        share = float((dropped == 0).double().mean())
        assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / n)
        plain = drop_and_rescale({"d": delta}, p, _seeded(seed), rescale=False)["d"]
        assert abs(float(plain.double().sum() - delta.double().sum())) > 100 * sd


def _inputs(**kw) -> MergeInputs:
    states = [{"w": T([1.0, 3.0])}, {"w": T([5.0, -1.0])}, {"w": T([2.0, 2.0])}]
    return MergeInputs(states=states[:kw.pop("n", 2)], names=["a", "b", "c"][:kw.pop("k", 2)],
                       base=kw.pop("base", None), scores=kw.pop("scores", {}),
                       evaluate=kw.pop("evaluate", None), progress=False, **kw)


def test_merge_methods_pass_their_settings_through():
    """The registry behind `cliplab merge --method`: each method's settings reach its
    operation (weights, scale, density, the held-out scores in name order)."""
    record = {}
    merged = MERGE_METHODS["uniform"](_inputs(weights=[3.0, 1.0]), record)
    torch.testing.assert_close(merged["w"], T([2.0, 2.0]))  # 0.75 a + 0.25 b
    assert record["weights"] == [3.0, 1.0]

    base = {"w": T([0.0, 0.0])}
    inputs = _inputs(base=base, scale=0.5, density=1.0)
    want = ties_merge(base, inputs.states, 1.0, 0.5)
    torch.testing.assert_close(MERGE_METHODS["ties"](inputs, record)["w"], want["w"])
    assert record["scale"] == 0.5 and record["density"] == 1.0
    torch.testing.assert_close(MERGE_METHODS["task-arithmetic"](inputs, {})["w"], T([3.0, 1.0]))
    record = {}
    inputs = _inputs(base=base, scale=[0.5, 2.0], drop_rate=0.5, seed=4)
    want = dare_merge(base, inputs.states, 0.5, [0.5, 2.0], 4)
    assert torch.equal(MERGE_METHODS["dare"](inputs, record)["w"], want["w"])
    assert record == {"scale": [0.5, 2.0], "drop_rate": 0.5, "seed": 4}

    # scores given by name: order a, c, b; a soup scores best at w[0] = 1.5 (a + c: 1.0, kept;
    # a + c + b: w[0] 8/3, 0.88, dropped)
    record = {}
    merged = MERGE_METHODS["greedy"](
        _inputs(n=3, k=3, scores={"a": 0.9, "b": 0.1, "c": 0.5},
                evaluate=lambda s: 1 - abs(float(s["w"][0]) - 1.5) / 10), record)
    assert [s["ingredient"] for s in record["greedy"]["steps"]] == ["a", "c", "b"]
    assert record["greedy"]["kept"] == ["a", "c"]
    torch.testing.assert_close(merged["w"], T([1.5, 2.5]))


def test_first_difference_names_a_key_only_one_side_has():
    from cliplab.merge.checkpoints import first_difference

    assert first_difference({"a": 1}, {}) == "a"
    assert first_difference({}, {"a": 1}) == "a"
    assert first_difference({"v": {"x": 1}}, {"v": {}}) == "v.x"
    assert first_difference({"a": 1, "dtype": "x"}, {"a": 1}) is None  # volatile: ignored


def test_every_method_setting_is_a_config_key_and_reaches_the_method():
    """A method's own keys (its registry entry) are `MergeConfig` fields that `run_merge` hands
    to `MergeInputs` by name: a key missing from either would be refused or silently dropped."""
    import dataclasses

    from cliplab.merge.config import MergeConfig
    from cliplab.merge.methods import method_keys

    inputs = {f.name for f in dataclasses.fields(MergeInputs)}
    assert set(method_keys()) == {"weights", "scale", "density", "drop_rate", "seed"}
    assert set(method_keys()) <= inputs and set(method_keys()) <= set(MergeConfig.model_fields)
