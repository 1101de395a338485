"""The claims of `benchmarks/papers.py` (`paper_claims.*`), each run with its training,
evaluation and data loading replaced by fakes that return scripted accuracies: that each verdict
follows the rule its module's docstring fixes (one case per condition, at the boundary), that
every hyperparameter is chosen on validation data whatever the test data says, and that each
entry carries the scripted per-seed numbers.

Numbers are fractions as the claims receive them. Cases on a ``beats`` rule (numbers rounded by
`mean_std`) use an arm of [81, 83] against a constant arm: pooled std sqrt((2 + 0) / 2) = 1, so
2σ = 2 points. Cases on a ``compare`` rule use multiples of U = 1/16 (6.25 points, exact in
binary): an arm [m - U, m + U] against a constant one has pooled std U, so 2σ = 2U.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from paper_claims import adapt_runs, clip_adapter, cocoop, common, coop, finetunes  # noqa: E402
from paper_claims import hard_negatives, soups, task_arithmetic, tip_adapter, wise_ft  # noqa: E402

SEEDS = [1, 2]
U = 1 / 16


@pytest.fixture
def ctx(tmp_path):
    """A claim context as `papers.run_claims` builds it (full sizes, a data folder given)."""
    return common.ClaimContext(base=tmp_path / "base", seeds=list(SEEDS), quick=False,
                               work=tmp_path / "work", data_dir="/data/fmnist")


def head(result: dict) -> tuple:
    """An entry's claim, paper and seeds."""
    return result["claim"], result["paper"], result["seeds"]


def entry_of(module) -> tuple:
    """What `head` of ``module``'s entry must be: its claim and paper, run on SEEDS."""
    return module.CLAIM, module.PAPER, SEEDS


def split_of(ctx, spec):
    """``"test"`` or ``"validation"`` for a Fashion-MNIST spec (its class and prompt options
    aside); anything else fails the test."""
    plain = {k: v for k, v in spec.items() if k not in ("classes", "descriptions")}
    if plain == common.test_set(ctx):
        return "test"
    if plain == common.validation_pool(ctx, plain.get("limit")):
        return "validation"
    raise AssertionError(f"neither the test set nor the validation pool: {spec}")


def fake_adapt(monkeypatch, module, ctx, on_validation, on_test):
    """Replace ``module``'s `run_adapt` (and its model and cache) by a fake: configs scored on
    the validation pool get ``on_validation(cfg)`` as test accuracy, those on the test set
    ``on_test(cfg)`` (a dict of the result's parts); returns the list of configs received."""
    configs = []

    def run_adapt(cfg, model=None, progress=True, cache=None, write=True):
        configs.append(cfg)
        train = {k: v for k, v in cfg["data"]["train"].items()
                 if k not in ("classes", "descriptions")}
        assert train == common.train_pool(ctx)
        if split_of(ctx, cfg["data"]["test"]) == "validation":
            return {"test": {"acc1": on_validation(cfg)}, "zeroshot": {"acc1": 0.0}}
        return on_test(cfg)

    monkeypatch.setattr(module, "run_adapt", run_adapt)
    monkeypatch.setattr(module, "load_model", lambda base: "model")
    monkeypatch.setattr(module, "FeatureCache", lambda: "cache")
    return configs


def by_seed(values):
    return dict(zip(SEEDS, values))


def pct(values):
    return [round(100 * v, 2) for v in values]


class FakeScorer:
    """`finetunes.Scorer` without models: built like it (``Scorer(template, sets)``), it
    scores a state on named sets with ``table(state, name)`` and records each call."""

    def __init__(self, table):
        self.table, self.calls, self.sets = table, [], None

    def __call__(self, template, sets):
        self.sets = dict(sets)
        return self.score

    def score(self, state, names=None):
        names = list(names or self.sets)
        self.calls.append((state, names))
        return {n: self.table(state, n) for n in names}


# --- CoOp ----------------------------------------------------------------------------------

COOP_LR = {1: 0.02, 2: 0.2}  # the rate the validation scores make best, per seed


def run_coop(monkeypatch, ctx, hand, one, sixteen):
    """`coop.run` on scripted per-seed test accuracies of the hand prompts, 1 and 16 shots at
    the validation-best rate; every other rate scores 0.99 on test (the test set would pick
    0.002)."""
    def on_validation(cfg):
        assert cfg["shots"] == 16 and not cfg["compare_zeroshot"]
        return 0.9 if cfg["options"]["lr"] == COOP_LR[cfg["seed"]] else 0.5

    def on_test(cfg):
        seed = cfg["seed"]
        acc = ({1: by_seed(one), 16: by_seed(sixteen)}[cfg["shots"]][seed]
               if cfg["options"]["lr"] == COOP_LR[seed] else 0.99)
        return {"test": {"acc1": acc}, "zeroshot": {"acc1": by_seed(hand)[seed]}}

    configs = fake_adapt(monkeypatch, coop, ctx, on_validation, on_test)
    return coop.run(ctx), configs


@pytest.mark.parametrize("hand, one, expected", [
    ([0.79, 0.79], [0.79, 0.79], True),    # 16-shot 82 vs 79 and 79: gaps 3 > 2σ = 2
    ([0.80, 0.80], [0.79, 0.79], False),   # 16-shot vs hand prompts: gap 2 = 2σ, a tie
    ([0.79, 0.79], [0.80, 0.80], False),   # 16-shot vs 1-shot: gap 2 = 2σ, a tie
])
def test_coop_reproduces_only_when_16_shots_beat_hand_prompts_and_1_shot(
        monkeypatch, ctx, hand, one, expected):
    """CoOp's rule: 16-shot beats the hand prompts AND beats 1-shot (gap > 2σ, not ≥)."""
    result, _ = run_coop(monkeypatch, ctx, hand, one, [0.81, 0.83])
    assert result["reproduced"] is expected


