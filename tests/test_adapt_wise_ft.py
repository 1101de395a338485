"""WiSE-FT: elementwise interpolation on hand-built state dicts, endpoints of the sweep equal
the zero-shot and fine-tuned models, best-α choice, origin check, the `run` entry point."""

import copy
import json
from pathlib import Path

import pytest
import torch

from cliplab.adapt.common import head_metrics, subsample
from cliplab.adapt.finetune import load_finetuned, save_finetuned
from cliplab.adapt.head import zeroshot_classifier_head
from cliplab.adapt.run import format_results, run_adapt
from cliplab.cli import main
from cliplab.runs import latest_checkpoint
from cliplab.models.folder import model_fingerprint
from cliplab.adapt.base import method_options
from cliplab.adapt.wise_ft import Options, best_alpha, interpolate, wise_ft_sweep
from cliplab.data.digits import load_digits
from cliplab.errors import ConfigError, InputError, ModelError
from tests.tiny_models import small_model
from tests.warned import warned



def test_interpolation_is_elementwise_on_a_hand_built_state_dict():
    zs = {"w": torch.tensor([[0.0, 2.0], [4.0, -1.0]]), "b": torch.tensor([1.0]),
          "ids": torch.tensor([0, 1, 2]), "half": torch.tensor([2.0], dtype=torch.float16)}
    ft = {"w": torch.tensor([[4.0, -2.0], [0.0, 3.0]]), "b": torch.tensor([-3.0]),
          "ids": torch.tensor([0, 1, 2]), "half": torch.tensor([6.0], dtype=torch.float16)}
    out = interpolate(zs, ft, 0.25)  # 0.75 * zs + 0.25 * ft
    assert torch.equal(out["w"], torch.tensor([[1.0, 1.0], [3.0, 0.0]]))
    assert torch.equal(out["b"], torch.tensor([0.0]))
    assert torch.equal(out["ids"], zs["ids"])
    assert out["half"].dtype == torch.float16 and out["half"].item() == 3.0
    for alpha, ref in ((0.0, zs), (1.0, ft)):
        end = interpolate(zs, ft, alpha)
        assert all(torch.equal(end[k], ref[k]) for k in zs)


@pytest.mark.parametrize("change,match", [
    (lambda d: d.pop("b"), "different weights"),
    (lambda d: d.__setitem__("w", torch.zeros(3, 2)), "shapes"),
    (lambda d: d.__setitem__("ids", torch.tensor([2, 1, 0])), "non-float")])
def test_mismatched_models_are_refused(change, match):
    zs = {"w": torch.zeros(2, 2), "b": torch.zeros(1), "ids": torch.tensor([0, 1, 2])}
    ft = copy.deepcopy(zs)
    change(ft)
    with pytest.raises(ModelError, match=match):
        interpolate(zs, ft, 0.5)


def test_sweep_endpoints_equal_the_two_models_and_midpoints_interpolate():
    data = subsample(load_digits("test"), 200, seed=0)
    shifted = copy.deepcopy(data)
    shifted.images = 255 - shifted.images
    zs = small_model()
    ft = copy.deepcopy(zs)
    with torch.no_grad():  # a stand-in for fine-tuning: move every image-side weight
        for name, p in ft.model.named_parameters():
            if name.startswith(("vision_model.", "visual_projection.")):
                p.add_(0.3 * torch.randn_like(p))
    zs_head = zeroshot_classifier_head(zs, data).weight.detach()
    ft_head = zs_head + 0.5 * torch.randn_like(zs_head)
    sets = {"test": data, "shifted": shifted}
    rows = wise_ft_sweep(zs, zs_head, ft, ft_head, sets, [0.0, 0.5, 1.0], progress=False)
    with pytest.raises(InputError, match=r"^wise_ft_sweep: sets must be a dict of named"):
        wise_ft_sweep(zs, zs_head, ft, ft_head, [data], [0.0], progress=False)
    for row, (model, head) in ((rows[0], (zs, zs_head)), (rows[2], (ft, ft_head))):
        for name, d in sets.items():
            assert row[name] == head_metrics(model, head, d, progress=False)
    mid = copy.deepcopy(zs)
    with torch.no_grad():
        for (name, p), q, r in zip(mid.model.named_parameters(), zs.model.parameters(),
                                   ft.model.parameters()):
            p.copy_(0.5 * q + 0.5 * r)
    assert rows[1]["test"] == head_metrics(mid, 0.5 * zs_head + 0.5 * ft_head, data,
                                             progress=False)
    assert rows[0]["test"] != rows[2]["test"]  # the two ends really differ


