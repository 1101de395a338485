"""`cliplab merge` on saved model folders: round trips into plain transformers and
`DualEncoder.load`, architecture and origin checks, held-out scores, one-line CLI errors."""

import json

import shutil

import pytest
import torch
from transformers import AutoModel, CLIPModel, VisionTextDualEncoderModel

from cliplab.adapt.run import run_adapt
from cliplab.cli import main
from cliplab.errors import ConfigError, ModelError
from cliplab.evaluate.tasks import TaskContext
from cliplab.evaluate.suite import run_task
from cliplab.merge.run import run_merge
from cliplab.models import DualEncoder, build_model
from cliplab.models.folder import read_origin, weights_fingerprint, write_origin
from cliplab.runs import latest_checkpoint
from tests.hub_cache import hub_cache
from tests.image_folders import pets_folder
from tests.stamped import assert_stamped, now
from tests.warned import warned

TINY = dict(image_size=16, patch_size=8, width=32, layers=1, heads=2, embed_dim=16,
            context_length=32)
KEY = "vision_model.encoder.layers.0.mlp.fc1.weight"
HELDOUT = {"task": "zeroshot", "data": {"source": "digits", "split": "test"}}


def _perturbed(model: DualEncoder, seed: int, size: float = 0.05) -> DualEncoder:
    """A stand-in fine-tune: every float weight moved by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(size * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base tiny-clip and three 'fine-tunes' of it that record it as their origin."""
    root = tmp_path_factory.mktemp("family")
    build_model("tiny-clip", **TINY).save(root / "base")
    paths = []
    for seed in (1, 2, 3):
        folder = _perturbed(DualEncoder.load(root / "base"), seed).save(root / f"ft{seed}")
        record_origin(folder, root / "base")
        paths.append(folder)
    return root, root / "base", paths


def _state(path):
    return DualEncoder.load(path).model.state_dict()


def record_origin(folder, base):
    """What a fine-tune writes: ``base`` (a folder) as the origin of ``folder``."""
    return write_origin(folder, base, weights_fingerprint(_state(base)))


def test_merge_json_names_its_inputs_absolute(family, tmp_path, monkeypatch):
    """Given relative, they were recorded relative: a script reading merge.json from another
    folder found no model (eval and adapt record theirs absolute)."""
    _, base, fts = family
    monkeypatch.chdir(fts[0].parent)
    started = now()
    assert main(["merge", "--method", "task-arithmetic", "--models", fts[0].name, fts[1].name,
                 "--base", str(base), "--out", str(tmp_path / "sum"), "--no-progress"]) == 0
    record = json.loads((tmp_path / "sum" / "merge.json").read_text(encoding="utf-8"))
    assert_stamped(record, started, now())  # which cliplab merged them, and when
    assert record["models"] == [str(fts[0].resolve()), str(fts[1].resolve())]
    assert record["base"] == str(base.resolve())
    assert list(record["input_dtypes"]) == [*record["models"], record["base"]]


def test_uniform_soup_folder_round_trips_in_transformers_and_cliplab(family, tmp_path):
    _, base, fts = family
    out = tmp_path / "soup"
    assert main(["merge", "--method", "uniform", "--models", *map(str, fts), "--out", str(out),
                 "--no-progress"]) == 0
    states = [_state(p) for p in fts]
    merged = DualEncoder.load(out).model.state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(value, sum(s[key] for s in states) / 3, rtol=0, atol=1e-6)
    plain = CLIPModel.from_pretrained(out).state_dict()
    auto = AutoModel.from_pretrained(out).state_dict()
    assert all(torch.equal(plain[k], merged[k]) and torch.equal(auto[k], merged[k])
               for k in merged)
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "uniform" and record["models"] == list(map(str, fts))
    meta = json.loads((out / "cliplab.json").read_text())
    assert meta["base"]["fingerprint"] == weights_fingerprint(_state(base))
    assert meta["preprocess"]["image_size"] == 16  # the ingredients' preprocessing carried over


def test_task_arithmetic_on_a_lit_model_whose_hf_file_keys_differ(tmp_path):
    """ViT weights are renamed between HF's file layout and its modules; merging through
    the loaded model must still give base + scale * (fine-tune - base) in a loadable folder."""
    base = build_model("lit-minilm", image_size=16, patch_size=8, width=32, layers=1, heads=2)
    base.save(tmp_path / "base")
    ft = _perturbed(DualEncoder.load(tmp_path / "base"), 7).save(tmp_path / "ft")
    record_origin(ft, tmp_path / "base")
    run_merge({"method": "task-arithmetic", "models": [str(ft)], "base": str(tmp_path / "base"),
               "scale": -0.5, "out": str(tmp_path / "neg")}, progress=False)
    b, f = _state(tmp_path / "base"), _state(ft)
    neg = DualEncoder.load(tmp_path / "neg").model.state_dict()
    plain = VisionTextDualEncoderModel.from_pretrained(tmp_path / "neg").state_dict()
    for key in b:
        torch.testing.assert_close(neg[key], b[key] - 0.5 * (f[key] - b[key]), rtol=0, atol=1e-6)
        assert torch.equal(plain[key], neg[key])