def test_coop_chooses_the_rate_on_validation_only(monkeypatch, ctx):
    """Each seed's rate is the validation-best one although the test set prefers another; the
    search runs 16 shots for every rate on the validation pool, the reported runs on the test
    set only at the chosen rate."""
    result, configs = run_coop(monkeypatch, ctx, [0.79] * 2, [0.79] * 2, [0.81, 0.83])
    assert result["lr_chosen_on_validation"] == COOP_LR
    searched = [(c["seed"], c["options"]["lr"]) for c in configs
                if split_of(ctx, c["data"]["test"]) == "validation"]
    assert sorted(searched) == sorted((s, lr) for s in SEEDS for lr in coop.LRS)
    reported = [c for c in configs if split_of(ctx, c["data"]["test"]) == "test"]
    assert sorted((c["seed"], c["shots"]) for c in reported) == [(1, 1), (1, 16), (2, 1), (2, 16)]
    assert all(c["options"]["lr"] == COOP_LR[c["seed"]] for c in reported)
    assert all("val" not in c["data"] for c in configs)


def test_coop_entry_carries_the_scripted_numbers(monkeypatch, ctx):
    """The entry: claim, paper, verdict, seeds, and each arm's per-seed values with their mean
    and std (percent points)."""
    result, _ = run_coop(monkeypatch, ctx, [0.79, 0.77], [0.70, 0.74], [0.81, 0.83])
    assert head(result) == entry_of(coop)
    assert result["reproduced"] is True
    n = result["numbers"]
    assert n["coop 16-shot"] == {"mean": 82.0, "std": 1.41, "values": [81.0, 83.0]}
    assert n["coop 1-shot"] == {"mean": 72.0, "std": 2.83, "values": [70.0, 74.0]}
    assert n["hand prompts"] == {"mean": 78.0, "std": 1.41, "values": [79.0, 77.0]}


# --- CoCoOp --------------------------------------------------------------------------------

COCOOP_LR = {"coop": 0.2, "cocoop": 0.02}  # validation-best rates


def hm_base(hm, novel):
    """The base accuracy whose harmonic mean with ``novel`` is ``hm``: b = novel·h / (2·novel
    − h)."""
    return novel * hm / (2 * novel - hm)


def run_cocoop(monkeypatch, ctx, coop_acc, cocoop_acc):
    """`cocoop.run` on scripted per-seed (base, novel) test accuracies per method at the
    validation-best rates; other rates score 0.99 on test. Returns the entry, the run_adapt
    configs and the novel set's spec."""
    novel_specs = []
    scripted = {"coop": coop_acc, "cocoop": cocoop_acc}

    class Adapter:
        def __init__(self, novel):
            self.novel = novel

        def for_classes(self, data):
            assert data == "novel images"
            return self

        def score(self, sets, cache):
            assert list(sets) == ["novel"] and sets["novel"] == "novel images"
            return {"novel": {"acc1": self.novel}}

    def on_validation(cfg):
        assert cfg["seed"] == SEEDS[0] and cfg["data"]["test"]["classes"] == common.SEEN
        assert cfg["data"]["test"]["limit"] == cocoop.VALIDATION_IMAGES
        return 0.9 if cfg["options"]["lr"] == COCOOP_LR[cfg["method"]] else 0.5

    def on_test(cfg):
        method, seed = cfg["method"], cfg["seed"]
        assert cfg["data"]["test"]["classes"] == common.SEEN
        base, novel = (by_seed(scripted[method])[seed]
                       if cfg["options"]["lr"] == COCOOP_LR[method] else (0.99, 0.99))
        return {"test": {"acc1": base}, "zeroshot": {"acc1": 0.7}, "adapter": Adapter(novel)}

    configs = fake_adapt(monkeypatch, cocoop, ctx, on_validation, on_test)
    monkeypatch.setattr(cocoop, "load_source",
                        lambda spec: novel_specs.append(spec) or "novel images")
    monkeypatch.setattr(cocoop, "run_task", lambda model, task, context: {"acc1": 0.6})
    monkeypatch.setattr(cocoop, "TaskContext", lambda **kw: None)
    return cocoop.run(ctx), configs, novel_specs


@pytest.mark.parametrize("cocoop_acc, expected", [
    # base = novel: HM = both; novel and HM 82 vs CoOp's 79: gaps 3 > 2σ = 2
    ([(0.81, 0.81), (0.83, 0.83)], True),
    # novel 81 vs 79: gap 2 = 2σ, a tie; HM (base 0.95) ≈ [86.86, 88.02]: far above 79
    ([(0.95, 0.80), (0.95, 0.82)], False),
    # novel 90 vs 79: far above; HM [80, 82] (base chosen for it) vs 79: gap 2 = 2σ, a tie
    ([(hm_base(0.80, 0.9), 0.9), (hm_base(0.82, 0.9), 0.9)], False),
])
def test_cocoop_reproduces_only_when_novel_and_harmonic_mean_beat_coop(
        monkeypatch, ctx, cocoop_acc, expected):
    """CoCoOp's rule: novel accuracy beats CoOp's AND the harmonic mean beats CoOp's."""
    result, _, _ = run_cocoop(monkeypatch, ctx, [(0.79, 0.79)] * 2, cocoop_acc)
    assert result["reproduced"] is expected