def test_best_alpha_maximises_the_chosen_score():
    rows = [{"alpha": a, "test": {"acc1": t}, "shifted": {"acc1": s}}
            for a, t, s in ((0.0, 0.5, 0.6), (0.5, 0.8, 0.58), (1.0, 0.9, 0.3))]
    assert best_alpha(rows, "mean")["alpha"] == 0.5      # (0.8 + 0.58) / 2 = 0.69
    assert best_alpha(rows, "test")["alpha"] == 1.0
    assert best_alpha(rows, "shifted")["alpha"] == 0.0
    tied = [{"alpha": a, "test": {"acc1": 0.7}} for a in (0.7, 0.3, 1.0)]
    assert best_alpha(tied, "test")["alpha"] == 0.3  # ties: the smaller α, in any order


CFG = {"method": "wise-ft",
       "data": {"train": {"source": "digits", "split": "train"},
                "test": {"source": "digits", "split": "test"},
                "shifted": {"source": "digits", "split": "test", "shift": "invert"}},
       "shots": 0, "train_size": 128, "seed": 0,
       "options": {"alphas": [0, 0.5, 1], "save_best": True,
                   "train": {"steps": 4, "batch_size": 32, "lr": 3e-3}}}


def run(base, cfg, out, progress=False):
    return run_adapt({**cfg, "model": base, "out": str(out)}, progress=progress)