def test_model_stock_and_ties_folders(family, tmp_path):
    _, base, fts = family
    rec = run_merge({"method": "model-stock", "models": list(map(str, fts)), "base": str(base),
                     "out": str(tmp_path / "ms")}, progress=False)
    # independent random deltas are nearly orthogonal: t is small, the merge stays near base
    assert 0 <= rec["model_stock"]["mean_ratio"] < 0.2
    b = _state(base)
    ms = _state(tmp_path / "ms")
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    t = rec["model_stock"]["ratios"][key]
    avg = sum(_state(p)[key] for p in fts) / 3
    torch.testing.assert_close(ms[key], t * avg + (1 - t) * b[key])
    run_merge({"method": "ties", "models": list(map(str, fts)), "base": str(base),
               "density": 0.1, "out": str(tmp_path / "ties")}, progress=False)
    ties = _state(tmp_path / "ties")
    changed = sum(int((ties[k] != b[k]).sum()) for k in b)
    total = sum(v.numel() for v in b.values())
    # each vector keeps 10% of entries; the union of three, minus sign conflicts, is < 30%
    assert 0.1 * total <= changed <= 0.3 * total


def test_greedy_soup_records_scores_that_the_saved_folder_reproduces(family, tmp_path):
    _, base, fts = family
    out = tmp_path / "greedy"
    rec = run_merge({"method": "greedy", "models": [str(base), *map(str, fts[:2])],
                     "heldout": HELDOUT, "out": str(out)}, progress=False)
    scores = rec["heldout"]["scores"]
    first = rec["greedy"]["steps"][0]["ingredient"]
    assert scores[first] == max(scores.values())  # starts from the best ingredient
    assert rec["heldout"]["merged"] >= max(scores.values())
    again = run_task(DualEncoder.load(out), HELDOUT, TaskContext(progress=False))["acc1"]
    assert again == pytest.approx(rec["heldout"]["merged"])
    assert json.loads((out / "merge.json").read_text())["greedy"]["kept"][0] == first