def test_cocoop_chooses_rates_on_base_classes_of_the_validation_pool(monkeypatch, ctx):
    """Each method's rate is its validation-best (first seed, base classes, validation pool)
    although the test set prefers another; novel classes enter only the reported test."""
    result, configs, novel_specs = run_cocoop(monkeypatch, ctx, [(0.79, 0.79)] * 2,
                                              [(0.81, 0.81), (0.83, 0.83)])
    assert result["lr_chosen_on_validation"] == COCOOP_LR
    searched = sorted((c["method"], c["options"]["lr"]) for c in configs
                      if split_of(ctx, c["data"]["test"]) == "validation")
    assert searched == sorted((m, lr) for m in COCOOP_LR for lr in coop.LRS)
    reported = [c for c in configs if split_of(ctx, c["data"]["test"]) == "test"]
    assert sorted((c["method"], c["seed"]) for c in reported) == sorted(
        (m, s) for m in COCOOP_LR for s in SEEDS)
    assert all(c["options"]["lr"] == COCOOP_LR[c["method"]] for c in reported)
    assert novel_specs == [{**common.test_set(ctx), "classes": common.HELDOUT,
                            "descriptions": False}]
    assert result["validation_acc1"]["coop"] == {"0.002": 50.0, "0.02": 50.0, "0.2": 90.0}


def test_cocoop_entry_carries_the_scripted_numbers(monkeypatch, ctx):
    """Per-seed base, novel and harmonic-mean values of each method, their mean and std."""
    result, _, _ = run_cocoop(monkeypatch, ctx, [(0.9, 0.6), (0.8, 0.6)],
                              [(0.81, 0.81), (0.83, 0.83)])
    assert head(result) == entry_of(cocoop)
    n = result["numbers"]
    assert n["coop base"] == {"mean": 85.0, "std": 7.07, "values": [90.0, 80.0]}
    assert n["coop novel"] == {"mean": 60.0, "std": 0.0, "values": [60.0, 60.0]}
    # HM(0.9, 0.6) = 1.08 / 1.5 = 0.72; HM(0.8, 0.6) = 0.96 / 1.4 = 0.685714...
    assert n["coop HM"]["values"] == [72.0, 68.57]
    assert n["cocoop HM"] == {"mean": 82.0, "std": 1.41, "values": [81.0, 83.0]}
    assert n["zeroshot novel"]["values"] == [60.0, 60.0]


# --- Tip-Adapter ---------------------------------------------------------------------------

def run_tip(monkeypatch, ctx, zs, tip, tip_f):
    """`tip_adapter.run` on scripted per-seed test accuracies; each run reports the (alpha,
    beta) its own search chose (alpha: seed + 0.25 for Tip-Adapter, seed + 0.5 for -F)."""
    scripted = {"tip-adapter": (by_seed(tip), 0.25), "tip-adapter-f": (by_seed(tip_f), 0.5)}

    def on_test(cfg):
        acc, alpha = scripted[cfg["method"]]
        seed = cfg["seed"]
        return {"test": {"acc1": acc[seed]}, "zeroshot": {"acc1": by_seed(zs)[seed]},
                "options": {"alpha": seed + alpha, "beta": 2.0}}

    configs = fake_adapt(monkeypatch, tip_adapter, ctx, lambda cfg: pytest.fail(
        "Tip-Adapter scores nothing on the validation pool itself"), on_test)
    return tip_adapter.run(ctx), configs


@pytest.mark.parametrize("zs, tip_f, expected", [
    ([0.79, 0.79], [0.85, 0.85], True),   # Tip 82 vs zero-shot 79, -F 85 vs Tip 82: gaps 3 > 2
    ([0.80, 0.80], [0.85, 0.85], False),  # Tip vs zero-shot: gap 2 = 2σ, a tie
    ([0.79, 0.79], [0.84, 0.84], False),  # Tip-Adapter-F vs Tip: gap 2 = 2σ, a tie
])
def test_tip_adapter_reproduces_only_when_both_steps_beat(monkeypatch, ctx, zs, tip_f,
                                                          expected):
    """Tip-Adapter's rule: Tip-Adapter beats zero-shot AND Tip-Adapter-F beats Tip-Adapter."""
    result, _ = run_tip(monkeypatch, ctx, zs, [0.81, 0.83], tip_f)
    assert result["reproduced"] is expected


def test_tip_adapter_searches_on_the_validation_pool_and_reports_on_test(monkeypatch, ctx):
    """Every run's own (alpha, beta) search gets a validation split of the validation pool
    (200 shots a class at full size), never the test set; the entry records what each search
    chose, and the arms' numbers are the scripted ones."""
    result, configs = run_tip(monkeypatch, ctx, [0.79, 0.79], [0.81, 0.83], [0.85, 0.87])
    assert sorted((c["method"], c["seed"]) for c in configs) == sorted(
        (m, s) for m in ("tip-adapter", "tip-adapter-f") for s in SEEDS)
    for cfg in configs:
        assert split_of(ctx, cfg["data"]["val"]) == "validation"
        assert split_of(ctx, cfg["data"]["test"]) == "test"
        assert cfg["val_shots"] == adapt_runs.VAL_SHOTS[False] == 200
        assert cfg["options"]["search"] is True
    assert result["chosen_on_validation"] == [
        "tip-adapter seed 1: alpha 1.25, beta 2.00", "tip-adapter-f seed 1: alpha 1.50, beta 2.00",
        "tip-adapter seed 2: alpha 2.25, beta 2.00", "tip-adapter-f seed 2: alpha 2.50, beta 2.00"]
    assert head(result) == entry_of(tip_adapter)
    assert result["numbers"]["Tip-Adapter-F"] == {"mean": 86.0, "std": 1.41,
                                                  "values": [85.0, 87.0]}
    assert result["numbers"]["zero-shot"] == {"mean": 79.0, "std": 0.0, "values": [79.0, 79.0]}