def test_run_sweeps_and_saves_the_best_model(tmp_path):
    small_model().save(tmp_path / "base")
    res = run(str(tmp_path / "base"), CFG, tmp_path / "out", progress=False)
    assert [r["alpha"] for r in res["sweep"]] == [0.0, 0.5, 1.0]
    assert res["best_alpha"] in (0.0, 0.5, 1.0) and set(res["sweep"][0]) == {
        "alpha", "test", "shifted"}
    best = res["sweep"][[r["alpha"] for r in res["sweep"]].index(res["best_alpha"])]
    assert res["test"] == best["test"] and res["shifted"] == best["shifted"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["best_alpha"] == \
        res["best_alpha"]
    # a second sweep over the saved fine-tune reproduces the numbers without training
    again = run(str(tmp_path / "base"), {**CFG, "options": {"alphas": [0, 0.5, 1],
                                                            "finetuned": res["finetuned"]}},
                tmp_path / "again", progress=False)
    assert again["sweep"] == res["sweep"]
    # it trained nothing: no shots or training images of its own are recorded
    assert (again["shots"], again["train_size"]) == (None, None)
    assert json.loads((tmp_path / "again" / "results.json").read_text())["train_size"] is None
    assert res["train_size"] == 128 and res["shots"] == 0
    assert "train_settings" not in again
    assert res["train_settings"]["steps"] == 4 and res["train_settings"]["lr"] == 3e-3
    assert (tmp_path / "out" / "best" / "head.safetensors").is_file()
    # this run's folder holds two models (best/ and the fine-tune): as options.finetuned it is
    # refused, naming both, where it gave the fine-tuned end without a word
    with pytest.raises(ConfigError, match=(
            rf"options.finetuned: {tmp_path / 'out'} is a WiSE-FT run folder, which holds two "
            rf"models: give {tmp_path / 'out' / 'best'} \(the model at α=.*\) or "
            rf"{res['finetuned']} \(the fine-tuned end, α=1\)")):
        run(str(tmp_path / "base"), {**CFG, "options": {"finetuned": str(tmp_path / "out")}},
            tmp_path / "refused")
    # the printed summary says which fine-tune was swept, and that this run trained nothing
    assert format_results(res).splitlines()[0] == (
        f"{res['train_size']} training images (all per class, seed 0), 540 test images")
    assert format_results(again).splitlines()[0] == (
        f"the fine-tuned model {res['finetuned']} (options.finetuned; nothing trained here), "
        "540 test images")
    # training settings beside a given fine-tune were ignored, yet recorded as used
    for extra, keys in (({"train": {"epochs": 50}}, "train has"),
                        ({"train": {"lr": 1}, "train_head": False}, "train_head and train have")):
        with pytest.raises(ConfigError, match=f"options: {keys} no effect with finetuned: "
                           f"{res['finetuned']} \\(nothing is trained here\\); drop"):
            run(str(tmp_path / "base"), {**CFG, "options": {"finetuned": res["finetuned"],
                                                            **extra}},
                tmp_path / "ignored", progress=False)
    assert not (tmp_path / "ignored").exists()
    # their defaults pass: the config.yaml a run writes holds every key, and loads again
    method_options(Options, {"finetuned": res["finetuned"], "train": {}, "train_head": True},
                   "wise-ft")


def test_the_saved_best_model_is_the_interpolation_at_the_chosen_alpha(tmp_path):
    base = small_model()
    base.save(tmp_path / "base")
    # no α of 0.5, where swapping α and 1 - α would go unseen
    cfg = {**CFG, "options": {**CFG["options"], "alphas": [0, 0.3, 1]}}
    res = run(str(tmp_path / "base"), cfg, tmp_path / "out")
    alpha = res["best_alpha"]
    best, best_head = load_finetuned(tmp_path / "out" / "best")
    ft, ft_head = load_finetuned(res["finetuned"])
    zs_head = zeroshot_classifier_head(base, load_digits("train")).weight
    torch.testing.assert_close(best_head.weight, torch.lerp(zs_head, ft_head.weight, alpha))
    want = interpolate(base.model.state_dict(), ft.model.state_dict(), alpha)
    for name, tensor in best.model.state_dict().items():
        torch.testing.assert_close(tensor, want[name], msg=name)


def test_alpha_is_chosen_on_the_validation_split_not_on_the_reported_sets(tmp_path,
                                                                         monkeypatch, recwarn):
    import cliplab.adapt.wise_ft as wise_ft

    real_sweep = wise_ft.wise_ft_sweep
    seen = []

    def sweep(zs, zs_head, ft, ft_head, sets, alphas, progress=True):
        rows = real_sweep(zs, zs_head, ft, ft_head, sets, alphas, progress)
        on_validation = len(sets["test"]) == 50  # val_shots=5 x 10 digits
        seen.append((on_validation, sorted(sets)))
        for row in rows:  # validation favours α = 0, the reported sets α = 1
            for name in sets:
                row[name]["acc1"] = 1 - row["alpha"] if on_validation else row["alpha"]
        return rows

    monkeypatch.setattr(wise_ft, "wise_ft_sweep", sweep)
    small_model().save(tmp_path / "base")
    cfg = {**CFG, "val_shots": 5, "options": {**CFG["options"], "val_shift": "invert"}}
    res = run(str(tmp_path / "base"), cfg, tmp_path / "out")
    assert "may have trained on" not in warned(recwarn)  # it trained on the rest
    assert seen == [(False, ["shifted", "test"]), (True, ["shifted", "test"])]
    assert res["best_alpha"] == 0.0 and res["selected_on"] == "validation + invert"
    assert res["test"] == res["sweep"][0]["test"] and res["test"]["acc1"] == 0.0
    assert [r["alpha"] for r in res["validation_sweep"]] == [0.0, 0.5, 1.0]
    # without a validation split the reported sets choose, and the result says so
    monkeypatch.setattr(wise_ft, "wise_ft_sweep", sweep)
    plain = run(str(tmp_path / "base"), {**CFG, "options": {"alphas": [0, 0.5, 1],
                                                            "finetuned": res["finetuned"]}},
                tmp_path / "plain")
    assert plain["best_alpha"] == 1.0 and plain["selected_on"].startswith("the reported sets")
    assert "selected_by" not in plain
    # the printed summary says where α was chosen, and that an oracle's numbers are optimistic
    assert format_results(res).splitlines()[-1] == "  best alpha 0, chosen on validation + invert"
    assert format_results(plain).splitlines()[-1] == (
        "  best alpha 1, chosen on the reported sets (val_shots=0), so its numbers are "
        "optimistic")
    # select=shifted with a validation split but no shifted copy of it: said, not silent
    warned(recwarn)
    shiftless = run(str(tmp_path / "base"), {**cfg, "options": {
        "alphas": [0, 0.5, 1], "finetuned": res["finetuned"], "select": "shifted"}},
        tmp_path / "shiftless")
    assert shiftless["selected_by"] == "test (select=shifted, but no shifted set to choose on)"
    err = warned(recwarn)
    assert ("wise-ft: select=shifted, but there is no shifted set to choose α on "
            "(options.val_shift makes one of the validation split); test accuracy chose it"
            ) in err
    # a validation split drawn from data.train, beside a fine-tune that may have trained on it
    assert ("adapt: the validation split (val_shots) is drawn from data.train, which the "
            "given fine-tune (options.finetuned) may have trained on") in err
    # data.val given as data.test's spec was recorded as "validation": now an oracle's choice
    warned(recwarn)
    oracle = run(str(tmp_path / "base"), {
        **CFG, "val_shots": 0, "data": {**CFG["data"], "val": {"source": "digits",
                                                               "split": "test"}},
        "options": {"alphas": [0, 0.5, 1], "finetuned": res["finetuned"]}}, tmp_path / "oracle")
    assert oracle["selected_on"] == ("validation, which is data.test (the reported set, so its "
                                     "numbers are optimistic)")
    assert format_results(oracle).splitlines()[-1].endswith(
        "chosen on validation, which is data.test (the reported set, so its numbers are "
        "optimistic)")
    assert warned(recwarn) == (
        "adapt: data.val is data.test, so what is chosen on validation is chosen on the "
        "reported test set and its numbers are optimistic; give data.val other images\n")
    with pytest.raises(ConfigError, match="unknown shift 'fog'"):
        run(str(tmp_path / "base"), {**cfg, "options": {"val_shift": "fog"}}, tmp_path / "o")
    # val_shift without a validation split shifted nothing, silently
    with pytest.raises(ConfigError, match=r"^options.val_shift shifts a copy of the validation "
                       r"split, but there is none: set val_shots \(or data.val\)"):
        run(str(tmp_path / "base"), {**CFG, "options": {
            "alphas": [0, 1], "finetuned": res["finetuned"], "val_shift": "invert"}},
            tmp_path / "o")


def test_run_refuses_a_finetune_of_another_base(tmp_path):
    other = small_model(seed=3)
    data = load_digits("test")
    folder = save_finetuned(other, zeroshot_classifier_head(other, data), tmp_path / "ft",
                            "elsewhere", model_fingerprint(other))
    small_model().save(tmp_path / "base")
    with pytest.raises(ModelError, match="adapted from elsewhere"):
        run(str(tmp_path / "base"), {**CFG, "options": {"finetuned": str(folder)}},
            tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match=r"options\.alphas\.1: expected less than or equal "
                                          r"to 1, got 2"):
        run(str(tmp_path / "base"), {**CFG, "options": {"alphas": [0, 2]}}, tmp_path / "o2",
            progress=False)
    with pytest.raises(ConfigError, match="renamed key 'wise_ft': use 'options'"):
        run(str(tmp_path / "base"), {**CFG, "wise_ft": {}}, tmp_path / "o3", progress=False)


def test_finetuned_may_be_a_finetune_run_folder(tmp_path, capsys):
    """``options.finetuned`` takes `--method finetune`'s run folder (its newest checkpoint), a
    checkpoint folder or the model folder, with the same result; a missing path is one line."""
    small_model().save(tmp_path / "base")
    ft = run_adapt({"method": "finetune", "model": str(tmp_path / "base"),
                    "out": str(tmp_path / "ft"), "data": CFG["data"], "shots": 0,
                    "train_size": 64, "options": {"train": {"steps": 2, "batch_size": 32}}},
                   progress=False)
    model_dir = ft["model_dir"]
    assert model_dir == str(latest_checkpoint(tmp_path / "ft") / "model")
    results = [run(str(tmp_path / "base"), {**CFG, "options": {"alphas": [0, 0.5, 1],
                                                               "finetuned": str(given)}},
                   tmp_path / f"w{i}")
               for i, given in enumerate([tmp_path / "ft", Path(model_dir).parent, model_dir])]
    assert all(r["finetuned"] == model_dir for r in results)
    assert results[0]["sweep"] == results[1]["sweep"] == results[2]["sweep"]
    missing = tmp_path / "runs" / "ft9"
    assert main(["adapt", "--method", "wise-ft", "--model", str(tmp_path / "base"),
                 "--out", str(tmp_path / "o"), "--no-progress",
                 "data.train={source: digits, split: train}",
                 "data.test={source: digits, split: test}", f"options.finetuned={missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"options.finetuned: {missing} does not exist" in err[0]
    assert not (tmp_path / "o").exists()
    # the fine-tune is an input: --out inside its run folder is refused before any work
    before = sorted(p.relative_to(tmp_path / "ft") for p in (tmp_path / "ft").rglob("*"))
    inside = tmp_path / "ft" / "wise"
    assert main(["adapt", "--method", "wise-ft", "--model", str(tmp_path / "base"),
                 "--out", str(inside), "--no-progress",
                 "data.train={source: digits, split: train}",
                 "data.test={source: digits, split: test}",
                 f"options.finetuned={tmp_path / 'ft'}"]) == 2
    assert capsys.readouterr().err.strip() == (f"cliplab: error: --out {inside} lies inside the "
                                               f"input {tmp_path / 'ft'}; choose another folder")
    assert sorted(p.relative_to(tmp_path / "ft") for p in (tmp_path / "ft").rglob("*")) == before


def test_at_interpolates_anew_when_asked_for_another_alpha():
    """Guards `WiseFT.at` serving the model of the first α it built for every later α: at(0)
    then at(1) must give the zero-shot weights and head, then the fine-tuned ones."""
    from cliplab.adapt.head import ClassifierHead
    from cliplab.adapt.wise_ft import WiseFT

    zs, ft = small_model(seed=0), small_model(seed=1)
    zs_head = ClassifierHead(torch.zeros(2, 16), 1.0, ["a", "b"])
    ft_head = ClassifierHead(torch.ones(2, 16), 1.0, ["a", "b"])
    w = WiseFT(zs, ["a", "b"], {}, zs_head, ft, ft_head, None, "base", "fingerprint")
    for alpha, model, head in ((0.0, zs, zs_head), (1.0, ft, ft_head), (0.0, zs, zs_head)):
        got = w.at(alpha)
        assert got.options["alpha"] == alpha
        want = model.model.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in got.model.model.state_dict().items())
        assert torch.equal(got.head.weight, head.weight)