def test_a_metric_the_heldout_task_lacks_names_where_it_was_set(family, tmp_path, capsys):
    """It said `held-out task gives [...], not metric 'acc_1'`, naming neither the key nor
    the command line that set it."""
    _, base, fts = family
    heldout = json.dumps(HELDOUT).replace('"', "")
    assert main(["merge", "--method", "greedy", "--models", str(fts[0]), str(fts[1]),
                 "--out", str(tmp_path / "o"), f"heldout={heldout}", "metric=acc_1",
                 "--no-progress"]) == 2
    *before, said = capsys.readouterr().err.strip().splitlines()  # after warnings, if any
    assert said == ("cliplab: error: the command line: metric: the held-out task gives acc1, "
                    "acc5, mean_per_class_recall; not 'acc_1'")
    assert all(line.startswith("cliplab: warning: ") for line in before)
    assert not (tmp_path / "o").exists()
    # the task's count of images is no score to keep ingredients by
    assert main(["merge", "--method", "greedy", "--models", str(fts[0]), str(fts[1]),
                 "--out", str(tmp_path / "o"), f"heldout={heldout}", "metric=n",
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "mean_per_class_recall; not 'n' (a count of what it is over)")


def test_architecture_mismatch_names_the_file_and_key(family, tmp_path):
    _, base, fts = family
    other = build_model("tiny-clip", **{**TINY, "embed_dim": 8}).save(tmp_path / "wide")
    with pytest.raises(ModelError, match=r"wide/config.json differs .* at 'projection_dim'"):
        run_merge({"method": "uniform", "models": [str(fts[0]), str(other)],
                   "out": str(tmp_path / "o")}, progress=False)
    lit = build_model("lit-minilm", image_size=16, patch_size=8, width=32, layers=1, heads=2)
    lit.save(tmp_path / "lit")
    with pytest.raises(ModelError, match=r"lit/config.json is a 'vision-text-dual-encoder' "
                       r"model, .*/config.json a 'clip' one: not the same architecture"):
        run_merge({"method": "uniform", "models": [str(fts[0]), str(tmp_path / "lit")],
                   "out": str(tmp_path / "o")}, progress=False)
    assert not (tmp_path / "o").exists()


def test_origin_mismatch_names_the_file(family, tmp_path):
    root, base, fts = family
    stranger = build_model("tiny-clip", **{**TINY, "seed": 5}).save(tmp_path / "other-base")
    cousin = _perturbed(DualEncoder.load(stranger), 9).save(tmp_path / "cousin")
    record_origin(cousin, stranger)
    with pytest.raises(ModelError, match=r"cousin/cliplab.json: fine-tuned from .*other-base"):
        run_merge({"method": "uniform", "models": [str(fts[0]), str(cousin)],
                   "out": str(tmp_path / "o")}, progress=False)
    with pytest.raises(ModelError, match=r"cousin/cliplab.json: .* not from the base"):
        run_merge({"method": "task-arithmetic", "models": [str(cousin)], "base": str(base),
                   "out": str(tmp_path / "o")}, progress=False)
    # a model without a record is merged but listed as unverified; require_origin refuses it
    plain = _perturbed(DualEncoder.load(base), 4).save(tmp_path / "plain")
    rec = run_merge({"method": "uniform", "models": [str(fts[0]), str(plain)],
                     "out": str(tmp_path / "ok")}, progress=False)
    assert rec["origin"]["unrecorded"] == [str(plain)]
    with pytest.raises(ModelError, match="plain records no pretrained origin"):
        run_merge({"method": "uniform", "models": [str(fts[0]), str(plain)], "require_origin": True,
                   "out": str(tmp_path / "o2")}, progress=False)
    # the base itself may be a soup ingredient: its fingerprint is the common origin
    rec = run_merge({"method": "uniform", "models": [str(base), str(fts[0])],
                     "out": str(tmp_path / "ok2")}, progress=False)
    assert rec["origin"]["unrecorded"] == []


def test_config_errors_come_before_any_work(family, tmp_path):
    _, base, fts = family
    bad = [({"method": "soup", "models": ["a"], "out": "o"},
            "method: unknown merge method 'soup'; choose one of: uniform, greedy"),
           ({"method": "ties", "models": ["a"], "out": "o"}, "--base"),
           ({"method": "greedy", "models": ["a", "b"], "out": "o"}, "heldout"),
           ({"method": "greedy", "models": ["a"], "out": "o"}, "at least 2"),
           ({"method": "uniform", "models": [str(fts[0]), str(fts[1])], "out": str(fts[2])},
            "not empty"),
           ({"method": "uniform", "models": ["a"], "out": "o", "lamda": 1},
            r"unknown key lamda \(valid: base, density"),
           ({"method": "ties", "models": ["a"], "base": "p", "out": "o", "density": 1.5},
            "density: expected less than or equal to 1, got 1.5"),
           ({"method": "ties", "models": ["a"], "base": "p", "out": "o", "density": "dense"},
            "density: expected a valid number"),
           # ties keeping no entry of any task vector would be the base, silently
           ({"method": "ties", "models": ["a"], "base": "p", "out": "o", "density": 0},
            "density: expected greater than 0"),
           # DARE's drop rate is a probability below 1 (1 drops everything, then divides by 0)
           ({"method": "dare", "models": ["a"], "base": "p", "out": "o", "drop_rate": 1.0},
            "^the merge config: drop_rate: expected less than 1, got 1.0$"),
           ({"method": "dare", "models": ["a"], "base": "p", "out": "o", "drop_rate": -0.1},
            "^the merge config: drop_rate: expected greater than or equal to 0, got -0.1$"),
           # torch seeds with 64 bits: a larger seed failed after every model had loaded
           ({"method": "dare", "models": ["a"], "base": "p", "out": "o", "seed": 2 ** 64},
            "^the merge config: seed: expected less than 18446744073709551616, got "
            "18446744073709551616$"),
           ({"method": "dare", "models": ["a"], "out": "o"},
            r"^the merge config: method 'dare' needs the pretrained model: base \(or --base P\)$"),
           ({"method": "ties", "models": ["a"], "base": "p", "out": "o", "drop_rate": 0.5,
             "seed": 3}, r"^the merge config: drop_rate=0.5, seed=3 does not apply to 'ties' "),
           ({"method": "task-arithmetic", "models": ["a"], "base": "p", "out": "o", "seed": 1},
            r"seed=1 does not apply to 'task-arithmetic' \(.*seed: dare\)$"),
           ({"method": "dare", "models": ["a"], "base": "p", "out": "o", "density": 0.5},
            "density=0.5 does not apply to 'dare'"),
           ({"method": "uniform", "models": [], "out": "o"}, "models: "),
           ({"method": "uniform", "models": ["a"]}, "out is required"),
           ({"method": "ties", "models": ["a", "b"], "base": "p", "out": "o", "scale": [1, 2]},
            "list of scales"),
           # one scale per model: a list of another length is refused before loading any
           ({"method": "task-arithmetic", "models": ["a", "b"], "base": "p", "out": "o",
             "scale": [1, 2, 3]}, r"one per model \(2\), got \[1.0, 2.0, 3.0\]"),
           # keys set for another method were ignored without a word
           ({"method": "task-arithmetic", "models": ["a", "b"], "base": "p", "out": "o",
             "weights": [1, 3]}, r"weights=\[1.0, 3.0\] does not apply to 'task-arithmetic'"),
           ({"method": "uniform", "models": ["a", "b"], "out": "o", "scale": 0.5,
             "density": 0.5}, "scale=0.5, density=0.5 does not apply to 'uniform'"),
           # metric and device serve the held-out scoring alone
           ({"method": "uniform", "models": ["a", "b"], "out": "o", "metric": "acc5"},
            r"metric has no effect without heldout \(nothing is scored, and the weights "
            r"merge on the CPU\); drop it"),
           ({"method": "uniform", "models": ["a", "b"], "out": "o", "metric": "acc5",
             "device": "cpu"}, "metric and device have no effect without heldout"),
           ({"method": "uniform", "models": [str(fts[0]), str(fts[1]), str(fts[0])],
             "out": str(tmp_path / "o")}, f"--models lists {fts[0].resolve()} twice"),
           # the base among the fine-tunes: a zero task vector halved Model Stock's ratio
           ({"method": "model-stock", "models": [str(fts[0]), str(base), str(fts[1])],
             "base": str(base), "out": str(tmp_path / "o")},
            f"--models lists the base {base.resolve()} among the fine-tunes")]
    for cfg, fragment in bad:
        with pytest.raises(ConfigError, match=fragment):
            run_merge(cfg, progress=False)


def test_overwrite_replaces_a_non_empty_out_only_when_asked(family, tmp_path, capsys):
    """A non-empty --out of other files is refused, without offering --overwrite (which would
    be refused too); a previous merge's is refused naming --overwrite, with which the folder is
    replaced whole (nothing of the old one left, no .partial beside it)."""
    _, _, fts = family
    out = tmp_path / "soup"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["merge", "--method", "uniform", "--models", str(fts[0]), str(fts[1]), "--out",
            str(out), "--no-progress"]
    assert main(args) == 2
    assert capsys.readouterr().err == (f"cliplab: error: --out {out} is not empty and no previous "
                                       "merge output: it holds other files (e.g. notes.txt); "
                                       "choose a new folder\n")
    assert (out / "notes.txt").read_text() == "mine"  # untouched
    # --overwrite replaces only a previous merge output, never a folder of other files
    assert main([*args, "--overwrite"]) == 2
    assert "only a previous merge output" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"  # untouched
    (out / "notes.txt").unlink()
    assert main(args) == 0
    assert main(args) == 2  # a previous merge output: only with --overwrite
    (out / "notes.txt").write_text("mine")  # ...and a file the user added to it is theirs
    assert main([*args, "--overwrite"]) == 2
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert main([*args, "--overwrite"]) == 0
    assert (out / "merge.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]
    # a model folder that no merge wrote (a user's pretrained model) is not a merge output
    model = tmp_path / "pretrained"
    shutil.copytree(fts[2], model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    assert main([*args[:-3], "--out", str(model), "--no-progress", "--overwrite"]) == 2
    assert "only a previous merge output" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    shutil.rmtree(model)
    merged = DualEncoder.load(out).model.state_dict()
    states = [_state(p) for p in fts[:2]]
    key = next(iter(merged))
    torch.testing.assert_close(merged[key], (states[0][key] + states[1][key]) / 2,
                               rtol=0, atol=1e-6)


def test_cli_says_what_it_merged(family, tmp_path, capsys):
    _, base, fts = family
    for models, said in ((fts[:1], "1 model"), (fts[:2], "2 models")):
        out = tmp_path / str(len(models))
        assert main(["merge", "--method", "task-arithmetic", "--models", *map(str, models),
                     "--base", str(base), "--out", str(out), "--no-progress"]) == 0
        assert f"task-arithmetic merge of {said} -> {out}" in capsys.readouterr().out


def test_cli_one_line_errors(family, tmp_path, capsys):
    _, base, fts = family
    assert main(["merge", "--method", "task-arithmetic", "--models", str(fts[0]),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cliplab: error:") and "--base" in err[0]
    # without --config every setting came from the command line (it said "the config:")
    assert main(["merge", "--method", "uniform", "--models", str(fts[0]), str(fts[1])]) == 2
    assert capsys.readouterr().err.strip() == \
        "cliplab: error: say where to write the merged model: --out DIR"
    assert main(["merge", "--method", "uniform", "--models", str(fts[0]),  # no bar: stderr
                 str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--models: {tmp_path / 'missing'} does not exist" in err[0]
    assert main(["merge", "--method", "uniform", "--models", str(fts[0]),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uniform needs at least 2 fine-tuned models (one model merged " \
        "alone is a copy of it)" in err[0]
    # model-stock with one: not "a copy" (it moves toward the base), but no angle to go by
    assert main(["merge", "--method", "model-stock", "--models", str(fts[0]), "--base",
                 str(fts[1]), "--out", str(tmp_path / "o")]) == 2
    assert "model-stock needs at least 2 fine-tuned models (its ratio toward the base comes " \
        "from the angle between fine-tunes)" in capsys.readouterr().err
    # a key=value after --models is an override, not a model (it read '--models weights=...
    # does not exist')
    assert main(["merge", "--method", "uniform", "--models", str(fts[0]), str(fts[1]),
                 "weights=[1]", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights" in err[0] and "does not exist" not in err[0]


def test_an_error_while_a_progress_bar_is_shown_starts_its_own_line(family, tmp_path, capsys):
    """It was printed after the bar on its line: "load models:   0%| | 0/2 [...]cliplab: error"."""
    _, _, fts = family
    bad = tmp_path / "bad"
    shutil.copytree(fts[0], bad)
    (bad / "config.json").write_text("{}")
    assert main(["merge", "--method", "uniform", "--models", str(bad), str(fts[1]),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "load models:" in err  # the bar was shown, and then ended (here: cleared)
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("cliplab: error: ") and str(bad) in last


def test_fine_tunes_from_cliplab_adapt_merge_against_their_base(family, tmp_path):
    """Stages fit together: two `cliplab adapt --method finetune` runs (different seeds) record
    an origin that `cliplab merge --base` accepts; a different base is refused."""
    _, base, fts = family
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"adapt{seed}"
        assert main(["adapt", "--method", "finetune", "--model", str(base), "--out", str(out),
                     "--no-progress", "data.train={source: digits, split: train}",
                     "data.test={source: digits, split: test}", "shots=0", "train_size=64",
                     f"seed={seed}", "options.train.steps=2", "options.train.batch_size=32",
                     "options.train.augment=false"]) == 0
        outs.append(out / "checkpoints" / "step-2" / "model")
    assert main(["merge", "--method", "uniform", "--models", *map(str, outs), "--base",
                 str(base), "--out", str(tmp_path / "soup"), "--no-progress"]) == 0
    record = json.loads((tmp_path / "soup" / "merge.json").read_text())
    assert record["origin"]["unrecorded"] == []
    assert (tmp_path / "soup" / "head.safetensors").is_file()  # their heads, averaged
    assert read_origin(tmp_path / "soup")["fingerprint"] == weights_fingerprint(_state(base))
    assert main(["merge", "--method", "uniform", "--models", *map(str, outs), "--base",
                 str(fts[0]), "--out", str(tmp_path / "bad"), "--no-progress"]) == 2


@pytest.fixture(scope="module")
def finetune_runs(family):
    """Two `cliplab adapt --method finetune` run folders (seeds 0, 1) of the family's base."""
    root, base, _ = family
    runs = []
    for seed in (0, 1):
        run_adapt({"method": "finetune", "model": str(base), "out": str(root / f"run{seed}"),
                   "data": {"train": {"source": "digits", "split": "train"},
                            "test": {"source": "digits", "split": "test"}},
                   "shots": 0, "train_size": 64, "seed": seed,
                   "options": {"train": {"steps": 2, "batch_size": 32}}}, progress=False)
        runs.append(root / f"run{seed}")
    return runs


def test_run_and_checkpoint_folders_merge_as_their_model_folders(family, finetune_runs,
                                                                   tmp_path):
    """A run folder stands for its newest checkpoint's model folder, as everywhere else."""
    _, base, _ = family
    models = [latest_checkpoint(r) / "model" for r in finetune_runs]
    assert main(["merge", "--method", "uniform", "--models", *map(str, finetune_runs),
                 "--out", str(tmp_path / "from-runs"), "--no-progress"]) == 0
    assert main(["merge", "--method", "uniform", "--models", *map(str, models),
                 "--out", str(tmp_path / "from-models"), "--no-progress"]) == 0
    a, b = _state(tmp_path / "from-runs"), _state(tmp_path / "from-models")
    assert not torch.equal(_state(models[0])[KEY], _state(models[1])[KEY])
    assert all(torch.equal(a[k], b[k]) for k in b)
    record = json.loads((tmp_path / "from-runs" / "merge.json").read_text())
    assert record["models"] == list(map(str, models)) and record["origin"]["unrecorded"] == []
    # --base as a run folder, the models as checkpoint folders
    pre = tmp_path / "pretrain-run"
    DualEncoder.load(base).save(pre / "checkpoints" / "step-5" / "model")
    rec = run_merge({"method": "task-arithmetic", "models": [str(m.parent) for m in models],
                     "base": str(pre), "out": str(tmp_path / "ta")}, progress=False)
    assert rec["base"] == str(pre / "checkpoints" / "step-5" / "model")
    run_merge({"method": "task-arithmetic", "models": list(map(str, models)),
               "base": str(base), "out": str(tmp_path / "ta-folders")}, progress=False)
    a, b = _state(tmp_path / "ta"), _state(tmp_path / "ta-folders")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_load_ingredient_takes_run_and_checkpoint_folders_as_merge_does(finetune_runs):
    """The Python API's loader refused a run folder as "not a model folder (no config.json)"
    where `cliplab merge` takes it for its newest checkpoint's model."""
    from cliplab.merge.checkpoints import load_ingredient

    model = latest_checkpoint(finetune_runs[0]) / "model"
    for given in (finetune_runs[0], model.parent, model):
        ingredient = load_ingredient(given)
        assert ingredient.path == model
        assert all(torch.equal(ingredient.state[k], v) for k, v in _state(model).items())


def test_hub_ids_in_the_local_cache_merge_as_their_folders(family, tmp_path, monkeypatch):
    """merge reads its inputs through the one model resolver, Hub ids included."""
    _, _, fts = family
    for i, ft in enumerate(fts[:2]):
        hub_cache(tmp_path / "hub", f"org/ft{i}", ft)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_merge({"method": "uniform", "models": ["org/ft0", "org/ft1"],
               "out": str(tmp_path / "from-hub")}, progress=False)
    run_merge({"method": "uniform", "models": [str(f) for f in fts[:2]],
               "out": str(tmp_path / "from-folders")}, progress=False)
    a, b = _state(tmp_path / "from-hub"), _state(tmp_path / "from-folders")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_missing_inputs_and_presets_are_one_line_errors(family, tmp_path, capsys):
    _, base, fts = family
    missing = tmp_path / "runs" / "ft9"
    for argv, fragment in [(["--models", str(fts[0]), str(missing), "--base", str(base)],
                            f"--models: {missing} does not exist"),
                           (["--models", str(fts[0]), "--base", str(missing)],
                            f"--base: {missing} does not exist"),
                           (["--models", str(fts[0]), "--base", "tiny-clip"],
                            "merge needs model folders; tiny-clip (--base) is a preset")]:
        assert main(["merge", "--method", "task-arithmetic", *argv, "--out",
                     str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cliplab: error:") and fragment in err[0]
    assert not (tmp_path / "o").exists()


def test_an_openclip_or_onnx_export_given_to_merge_says_what_to_do_with_it(family, tmp_path,
                                                                         capsys):
    """Both were "not a model folder (no config.json)" only: README says to convert an
    OpenCLIP checkpoint first, and an ONNX export holds graphs, not weights."""
    from cliplab.models.convert.openclip_export import export_openclip
    from cliplab.models.onnx_export import export_onnx

    _, base, fts = family
    openclip = export_openclip(DualEncoder.load(fts[0]), tmp_path / "oc")
    onnx = export_onnx(DualEncoder.load(fts[1]), tmp_path / "onnx")
    for folder, fragment in [(openclip, f"an OpenCLIP checkpoint: convert it first, cliplab "
                                        f"convert --from open_clip {openclip} --out DIR"),
                             (onnx, "an ONNX export holds graphs, not weights to merge")]:
        assert main(["merge", "--method", "uniform", "--models", str(fts[2]), str(folder),
                     "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a model folder (no config.json)" in err[0], err
        assert fragment in err[0]

def test_a_lora_adapter_given_to_merge_says_what_to_give_instead(family, tmp_path, capsys):
    """An adapter folder (RUN/checkpoints/step-N/adapter) got the generic "not a model
    folder" line, though its run and checkpoint folders name the LoRA case."""
    _, _, fts = family
    adapter = tmp_path / "lora" / "checkpoints" / "step-6" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")

    def error() -> str:
        assert main(["merge", "--method", "uniform", "--models", str(fts[0]), str(adapter),
                     "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{adapter} is not a model folder (no config.json)" in err[0]
        return err[0]
    assert error().endswith("; a LoRA adapter, not a whole model: load it with "
                            "cliplab.adapt.lora.load_lora, or run adapt --method lora with "
                            "options.merge=true for a whole model folder (RUN/merged)")
    shutil.copytree(fts[1], tmp_path / "lora" / "merged")
    assert error().endswith(f"; a LoRA adapter: its run's merged model is "
                            f"{tmp_path / 'lora' / 'merged'}: give that")
    assert not (tmp_path / "o").exists()


def test_greedy_soup_tells_what_its_heldout_data_skipped(family, tmp_path, capsys):
    _, _, fts = family
    pets = pets_folder(tmp_path / "pets", per_class=2, broken_in="cat")
    heldout = {"task": "zeroshot", "data": {"source": "image-folder", "path": str(pets),
                                            "progress": False}}
    run_merge({"method": "greedy", "models": [str(f) for f in fts[:2]], "heldout": heldout,
               "out": str(tmp_path / "soup")}, progress=False)
    err = capsys.readouterr().err
    assert f"heldout: skipped 1 of 5 samples (unreadable_image=1) in {pets}" in err.splitlines()


def test_task_arithmetic_folder_is_the_base_plus_the_scaled_task_vectors(family, tmp_path):
    """base + Σ λ_i (m_i − base) from the input folders' own weights: the base is the
    reference, never one more ingredient."""
    _, base, fts = family
    out = tmp_path / "ta"
    rec = run_merge({"method": "task-arithmetic", "models": [str(fts[0]), str(fts[1])],
                     "base": str(base), "scale": [0.5, -0.3], "out": str(out)}, progress=False)
    assert rec["models"] == [str(fts[0]), str(fts[1])] and rec["base"] == str(base)
    b, m0, m1 = _state(base), _state(fts[0]), _state(fts[1])
    merged = _state(out)
    assert merged.keys() == b.keys()
    for key in b:
        if not b[key].is_floating_point():
            assert torch.equal(merged[key], b[key])
            continue
        expected = b[key] + 0.5 * (m0[key] - b[key]) - 0.3 * (m1[key] - b[key])
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)


def test_dare_folder_loads_in_transformers_and_records_its_settings(family, tmp_path, capsys):
    """`cliplab merge --method dare`: the folder is `dare_merge` of the folders' weights, opens
    with plain transformers, and merge.json records drop_rate, seed and scale; the same seed
    writes the same weights, another seed others."""
    from cliplab.merge import dare_merge

    _, base, fts = family

    def merge(out, seed):
        assert main(["merge", "--method", "dare", "--models", str(fts[0]), str(fts[1]),
                     "--base", str(base), "--out", str(out), "--no-progress", "drop_rate=0.5",
                     f"seed={seed}", "scale=[0.5, 1.5]"]) == 0
        assert f"dare merge of 2 models -> {out}" in capsys.readouterr().out
        return _state(out)

    merged = merge(tmp_path / "d", 3)
    want = dare_merge(_state(base), [_state(fts[0]), _state(fts[1])], 0.5, [0.5, 1.5], 3)
    plain = CLIPModel.from_pretrained(tmp_path / "d").state_dict()
    assert merged.keys() == want.keys()
    assert all(torch.equal(merged[k], want[k]) and torch.equal(plain[k], want[k]) for k in want)
    record = json.loads((tmp_path / "d" / "merge.json").read_text(encoding="utf-8"))
    assert (record["method"], record["drop_rate"], record["seed"], record["scale"]) == \
        ("dare", 0.5, 3, [0.5, 1.5])
    # each model keeps about half its entries: about 3/4 of the merged entries moved
    b = _state(base)
    moved = sum(int((merged[k] != b[k]).sum()) for k in b if b[k].is_floating_point())
    assert 0.7 < moved / sum(v.numel() for v in b.values() if v.is_floating_point()) < 0.8
    again, other = merge(tmp_path / "again", 3), merge(tmp_path / "other", 4)
    assert all(torch.equal(again[k], merged[k]) for k in b)
    assert not torch.equal(other[KEY], merged[KEY])


def test_folders_differing_only_in_context_length_are_refused(family, tmp_path):
    """A merged model would tokenize to one context length: folders whose cliplab.json
    disagree on it are not combined."""
    _, _, fts = family
    short = tmp_path / "short"
    shutil.copytree(fts[1], short)
    meta = json.loads((short / "cliplab.json").read_text())
    assert meta["context_length"] == 32
    (short / "cliplab.json").write_text(json.dumps({**meta, "context_length": 16}))
    with pytest.raises(ModelError, match=r"short/cliplab.json: 'context_length' differs"):
        run_merge({"method": "uniform", "models": [str(fts[0]), str(short)],
                   "out": str(tmp_path / "o")}, progress=False)
    assert not (tmp_path / "o").exists()


def test_folders_whose_tokenizers_differ_are_refused(family, tmp_path):
    """Two tokenizers of one vocabulary size giving other ids merged silently (the output kept
    the first one's, its token embeddings a mix of rows meant for different tokens); the same
    tokenizer written another way (key order, indentation, truncation) still merges."""
    _, base, fts = family
    swapped, reformatted = tmp_path / "swapped", tmp_path / "reformatted"
    for folder in (swapped, reformatted):
        shutil.copytree(fts[1], folder)
    tok = json.loads((swapped / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["e"] = vocab["e"], vocab["a"]
    (swapped / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    ids = [DualEncoder.load(f).tokenize(["a red circle"])["input_ids"][0].tolist()
           for f in (fts[0], swapped)]
    assert ids[0] != ids[1] and len(ids[0]) == len(ids[1])
    for cfg in ({"method": "uniform", "models": [str(fts[0]), str(swapped)]},
                {"method": "task-arithmetic", "models": [str(fts[0])], "base": str(swapped)}):
        with pytest.raises(ModelError) as err:
            run_merge({**cfg, "out": str(tmp_path / "o")}, progress=False)
        assert str(err.value).startswith(
            f"{swapped}/tokenizer.json: the tokenizer differs from {fts[0]}/tokenizer.json's")
        assert "\n" not in str(err.value) and not (tmp_path / "o").exists()
    tok = json.loads((reformatted / "tokenizer.json").read_text(encoding="utf-8"))
    tok["truncation"]["max_length"] = 7
    (reformatted / "tokenizer.json").write_text(
        json.dumps(dict(reversed(tok.items())), indent=4), encoding="utf-8")
    run_merge({"method": "uniform", "models": [str(fts[0]), str(reformatted)],
               "out": str(tmp_path / "ok")}, progress=False)


def test_a_tokenizer_without_a_tokenizers_backend_is_compared_by_its_files(tmp_path):
    """A sentencepiece tokenizer has no tokenizer.json content to compare: the bytes of its
    vocabulary files are, wherever the folder is."""
    from types import SimpleNamespace

    from cliplab.merge.checkpoints import tokenizer_fingerprint

    tok = SimpleNamespace(special_tokens_map={"eos_token": "</s>"})
    folders = [tmp_path / name for name in ("a", "b", "c")]
    for folder, vocab in zip(folders, (b"spm-1", b"spm-1", b"spm-2")):
        folder.mkdir()
        (folder / "spiece.model").write_bytes(vocab)
    a, b, c = (tokenizer_fingerprint(tok, folder) for folder in folders)
    assert a[0] == b[0] != c[0] and a[1] == folders[0] / "spiece.model"


def test_the_base_given_among_the_models_is_no_unrecorded_ingredient(family, tmp_path):
    """The base folder (no origin record of its own) listed as a model is the origin itself."""
    _, base, fts = family
    assert read_origin(base) is None
    rec = run_merge({"method": "task-arithmetic", "models": [str(base), str(fts[0])],
                     "base": str(base), "out": str(tmp_path / "ta")}, progress=False)
    assert rec["origin"]["unrecorded"] == []
    assert rec["origin"]["fingerprint"] == weights_fingerprint(_state(base))
    record = json.loads((tmp_path / "ta" / "merge.json").read_text())
    assert record["origin"]["unrecorded"] == []


def _with_head(folder, out, seed: int, classnames=None):
    """A copy of ``folder`` with a seeded classifier head (digits' classes by default)."""
    from cliplab.adapt.head import ClassifierHead
    from cliplab.data.sources import load_source

    names = classnames or load_source({"source": "digits", "split": "test"}).classnames
    shutil.copytree(folder, out)
    weight = torch.randn(len(names), 16, generator=torch.Generator().manual_seed(seed))
    ClassifierHead(weight, 10.0 + seed, names).save(out)
    return out


def test_a_soup_of_classifier_fine_tunes_averages_their_heads(family, tmp_path, capsys):
    """Fine-tunes of `adapt --method finetune` carry head.safetensors: a soup dropped them (and
    scored candidates with the zero-shot text head), though Model Soups averages the whole
    model. The heads are averaged with the same weights as the towers, and each candidate is
    scored with its own head, as `cliplab eval` scores a folder with its head."""
    from cliplab.adapt.head import ClassifierHead
    from cliplab.evaluate.suite import run_task
    from cliplab.evaluate.tasks import TaskContext

    _, base, fts = family
    headed = [_with_head(ft, tmp_path / f"h{i}", i) for i, ft in enumerate(fts)]
    heads = [ClassifierHead.load(h) for h in headed]
    rec = run_merge({"method": "uniform", "models": [str(h) for h in headed[:2]],
                     "weights": [1, 3], "out": str(tmp_path / "u")}, progress=False)
    assert "warning" not in capsys.readouterr().err and "head" in rec
    merged = ClassifierHead.load(tmp_path / "u")
    assert merged.classnames == heads[0].classnames
    torch.testing.assert_close(merged.weight, 0.25 * heads[0].weight + 0.75 * heads[1].weight)
    assert merged.scale.item() == pytest.approx(0.25 * 10 + 0.75 * 11)
    # the greedy soup scores every candidate with its head: an ingredient's score is what
    # evaluating its folder with its head gives
    rec = run_merge({"method": "greedy", "models": [str(h) for h in headed],
                     "heldout": HELDOUT, "out": str(tmp_path / "g")}, progress=False)
    for folder, head in zip(headed, heads):
        own = run_task(DualEncoder.load(folder), HELDOUT, TaskContext(classifier=head))["acc1"]
        assert rec["heldout"]["scores"][str(folder)] == pytest.approx(own)
        text = run_task(DualEncoder.load(folder), HELDOUT)["acc1"]
        assert own != text  # the two heads differ: the score tells which one was used
    # a base given for the origin is scored as itself: zero-shot, with no fine-tune's head
    with_base = run_merge({"method": "greedy", "models": [str(h) for h in headed[:2]],
                           "base": str(base), "heldout": HELDOUT, "out": str(tmp_path / "gb")},
                          progress=False)
    assert with_base["heldout"]["scores"][str(base)] == pytest.approx(
        run_task(DualEncoder.load(base), HELDOUT)["acc1"])
    kept = rec["greedy"]["kept"]  # the folders kept
    expected = torch.stack([ClassifierHead.load(k).weight for k in kept]).mean(0)
    torch.testing.assert_close(ClassifierHead.load(tmp_path / "g").weight, expected)
    # merge.json said "the mean of the models' heads" whatever the soup kept: it names them
    assert json.loads((tmp_path / "g" / "merge.json").read_text())["head"] == rec["head"]
    assert all(k in rec["head"] for k in kept) and "greedy soup kept" in rec["head"]
    assert not any(str(h) in rec["head"] for h in headed if str(h) not in kept)
    # a head of the same classes in another order is put in the first's order, not refused
    names = heads[1].classnames
    order = list(reversed(range(len(names))))
    ClassifierHead(heads[1].weight[order], heads[1].scale.item(),
                   [names[i] for i in order]).save(headed[1])
    run_merge({"method": "uniform", "models": [str(h) for h in headed[:2]],
               "out": str(tmp_path / "r")}, progress=False)
    assert "warning" not in capsys.readouterr().err
    reordered = ClassifierHead.load(tmp_path / "r")
    assert reordered.classnames == heads[0].classnames
    torch.testing.assert_close(reordered.weight, 0.5 * heads[0].weight + 0.5 * heads[1].weight)
    # --overwrite replaces a merge output holding a head
    run_merge({"method": "uniform", "models": [str(h) for h in headed[:2]],
               "out": str(tmp_path / "u")}, progress=False, overwrite=True)


def test_merge_json_names_the_heads_a_greedy_soup_kept():
    from cliplab.merge.run import head_note

    assert head_note({"method": "uniform"}) == \
        "the mean of the models' head.safetensors (the same weights as the towers)"
    assert head_note({"greedy": {"kept": ["ft/a"]}}) == \
        "the head.safetensors of ft/a, the one model the greedy soup kept"
    assert head_note({"greedy": {"kept": ["ft/a", "ft/b"]}}) == \
        "the mean of the head.safetensors of the 2 models the greedy soup kept (ft/a, ft/b)"


@pytest.mark.parametrize("case, why", [
    ("some", "only 1 of the 2 models carry one"),
    ("classes", "they are heads of different classes"),
    ("stock", "model-stock combines task vectors of the towers only")])
def test_heads_a_merge_cannot_average_are_warned_of(family, tmp_path, recwarn, case, why):
    _, base, fts = family
    first = _with_head(fts[0], tmp_path / "h0", 0)
    second = {"some": lambda: fts[1], "stock": lambda: _with_head(fts[1], tmp_path / "h1", 1),
              "classes": lambda: _with_head(fts[1], tmp_path / "h1", 1,
                                            [f"c{i}" for i in range(10)])}[case]()
    cfg = {"method": "model-stock" if case == "stock" else "uniform",
           "models": [str(first), str(second)], "out": str(tmp_path / "o")}
    if case == "stock":
        cfg["base"] = str(base)
    run_merge(cfg, progress=False)
    assert warned(recwarn).strip() == (
        f"merge: models carry a classifier head (head.safetensors, e.g. {first}) that "
        f"is not merged ({why}): the merged folder has none, and held-out scores use the "
        "zero-shot text head")
    assert not (tmp_path / "o" / "head.safetensors").exists()


@pytest.mark.parametrize("method", ["uniform", "ties"])
def test_a_model_with_nan_weights_is_refused_by_name(method, family, tmp_path):
    """Averaged in, the NaN spread over its tensor and the merge was saved; TIES zeroed the NaN
    entries (no NaN passes `abs() >= threshold`) while counting them among the largest: a
    broken input hidden, not said."""
    _, base, fts = family
    broken = DualEncoder.load(fts[1])
    with torch.no_grad():
        dict(broken.model.named_parameters())[KEY][0, :5] = float("nan")
    broken.save(tmp_path / "broken")
    record_origin(tmp_path / "broken", base)
    with pytest.raises(ModelError, match=rf"broken: 5 weights are NaN or infinite \(5 of them in "
                                         rf"'{KEY}'\): a broken model"):
        run_merge({"method": method, "models": [str(fts[0]), str(tmp_path / "broken")],
                   "base": str(base), "out": str(tmp_path / "o")}, progress=False)
    assert not (tmp_path / "o").exists()


def test_a_merge_that_overflows_its_dtype_writes_nothing(family, tmp_path):
    """float16 folders merged with a scale of 1e6: the float32 sum cast to float16 was saved
    with infinite weights."""
    _, base, fts = family
    for name, folder in (("base16", base), ("ft16", fts[0])):
        model = DualEncoder.load(folder)
        model.model.half()
        model.save(tmp_path / name)
    record_origin(tmp_path / "ft16", tmp_path / "base16")
    with pytest.raises(ModelError, match=r"^the merged weights hold \d+ NaN or infinite values in "
                                         r"torch.float16 .*nothing was written: a scale too "
                                         r"large"):
        run_merge({"method": "task-arithmetic", "models": [str(tmp_path / "ft16")],
                   "base": str(tmp_path / "base16"), "scale": 1e6,
                   "out": str(tmp_path / "o")}, progress=False)
    assert not (tmp_path / "o").exists()