# --- CLIP-Adapter --------------------------------------------------------------------------

# validation scores per seed and ratio: seed 1 best at 0.6; seed 2 ties 0.4 and 0.8 (-> 0.4)
ADAPTER_VAL = {1: {0.2: 0.5, 0.4: 0.5, 0.6: 0.9, 0.8: 0.5},
               2: {0.2: 0.5, 0.4: 0.9, 0.6: 0.5, 0.8: 0.9}}
ADAPTER_RATIO = {1: 0.6, 2: 0.4}


def run_clip_adapter(monkeypatch, ctx, zs, adapter):
    """`clip_adapter.run` on scripted per-seed test accuracies at the validation-best ratio;
    every other ratio scores 0.99 on test (the test set would pick 0.2)."""
    def on_validation(cfg):
        assert cfg["shots"] == 16
        return ADAPTER_VAL[cfg["seed"]][cfg["options"]["ratio"]]

    def on_test(cfg):
        seed = cfg["seed"]
        acc = by_seed(adapter)[seed] if cfg["options"]["ratio"] == ADAPTER_RATIO[seed] else 0.99
        return {"test": {"acc1": acc}, "zeroshot": {"acc1": by_seed(zs)[seed]}}

    configs = fake_adapt(monkeypatch, clip_adapter, ctx, on_validation, on_test)
    return clip_adapter.run(ctx), configs


@pytest.mark.parametrize("zs, expected", [
    ([0.79, 0.79], True),   # CLIP-Adapter 82 vs 79: gap 3 > 2σ = 2
    ([0.80, 0.80], False),  # gap 2 = 2σ: a tie
])
def test_clip_adapter_reproduces_only_when_it_beats_zero_shot(monkeypatch, ctx, zs, expected):
    """CLIP-Adapter's rule: the adapter beats zero-shot by more than 2σ."""
    result, _ = run_clip_adapter(monkeypatch, ctx, zs, [0.81, 0.83])
    assert result["reproduced"] is expected


def test_clip_adapter_chooses_the_ratio_on_validation_only(monkeypatch, ctx):
    """Each seed's ratio is the validation-best (ties: the smaller) although the test set
    prefers another; reported runs use it, and the entry has the scripted numbers."""
    result, configs = run_clip_adapter(monkeypatch, ctx, [0.79, 0.77], [0.81, 0.83])
    assert result["ratio_chosen_on_validation"] == ADAPTER_RATIO
    searched = [(c["seed"], c["options"]["ratio"]) for c in configs
                if split_of(ctx, c["data"]["test"]) == "validation"]
    assert sorted(searched) == sorted((s, r) for s in SEEDS for r in clip_adapter.RATIOS)
    reported = [c for c in configs if split_of(ctx, c["data"]["test"]) == "test"]
    assert [(c["seed"], c["options"]["ratio"]) for c in reported] == [(1, 0.6), (2, 0.4)]
    assert head(result) == entry_of(clip_adapter)
    assert result["numbers"] == {
        "zero-shot": {"mean": 78.0, "std": 1.41, "values": [79.0, 77.0]},
        "CLIP-Adapter": {"mean": 82.0, "std": 1.41, "values": [81.0, 83.0]}}


# --- WiSE-FT -------------------------------------------------------------------------------

WISE_ALPHA = {1: 0.3, 2: 0.6}  # validation-best α per seed


def run_wise(monkeypatch, ctx, zs_shift, ft_shift, wise_shift, clean=(0.75, 0.875, 0.8125)):
    """`wise_ft.run` with a fake base, fine-tunes, interpolation and scorer: on validation
    α = WISE_ALPHA[seed] has the best mean of clean (0.8) and shifted (0.9) accuracy, α = 0.9
    the best clean one (0.85; shifted 0.5), others 0.5; on test α = 0 / 1 / the chosen α give the
    scripted per-seed shifted accuracies (``clean``: their clean ones), any other α 0.99."""
    monkeypatch.setattr(wise_ft, "diverse_base", lambda c: Path("diverse-base"))
    monkeypatch.setattr(wise_ft, "load", lambda spec: dict(spec))
    monkeypatch.setattr(wise_ft, "only_classes", lambda data, names: {**data, "only": names})
    monkeypatch.setattr(wise_ft, "state_of", lambda folder: ("state", str(folder)))
    monkeypatch.setattr(wise_ft, "finetune", lambda c, lr, epochs, seed, *a, **k: f"ft-{seed}")
    monkeypatch.setattr(wise_ft, "interpolate", lambda zs, ft, a: (zs, ft, a))

    def table(state, name):
        zs, ft, a = state
        assert zs == ("state", "diverse-base")
        seed = int(ft[1].split("-")[1])
        if name == "val":  # clean alone would pick α = 0.9
            return 0.8 if a == WISE_ALPHA[seed] else 0.85 if a == 0.9 else 0.5
        if name.startswith("val"):
            return 0.9 if a == WISE_ALPHA[seed] else 0.5
        arms = {0.0: (zs_shift, clean[0]), 1.0: (ft_shift, clean[1]),
                WISE_ALPHA[seed]: (wise_shift, clean[2])}
        if a not in arms:
            return 0.99
        shift, clean_acc = arms[a]
        return clean_acc if name == "test" else by_seed(shift)[seed]

    scorer = FakeScorer(table)
    monkeypatch.setattr(wise_ft, "Scorer", scorer)
    return wise_ft.run(ctx), scorer


@pytest.mark.parametrize("ft_shift, wise_shift, expected", [
    # zero-shot 1/2; fine-tune 1/2 − 3U ± U: below (gap 3U > 2σ = 2U); WiSE 1/2 + 3U ± U: above
    # zero-shot (3U > 2U) and the fine-tune (6U > 2·sqrt(2)·U)
    ([0.5 - 4 * U, 0.5 - 2 * U], [0.5 + 2 * U, 0.5 + 4 * U], True),
    # fine-tune 1/2 − 2U ± U: gap 2U = 2σ, a tie: it lost no robustness
    ([0.5 - 3 * U, 0.5 - U], [0.5 + 2 * U, 0.5 + 4 * U], False),
    # WiSE 1/2 + 2U ± U vs zero-shot: gap 2U = 2σ, a tie (still above the fine-tune)
    ([0.5 - 4 * U, 0.5 - 2 * U], [0.5 + U, 0.5 + 3 * U], False),
])
def test_wise_ft_reproduces_only_when_the_fine_tune_lost_and_wise_beats_both(
        monkeypatch, ctx, ft_shift, wise_shift, expected):
    """WiSE-FT's rule on shifted test: the fine-tune below zero-shot AND WiSE-FT above
    zero-shot (and above the fine-tune, which those two imply: no case can fail it alone)."""
    result, _ = run_wise(monkeypatch, ctx, [0.5, 0.5], ft_shift, wise_shift)
    assert result["reproduced"] is expected


def test_wise_ft_chooses_alpha_on_validation_only(monkeypatch, ctx):
    """α is the validation-best per seed (by the mean of clean and shifted accuracy, not clean
    alone) although the test set prefers every other α; every
    α is scored on validation sets only, the test sets only at 0, 1 and the chosen α; the sets
    are the validation pool's and the test set's (and their shifted copies)."""
    result, scorer = run_wise(monkeypatch, ctx, [0.5, 0.5], [0.25, 0.375], [0.625, 0.75])
    assert result["numbers"]["α* (on validation)"] == [0.3, 0.6]
    val_spec, test_spec = common.validation_pool(ctx, 5000), common.test_set(ctx)
    for split, spec in (("val", val_spec), ("test", test_spec)):
        assert scorer.sets[split] == {**spec, "only": common.SEEN}
        for s in wise_ft.SHIFTS:
            assert scorer.sets[f"{split} {s}"] == {**spec, "shift": s, "only": common.SEEN}
    for (zs, ft, a), names in scorer.calls:
        splits = {n.split()[0] for n in names}
        assert splits in ({"val"}, {"test"})
        if splits == {"test"}:
            assert a in (0.0, 1.0, WISE_ALPHA[int(ft[1].split("-")[1])])
    val_alphas = sorted((ft[1], a) for (_, ft, a), names in scorer.calls if "val" in names)
    assert val_alphas == sorted((f"ft-{s}", a) for s in SEEDS for a in wise_ft.ALPHAS)


def test_wise_ft_entry_carries_the_scripted_numbers(monkeypatch, ctx):
    """The entry's shifted and clean arms are the scripted per-seed values."""
    result, _ = run_wise(monkeypatch, ctx, [0.5, 0.5], [0.25, 0.375], [0.625, 0.75])
    assert head(result) == entry_of(wise_ft)
    assert result["reproduced"] is True
    n = result["numbers"]
    assert n["shifted: zero-shot"] == {"mean": 50.0, "std": 0.0, "values": [50.0, 50.0]}
    # [25, 37.5]: mean 31.25, std 12.5 / sqrt(2) = 8.84
    assert n["fine-tuned"] == {"mean": 31.25, "std": 8.84, "values": [25.0, 37.5]}
    assert n["WiSE-FT(α*)"] == {"mean": 68.75, "std": 8.84, "values": [62.5, 75.0]}
    assert n["clean: zero-shot"]["values"] == [75.0, 75.0]
    assert n["fine-tuned "]["values"] == [87.5, 87.5]
    assert n["WiSE-FT(α*) "]["values"] == [81.25, 81.25]


# --- Model soups ---------------------------------------------------------------------------

def run_soups(monkeypatch, ctx, best, greedy, uniform):
    """`soups.run` with the real greedy and uniform soups over fake ingredients: ingredient i
    is the one-hot weight e_i, so a soup's weights say which ingredients it averages. On
    validation, lr 1e-3 (index 1) is best, then 3e-4 (0), then 3e-3 (2); the soup {0, 1} gains,
    {0, 1, 2} loses: greedy keeps [1, 0]. On test, ingredient 1 scores ``best``, {0, 1}
    ``greedy``, {0, 1, 2} ``uniform`` (per seed); ingredient 2 scores 0.99 (the test set's
    pick), ingredient 0 0.1."""
    def state_of(folder):
        lr, seed = folder
        return {"w": torch.nn.functional.one_hot(torch.tensor(soups.LRS.index(lr)), 3).float(),
                "seed": torch.tensor(float(seed))}

    val = {(0,): 0.8, (1,): 0.9, (2,): 0.7, (0, 1): 0.95, (0, 1, 2): 0.5}

    def table(state, name):
        members = tuple(int(i) for i in torch.nonzero(state["w"]).flatten())
        seed = int(state["seed"])
        if name == "val":
            return val[members]
        test = {(0,): 0.1, (1,): by_seed(best)[seed], (2,): 0.99,
                (0, 1): by_seed(greedy)[seed], (0, 1, 2): by_seed(uniform)[seed]}
        return test[members]

    scorer = FakeScorer(table)
    monkeypatch.setattr(soups, "Scorer", scorer)
    monkeypatch.setattr(soups, "load", lambda spec: dict(spec))
    monkeypatch.setattr(soups, "finetune", lambda c, lr, epochs, seed, *a, **k: (lr, seed))
    monkeypatch.setattr(soups, "state_of", state_of)
    return soups.run(ctx), scorer


EPS = 1 / 256  # 0.39 points, exact in binary


@pytest.mark.parametrize("greedy, uniform, expected", [
    # best single 1/2 on both seeds; greedy equal (a tie), uniform 1/2 − 3U ± U: below
    ([0.5, 0.5], [0.5 - 4 * U, 0.5 - 2 * U], True),
    # greedy 1/2 − 2U ± U: gap −2U = 2σ, still a tie, so not below: reproduced
    ([0.5 - 3 * U, 0.5 - U], [0.5 - 4 * U, 0.5 - 2 * U], True),
    # greedy 1/2 − 2U − ε ± U: just beyond 2σ below the best single
    ([0.5 - 3 * U - EPS, 0.5 - U - EPS], [0.5 - 4 * U, 0.5 - 2 * U], False),
    # uniform 1/2 − 2U ± U: gap −2U = 2σ, a tie, not below
    ([0.5, 0.5], [0.5 - 3 * U, 0.5 - U], False),
])
def test_soups_reproduce_only_when_greedy_is_not_below_and_uniform_is_below(
        monkeypatch, ctx, greedy, uniform, expected):
    """Soups' rule: greedy soup not below the best single (a tie counts) AND uniform soup
    below it."""
    result, _ = run_soups(monkeypatch, ctx, [0.5, 0.5], greedy, uniform)
    assert result["reproduced"] is expected


def test_soups_choose_ingredients_on_validation_only(monkeypatch, ctx):
    """Greedy order and acceptance and the "best single" come from the validation pool
    although the test set prefers ingredient 2; every mixture is scored on validation, the
    test set only for reporting; the entry has the scripted numbers."""
    result, scorer = run_soups(monkeypatch, ctx, [0.5, 0.625], [0.5, 0.5], [0.25, 0.375])
    assert scorer.sets == {"val": common.validation_pool(ctx, 5000),
                           "test": common.test_set(ctx)}
    for d in result["details"]["per_seed"]:
        assert d["kept"] == ["lr 0.001", "lr 0.0003"]
        assert [s["ingredient"] for s in d["greedy_steps"]] == ["lr 0.001", "lr 0.0003",
                                                                "lr 0.003"]
    tried = {(tuple(int(i) for i in torch.nonzero(s["w"]).flatten()), tuple(names))
             for s, names in scorer.calls}
    assert tried == {((0,), ("val",)), ((1,), ("val",)), ((2,), ("val",)),
                     ((0, 1), ("val",)), ((0, 1, 2), ("val",)),
                     ((0,), ("test",)), ((1,), ("test",)), ((2,), ("test",)),
                     ((0, 1), ("test",)), ((0, 1, 2), ("test",))}
    assert head(result) == entry_of(soups)
    n = result["numbers"]
    assert n["best single (by validation)"] == {"mean": 56.25, "std": 8.84,
                                                "values": [50.0, 62.5]}
    assert n["greedy soup"] == {"mean": 50.0, "std": 0.0, "values": [50.0, 50.0]}
    assert n["uniform soup"] == {"mean": 31.25, "std": 8.84, "values": [25.0, 37.5]}
    assert n["best single (by test, oracle)"]["values"] == [99.0, 99.0]
    assert n["ingredients kept"] == [2, 2]


# --- Task arithmetic -----------------------------------------------------------------------

# validation per negation λ: (task, control) with the base's control 0.625; 95% of it is
# allowed (≥): −0.75 sits exactly there and forgets most among the allowed; −1.0 and −1.5
# forget more but cost the control more
NEG_VAL = {-0.25: (0.4, 0.62), -0.5: (0.3, 0.6),
           -0.75: (0.2, task_arithmetic.KEEP * 0.625), -1.0: (0.1, 0.59), -1.5: (0.05, 0.3)}
ADD_VAL = {0.25: 0.6, 0.5: 0.8, 0.75: 0.7, 1.0: 0.65}  # addition: 0.5 best
TA_LAMBDA = (0.5, -0.75)


def run_task_arithmetic(monkeypatch, ctx, add, neg, neg_control, neg_val=NEG_VAL):
    """`task_arithmetic.run` with fake digits, base, fine-tunes, task vectors and scorer: the
    base scores task 1/2 and control 0.625 on validation and test; on validation +λτ scores
    ADD_VAL (control 0.625), −λτ ``neg_val`` (task, control); on test +λτ at λ = 0.5 scores
    ``add`` (control 0.625), −λτ at λ = −0.75 ``neg`` and ``neg_control`` (per seed), any other
    λ task 0.99 (addition) or 0.0 (negation) with control 0.99: what a choice on test would
    take."""
    class Digits(str):
        def __len__(self):
            return 900

    monkeypatch.setattr(task_arithmetic, "digits_base", lambda c: Path("digits-base"))
    monkeypatch.setattr(task_arithmetic, "digit_splits", lambda: (
        Digits("task digits"), "validation digits", "test digits"))
    monkeypatch.setattr(task_arithmetic, "load", lambda spec: dict(spec))
    monkeypatch.setattr(task_arithmetic, "state_of", lambda folder: ("state", str(folder)))
    monkeypatch.setattr(task_arithmetic, "finetune",
                        lambda c, lr, epochs, seed, *a, **k: f"tuned-{seed}")
    monkeypatch.setattr(task_arithmetic, "task_vector",
                        lambda tuned, base: ("tau", int(tuned[1].split("-")[1])))
    monkeypatch.setattr(task_arithmetic, "apply_task_vector",
                        lambda base, tau, lam: ("edit", tau[1], lam))

    def table(state, name):
        split, kind = name.split()
        if state == ("state", "digits-base"):
            return {"task": 0.5, "control": 0.625}[kind]
        _, seed, lam = state
        if split == "val":
            if lam > 0:
                return ADD_VAL[lam] if kind == "task" else 0.625
            return neg_val[lam][kind == "control"]
        lam_add, lam_neg = TA_LAMBDA
        if lam == lam_add:
            return by_seed(add)[seed] if kind == "task" else 0.625
        if lam == lam_neg:
            return by_seed(neg)[seed] if kind == "task" else by_seed(neg_control)[seed]
        return 0.99 if lam > 0 or kind == "control" else 0.0

    scorer = FakeScorer(table)
    monkeypatch.setattr(task_arithmetic, "Scorer", scorer)
    return task_arithmetic.run(ctx), scorer


@pytest.mark.parametrize("add, neg, neg_control, expected", [
    # base task 1/2; +λτ 1/2 + 3U ± U: above (3U > 2σ = 2U); −λτ 1/2 − 3U ± U: below;
    # control 0.59375 / 0.625 = 95% exactly: kept (≥)
    ([0.5 + 2 * U, 0.5 + 4 * U], [0.5 - 4 * U, 0.5 - 2 * U], [0.59375] * 2, True),
    # +λτ 1/2 + 2U ± U: gap 2U = 2σ, a tie
    ([0.5 + U, 0.5 + 3 * U], [0.5 - 4 * U, 0.5 - 2 * U], [0.59375] * 2, False),
    # −λτ 1/2 − 2U ± U: gap −2U = 2σ, a tie
    ([0.5 + 2 * U, 0.5 + 4 * U], [0.5 - 3 * U, 0.5 - U], [0.59375] * 2, False),
    # control (0.59375 − 1/1024) / 0.625 = 94.84%: just below 95%
    ([0.5 + 2 * U, 0.5 + 4 * U], [0.5 - 4 * U, 0.5 - 2 * U], [0.59375 - 1 / 1024] * 2, False),
])
def test_task_arithmetic_reproduces_only_when_add_gains_negate_forgets_and_control_holds(
        monkeypatch, ctx, add, neg, neg_control, expected):
    """Task arithmetic's rule on test: +λτ task above the base's AND −λτ task below it AND
    mean control with −λτ ≥ 95% of the base's."""
    result, _ = run_task_arithmetic(monkeypatch, ctx, add, neg, neg_control)
    assert result["reproduced"] is expected


def test_task_arithmetic_chooses_lambdas_on_validation_only(monkeypatch, ctx):
    """+λ: best validation task accuracy; −λ: lowest validation task accuracy among λ keeping
    validation control ≥ 95% of the base's (exactly 95% counts), though test prefers others;
    every λ is scored on validation sets only, the test sets only at the chosen λ."""
    result, scorer = run_task_arithmetic(monkeypatch, ctx, [0.625, 0.75], [0.25, 0.375],
                                         [0.59375] * 2)
    assert result["numbers"]["λ (on validation) +/−"] == [list(TA_LAMBDA)] * 2
    assert scorer.sets == {"val task": "validation digits",
                           "val control": common.validation_pool(ctx, 5000),
                           "test task": "test digits", "test control": common.test_set(ctx)}
    for state, names in scorer.calls:
        if state[0] == "edit" and names[0].startswith("test"):
            assert state[2] in TA_LAMBDA
    val_lams = sorted(s[2] for s, names in scorer.calls if s[0] == "edit" and
                      names == ["val task", "val control"])
    assert val_lams == sorted((task_arithmetic.ADD + task_arithmetic.NEGATE) * len(SEEDS))


def test_task_arithmetic_negates_nothing_when_no_lambda_keeps_the_control(monkeypatch, ctx):
    """With every negation λ costing the validation control more than 5%, −λ is 0."""
    worse = {lam: (task, 0.5) for lam, (task, _) in NEG_VAL.items()}
    result, _ = run_task_arithmetic(monkeypatch, ctx, [0.625, 0.75], [0.25, 0.375],
                                    [0.59375] * 2, neg_val=worse)
    assert [pair[1] for pair in result["numbers"]["λ (on validation) +/−"]] == [0.0, 0.0]


def test_task_arithmetic_entry_carries_the_scripted_numbers(monkeypatch, ctx):
    """The entry's task and control arms are the scripted per-seed values."""
    result, _ = run_task_arithmetic(monkeypatch, ctx, [0.625, 0.75], [0.25, 0.375],
                                    [0.59375, 0.625])
    assert head(result) == entry_of(task_arithmetic)
    n = result["numbers"]
    assert n["task: base"] == {"mean": 50.0, "std": 0.0, "values": [50.0, 50.0]}
    assert n["+λτ"] == {"mean": 68.75, "std": 8.84, "values": [62.5, 75.0]}
    assert n["−λτ"] == {"mean": 31.25, "std": 8.84, "values": [25.0, 37.5]}
    # [59.375, 62.5]: mean 60.9375 -> 60.94, std 3.125 / sqrt(2) = 2.21
    assert n["−λτ "] == {"mean": 60.94, "std": 2.21, "values": [59.38, 62.5]}
    assert n["control: base"]["values"] == [62.5, 62.5]
    assert result["details"]["control_ratio_at_negation"] == round(60.9375 / 62.5, 4)


# --- Hard negatives ------------------------------------------------------------------------

def hn_scores(attribute=(0.625, 0.625), relation=(0.625, 0.625), zeroshot=(0.8, 0.8)):
    """Per-arm per-seed scores: plain and captions at attribute / relation swap 1/2 and
    zero-shot 0.8; hard_negatives as given."""
    plain = {"attribute_swap": (0.5, 0.5), "relation_swap": (0.5, 0.5),
             "word_shuffle": (0.5, 0.5), "zeroshot": (0.8, 0.8)}
    hn = {"attribute_swap": attribute, "relation_swap": relation, "word_shuffle": (0.9, 0.7),
          "zeroshot": zeroshot}
    return {"plain": plain, "captions": plain, "hard_negatives": hn}


def run_hard_negatives(monkeypatch, ctx, per_arm):
    """`hard_negatives.run` with a fake base, fine-tunes and evaluation returning
    ``per_arm[arm][metric][seed index]`` (base: 0.25 everywhere); records each evaluation."""
    calls = []
    monkeypatch.setattr(hard_negatives, "base_model", lambda work: "base")
    monkeypatch.setattr(hard_negatives, "finetune",
                        lambda base, seed, arm, work, quick: f"{arm} {seed}")

    def scores(model_dir, suite, context, fit=None):
        calls.append((model_dir, suite, fit))
        if model_dir == "base":
            return {m: 0.25 for m in ("attribute_swap", "relation_swap", "word_shuffle",
                                      "zeroshot")}
        arm, seed = model_dir.split()
        out = {m: v[SEEDS.index(int(seed))] for m, v in per_arm[arm].items()}
        return {**out, "relation_swap_on_training_scenes": 0.75}

    monkeypatch.setattr(hard_negatives, "scores", scores)
    return hard_negatives.run(ctx), calls


@pytest.mark.parametrize("changed, expected", [
    ({}, True),  # gains 12.5 > 10 and > 2σ = 0, zero-shot drop 0 < 1
    ({"attribute": (0.6, 0.6)}, False),           # attribute gain exactly 10: not > 10
    ({"attribute": (0.5625, 0.6875)}, False),     # gain 12.5 = 2σ (pooled std 6.25)
    ({"relation": (0.6, 0.6)}, False),            # relation gain exactly 10
    ({"relation": (0.5625, 0.6875)}, False),      # relation gain 12.5 = 2σ
    ({"zeroshot": (0.79, 0.79)}, False),          # zero-shot drop 80 − 79 = 1: not < 1
    ({"zeroshot": (0.795, 0.795)}, True),         # drop 0.5 < 1
])
def test_hard_negatives_rule_needs_wide_gains_on_both_swaps_and_a_small_drop(
        monkeypatch, ctx, changed, expected):
    """Hard negatives' rule: attribute- and relation-swap gains each > 10 points and > 2σ,
    AND a zero-shot drop < 1 point; `decide`'s note names each failed condition."""
    result, _ = run_hard_negatives(monkeypatch, ctx, hn_scores(**changed))
    assert result["reproduced"] is expected
    assert (result["note"] == "") is expected


def test_hard_negatives_evaluates_every_model_on_the_test_suite_only(monkeypatch, ctx):
    """Nothing is chosen in the run: the base and every arm's fine-tune per seed are scored on
    the test suite (not the validation one), each fine-tune also on its own training scenes;
    the entry has the scripted numbers."""
    result, calls = run_hard_negatives(monkeypatch, ctx, hn_scores(attribute=(0.625, 0.75)))
    test_suite = hard_negatives.evaluation("test", ctx.quick)
    assert test_suite != hard_negatives.evaluation("validation", ctx.quick)
    assert all(suite == test_suite for _, suite, _ in calls)
    assert sorted(m for m, _, _ in calls) == sorted(
        ["base"] + [f"{a} {s}" for a in hard_negatives.ARMS for s in SEEDS])
    for model, _, fit in calls:
        if model != "base":
            seed = int(model.split()[1])
            assert fit == {**hard_negatives.finetune_data(seed, ctx.quick), "n": 500}
    assert head(result) == entry_of(hard_negatives)
    n = result["numbers"]
    assert n["hard_negatives attribute_swap"] == {"mean": 68.75, "std": 8.84,
                                                  "values": [62.5, 75.0]}
    assert n["plain attribute_swap"] == {"mean": 50.0, "std": 0.0, "values": [50.0, 50.0]}
    assert n["base zeroshot"] == {"mean": 25.0, "std": 0.0, "values": [25.0]}
    assert n["hard_negatives word_shuffle"]["values"] == [90.0, 70.0]


# --- the shared rules ----------------------------------------------------------------------

def test_finetunes_compare_is_strict_and_ties_identical_arms():
    """`compare`: above / below only beyond 2σ (exactly 2σ is a tie) and beyond 0.1 point."""
    assert finetunes.compare([53.125, 59.375], [50.0, 50.0]) == "tie"  # gap 6.25 = 2σ
    assert finetunes.compare([53.25, 59.5], [50.0, 50.0]) == "above"  # gap 6.375 > 6.25
    assert finetunes.compare([40.5, 46.75], [50.0, 50.0]) == "below"  # gap −6.375
    assert finetunes.compare([50.0625, 50.0625], [50.0, 50.0]) == "tie"  # within the 0.1 floor
    assert finetunes.compare([50.25, 50.25], [50.0, 50.0]) == "above"
