"""The one config mechanism: schemas name the file, the key path and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
import torch

from cliplab.config import Section, apply_overrides, load_config, load_yaml, validate
from cliplab.errors import ConfigError
from cliplab.models.spec import ModelField, ModelSpec


class Train(Section):
    batch_size: int = 8
    lr: float = 1e-3
    precision: Literal["fp32", "bf16"] = "fp32"


class Recipe(Section):
    renamed = {"steps": "train.steps"}
    model: ModelField
    train: Train = Train()


def error_of(data, where="x.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        validate(Recipe, data, where)
    return str(info.value)


def test_wrong_type_is_named_even_when_other_keys_are_missing():
    # the old mechanism reported the missing section first and never named batch_size
    message = error_of({"train": {"batch_size": "many"}})
    assert message.startswith("x.yaml: ")
    assert "train.batch_size: expected a valid integer" in message and "'many'" in message
    assert "model is required" in message
    assert "\n" not in message


def test_unknown_key_lists_the_valid_ones():
    assert error_of({"model": "tiny-clip", "train": {"bacth_size": 4}}) == (
        "x.yaml: unknown key train.bacth_size (valid: batch_size, lr, precision)")


def test_renamed_keys_name_the_new_one():
    assert "renamed key 'steps': use 'train.steps'" in error_of({"model": "m", "steps": 3})
    assert "renamed key 'preset': use 'name'" in error_of({"model": {"preset": "tiny-clip"}})


def test_literal_choices_are_named():
    message = error_of({"model": "m", "train": {"precision": "fp8"}})
    assert "train.precision: expected 'fp32' or 'bf16', got 'fp8'" in message


def test_numbers_written_as_strings_are_numbers():
    # PyYAML reads 2e-3 (no dot) as a string; the schema is the one place that parses it
    cfg = validate(Recipe, {"model": "m", "train": {"lr": "2e-3", "batch_size": "16"}})
    assert cfg.train.lr == 0.002 and cfg.train.batch_size == 16


def test_model_spec_is_a_string_or_a_mapping():
    assert validate(Recipe, {"model": "runs/x"}).model == ModelSpec(name="runs/x")
    spec = validate(Recipe, {"model": {"name": "tiny-clip", "options": {"width": 32}}}).model
    assert spec.name == "tiny-clip" and spec.options == {"width": 32}


def test_load_config_layers_defaults_file_extra_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: from-file\ntrain: {batch_size: 4, lr: 0.1}\n")
    cfg = load_config(Recipe, path, ["train.lr=0.5"],
                      defaults={"train": {"precision": "bf16", "batch_size": 2}},
                      extra={"model": "from-flag", "train": None})
    assert (cfg.model.name, cfg.train.batch_size, cfg.train.lr, cfg.train.precision) == (
        "from-flag", 4, 0.5, "bf16")  # the file's batch size over the default's
    with pytest.raises(ConfigError, match=f"^{path} \\+ command line: unknown key oops"):
        load_config(Recipe, path, ["oops=1"])
    with pytest.raises(ConfigError, match="^the command line: .*unknown key oops"):
        load_config(Recipe, None, ["oops=1"])
    path.write_text("model: m\noops: 1\n")
    with pytest.raises(ConfigError, match=f"^{path}: unknown key oops"):
        load_config(Recipe, path)


def test_an_option_and_an_override_of_one_key_must_agree(tmp_path):
    """`--out a out=b` silently wrote to b (overrides come last): a key given twice on one
    command line is refused, naming both; given twice alike it is one setting."""
    class Staged(Recipe):
        out: str | None = None

    with pytest.raises(ConfigError, match="^the command line: out is given twice, as --out "
                       "runs/a and as out=runs/b; give one$"):
        load_config(Recipe, None, ["out=runs/b"], extra={"model": "m", "out": "runs/a"})
    assert load_config(Staged, None, ["out=runs/a"], extra={"model": "m", "out": "runs/a"}
                       ).out == "runs/a"
    with pytest.raises(ConfigError, match="given twice, as --data-dir d1 and as "
                       "train.data_dir=d2"):
        load_config(Recipe, None, ["train.data_dir=d2"], extra={"train": {"data_dir": "d1"}})
    # an option standing for a whole section is named by it: --data, not --path
    with pytest.raises(ConfigError, match="data.path is given twice, as --data a.csv and as "
                       "data.path=b.csv"):
        load_config(Recipe, None, ["data.path=b.csv"],
                    replace={"data": {"source": "manifest", "path": "a.csv"}})
    # an unset option, or an override of a key the option does not set, is no conflict
    cfg = load_config(Staged, None, ["train.lr=0.5", "out=o"], extra={"model": "m", "out": None})
    assert (cfg.train.lr, cfg.out) == (0.5, "o")


def test_two_overrides_of_one_key_must_agree():
    """`data.n=4 data.n=8` silently took 8; two overrides of one key with two values are
    refused, naming both (a list item by index too); the same value twice is one setting."""
    with pytest.raises(ConfigError, match=r"^the command line: train.lr is given twice, as "
                       r"train.lr=0.5 and as train.lr=0.25; give one$"):
        load_config(Recipe, None, ["model=m", "train.lr=0.5", "train.lr=0.25"])
    assert load_config(Recipe, None, ["model=m", "train.lr=0.5", "train.lr=0.5"]).train.lr == 0.5
    with pytest.raises(ConfigError, match=r"tasks.0.name is given twice, as tasks.0.name=a and "
                       r"as tasks.0.name=b"):
        load_config(Recipe, None, ["model=m", "tasks.0.name=a", "tasks.0.name=b"])


@pytest.mark.parametrize("text, line, key", [
    ("model: m\ntrain:\n  lr: 0.5\n  lr: 0.25\n", 4, "lr"),
    ("model: m\ntrain: {lr: 0.5}\nmodel: n\n", 3, "model")])
def test_a_key_twice_in_one_yaml_mapping_is_refused(tmp_path, text, line, key):
    """YAML's loaders keep the last of two equal keys silently (a second `train:` section
    dropped the first's settings): the file and both lines are named."""
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}:line {line}: invalid YAML \(key {key!r} "
                       rf"given twice in one mapping \(lines {line - 2 if key == 'model' else 3} "
                       rf"and {line}\); the second would replace the first\)$"):
        load_config(Recipe, path)


def test_a_config_that_is_a_folder_or_binary_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match=f"^config file {tmp_path} is a folder; give a YAML "
                       "file$"):
        load_config(Recipe, tmp_path)
    image = tmp_path / "photo.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    with pytest.raises(ConfigError, match=f"^{image}: not a text file, so not a YAML config$"):
        load_config(Recipe, image)


def test_the_command_line_is_named_only_when_it_set_a_key_at_fault(tmp_path):
    """With a typo in the file, `--out` or an override of another key named the error
    `FILE + command line`: it is the file's alone; an override at (or inside, or holding)
    the wrong key is named with it."""
    path = tmp_path / "r.yaml"
    path.write_text("model: m\ntrain: {lr: fast}\n")
    for overrides, extra in ((["train.batch_size=8"], {"model": "other"}), ([], {"out": None})):
        with pytest.raises(ConfigError, match=f"^{path}: train.lr: expected a valid number"):
            load_config(Recipe, path, overrides, extra=extra)
    for overrides in (["train.lr=slow"], ["train={lr: slow}"]):
        with pytest.raises(ConfigError, match=f"^{path} \\+ command line: train.lr: "):
            load_config(Recipe, path, overrides)
    with pytest.raises(ConfigError, match=f"^{path} \\+ command line: model: "):
        load_config(Recipe, path, extra={"model": 3})


def test_a_whole_section_check_is_named_by_the_key_its_message_starts_with(tmp_path):
    from cliplab.curate.config import CurateConfig

    path = tmp_path / "c.yaml"
    path.write_text("data: {source: shapes, n: 10}\nsteps:\n  - {step: exact_dedup}\n"
                    "  - {step: clip_score, model: m, keep_topp: 0.3}\n")
    with pytest.raises(ConfigError, match=f"^{path}: steps\\[1\\]: unknown key"):
        load_config(CurateConfig, path, ["steps.0.match=image"], extra={"out": "o"})
    with pytest.raises(ConfigError, match=f"^{path} \\+ command line: steps\\[1\\]: unknown"):
        load_config(CurateConfig, path, ["steps.1.keep_topp=0.4"])


def test_bad_yaml_and_bad_overrides_are_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:line \d+: invalid YAML"):
        load_config(Recipe, path)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="'model' is a value, not a section"):
        apply_overrides({"model": "m"}, ["model.name=x"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Recipe, tmp_path / "missing.yaml")


def test_overrides_index_lists_and_leave_the_original_alone():
    config = {"steps": [{"step": "basic", "min_words": 2}, {"step": "dfn", "keep_top": 0.3}]}
    out = apply_overrides(config, ["steps.1.keep_top=0.5", "steps.0=exact_dedup"])
    assert out["steps"] == ["exact_dedup", {"step": "dfn", "keep_top": 0.5}]
    assert config["steps"][1]["keep_top"] == 0.3  # the caller's config is not modified
    with pytest.raises(ConfigError, match=r"index 2 is outside the list's 2 items"):
        apply_overrides(config, ["steps.2.keep_top=0.5"])
    with pytest.raises(ConfigError, match=r"'first' indexes a list, so it must be a number"):
        apply_overrides(config, ["steps.first.keep_top=0.5"])
    with pytest.raises(ConfigError, match=r"'min_words' is a value, not a section"):
        apply_overrides(config, ["steps.0.min_words.x=1"])


def test_a_length_in_both_epochs_and_steps_is_refused():
    # e.g. a steps override on a config written in epochs: one of the two would silently lose
    from cliplab.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"run\.yaml: train: give the length as epochs or as "
                                          r"steps, not both \(epochs: 2, steps: 10\); set the "
                                          r"other to null"):
        TrainConfig.from_dict({"epochs": 2, "steps": 10}, "run.yaml")
    assert TrainConfig.from_dict({"epochs": 2, "steps": None}).epochs == 2
    assert TrainConfig.from_dict({"epochs": None, "steps": 10}).steps == 10
    assert TrainConfig.from_dict({}).epochs is None and TrainConfig.from_dict({}).steps is None


def test_a_length_given_replaces_the_default_length():
    from cliplab.train.config import train_over_defaults

    defaults = {"epochs": 2, "lr": 1e-3, "augment": {"hflip": False}}
    assert train_over_defaults(defaults, {"steps": 4}) == {"lr": 1e-3, "steps": 4,
                                                           "augment": {"hflip": False}}
    assert train_over_defaults(defaults, {"lr": 0.1}) == {"epochs": 2, "lr": 0.1,
                                                          "augment": {"hflip": False}}
    assert train_over_defaults({"steps": 9}, {"epochs": 1})["epochs"] == 1
    assert "steps" not in train_over_defaults({"steps": 9}, {"epochs": 1})


def test_a_length_override_replaces_the_files_other_length(tmp_path):
    """A recipe written in epochs takes `train.steps=N` (and one in steps `train.epochs=N`)
    without `train.epochs=null` beside it; lengths inside a list (a curate step's `train`) too.
    Both overridden is still the user's contradiction, refused by the schema."""
    config = {"train": {"epochs": 5, "lr": 0.1}, "steps": [{"train": {"steps": 9}}]}
    assert apply_overrides(config, ["train.steps=500"])["train"] == \
        {"epochs": None, "steps": 500, "lr": 0.1}
    assert apply_overrides(config, ["steps.0.train.epochs=1"])["steps"][0]["train"] == \
        {"steps": None, "epochs": 1}
    both = apply_overrides(config, ["train.steps=500", "train.epochs=2"])["train"]
    assert both == {"epochs": 2, "steps": 500, "lr": 0.1}
    assert apply_overrides(config, ["train.steps=null"])["train"]["epochs"] == 5
    assert config["train"] == {"epochs": 5, "lr": 0.1}  # the given config is left alone

    from cliplab.quickstart import QuickstartConfig

    recipe = Path(__file__).parents[1] / "configs" / "quickstart.yaml"  # written in steps
    cfg = load_config(QuickstartConfig, recipe, ["train.epochs=1"])
    assert (cfg.train.epochs, cfg.train.steps) == (1, None)


def test_true_or_false_is_no_number_in_any_section():
    """pydantic reads true/false as 1/0: `shots: true` trained on 1 shot, a merge's `scale:
    true` merged at 1.0, without a word. Any section's number refuses them; a key that also
    takes true/false keeps them."""
    from cliplab.adapt.config import AdaptConfig

    class Keys(Section):
        count: int = 1
        rate: float | None = None
        rates: float | list[float] = 1.0
        flag_or_count: bool | int = 0
        choice: Literal[1, "auto"] = 1
        anything: Any = None

    for key, kind in (("count", "an integer"), ("rate", "a number"), ("rates", "a number")):
        with pytest.raises(ConfigError, match=f"^x.yaml: {key}: expected {kind}, got True$"):
            validate(Keys, {key: True}, "x.yaml")
    keys = validate(Keys, {"flag_or_count": True, "anything": False, "count": 3})
    assert keys.flag_or_count is True and keys.anything is False and keys.count == 3
    with pytest.raises(ConfigError, match="choice: expected one of 1, 'auto', got True"):
        validate(Keys, {"choice": True})
    from cliplab.adapt.tip_adapter import Options as TipOptions
    from cliplab.merge.config import MergeConfig

    spec = {"method": "tip-adapter", "model": "tiny-clip",
            "data": {"train": {"source": "digits"}, "test": {"source": "digits"}}}
    with pytest.raises(ConfigError, match="shots: expected an integer, got True"):
        load_config(AdaptConfig, None, ["shots=true"], extra=spec)
    with pytest.raises(ConfigError, match="beta: expected a number, got False"):
        validate(TipOptions, {"beta": False})
    with pytest.raises(ConfigError, match="scale: expected a number, got True"):
        validate(MergeConfig, {"method": "task-arithmetic", "models": ["a"], "scale": True})


@pytest.mark.parametrize("steps, message", [
    ([{"min_words": 2}], "c.yaml: steps[0]: a step needs 'step: NAME' (one of: basic, "),
    ([{"step": "basic"}, {"step": "nope"}], "c.yaml: steps[1]: unknown curation step 'nope'"),
])
def test_a_curation_step_error_starts_with_its_step_once(steps, message):
    """A step without `step:` said "c.yaml: steps[0]: : steps[0]: a step needs ..."."""
    from cliplab.curate.config import CurateConfig

    with pytest.raises(ConfigError) as info:
        validate(CurateConfig, {"data": "shapes", "steps": steps}, "c.yaml")
    assert str(info.value).startswith(message) and str(info.value).count("steps[") == 1


def test_changed_key_paths_and_value_at_walk_mappings_and_lists():
    from cliplab.config import changed_key_paths, value_at

    run = {"seed": 0, "steps": [{"step": "a", "k": 1}, {"step": "b"}], "out": "x", "d": {"n": 1}}
    now = {"seed": 0, "steps": [{"step": "a", "k": 2}, {"step": "c"}], "d": {"n": 1, "m": 2}}
    assert changed_key_paths(run, now) == ["d.m", "out", "steps.0.k", "steps.1.step"]
    assert changed_key_paths(run, now, skip={"out", "k"}) == ["d.m", "steps.1.step"]
    assert changed_key_paths(run, {**now, "steps": [1]}, skip={"out", "d"}) == ["steps"]
    assert changed_key_paths(run, run) == [] and changed_key_paths(1, 2) == ["(value)"]
    assert value_at(run, "steps.0.k") == 1 and value_at(run, "d.n") == 1
    assert value_at(run, "steps.2.k") is None and value_at(run, "seed.x") is None


def test_exponents_without_a_dot_are_numbers_in_files_and_overrides(tmp_path):
    """PyYAML (YAML 1.1) read ``1e-3`` as text: a learning rate given so reached free-form
    settings (``options.train``) and the run's records as the string '1e-3'."""
    (tmp_path / "c.yaml").write_text("train: {lr: 1e-3, wd: -2E+1, steps: 10, name: e3}\n")
    cfg = apply_overrides(load_yaml(tmp_path / "c.yaml"),
                          ["options.train.lr=5e-4", "options.tag=3e", "options.n=1_000"])
    assert cfg["train"] == {"lr": 0.001, "wd": -20.0, "steps": 10, "name": "e3"}
    assert cfg["options"] == {"train": {"lr": 0.0005}, "tag": "3e", "n": 1000}
    assert isinstance(cfg["options"]["train"]["lr"], float)


def test_a_section_given_a_value_is_said_in_yaml_words():
    """`train=5` said "expected a valid dictionary or instance of TrainConfig": a Python class
    name; a data set object only Python code passes was offered beside the mapping."""
    from cliplab.evaluate.suite import SuiteSpec
    from cliplab.train.pretrain import PretrainConfig

    recipe = {"model": {"name": "tiny-clip"}, "data": {"train": {"source": "shapes"}}}
    with pytest.raises(ConfigError, match=r"^x: train: expected a mapping of keys \(key: value\), "
                                          r"got 5$"):
        validate(PretrainConfig, {**recipe, "train": 5}, "x")
    with pytest.raises(ConfigError, match=r"^x: train: expected a mapping of keys \(key: value\), "
                                          r"got a list \(1, 2\)$"):
        validate(PretrainConfig, {**recipe, "train": [1, 2]}, "x")
    with pytest.raises(ConfigError) as err:
        validate(SuiteSpec, {"tasks": [{"task": "zeroshot", "data": 5}]}, "x")
    assert "instance" not in str(err.value) and " or " not in str(err.value)
    # a loaded model where its spec goes: its type, not its repr (its whole module tree)
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(20)])
    with pytest.raises(ConfigError, match=r"^x: model: expected a mapping of keys \(key: value\), "
                                          r"got a Sequential object \(a Python object where a "
                                          r"config value goes\)$"):
        validate(PretrainConfig, {**recipe, "model": model}, "x")


def test_a_whole_config_check_an_override_failed_names_the_command_line(tmp_path):
    """Checks of the whole config (a key with no effect) name no key in pydantic's location,
    and their message did not start `KEY:`: the file alone was blamed for an override's key."""
    from cliplab.curate.config import CurateConfig

    recipe = tmp_path / "basic.yaml"
    recipe.write_text("data: {source: shapes, n: 8}\nsteps: [{step: exact_dedup}]\n",
                      encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{recipe} \+ command line: ray_address has no "
                       "effect unless engine is ray; drop it$"):
        load_config(CurateConfig, recipe, ["ray_address=localhost:6379"])
    recipe.write_text("data: {source: shapes, n: 8}\nsteps: [{step: exact_dedup}]\n"
                      "ray_address: localhost:6379\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{recipe}: ray_address has no effect"):
        load_config(CurateConfig, recipe, ["seed=3"])  # the file's key, not the override's


def test_dates_stay_text_and_a_command_line_has_no_comments(tmp_path):
    """`out=2026-12-06` became a datetime.date, refused as "a Python object" (in a YAML file
    too); `title=run #2 vs #3` was cut to "run" without a word (YAML read a comment)."""
    from cliplab.config import parse_value

    assert parse_value("2026-12-06") == "2026-12-06"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: 2026-12-06\nwhen: 2026-12-06 10:00:00\n", encoding="utf-8")
    assert load_yaml(recipe) == {"name": "2026-12-06", "when": "2026-12-06 10:00:00"}
    assert apply_overrides({}, ["title=run #2 vs #3", "tag=#1", "a=x#y", "b=C# #dev",
                                "c=run#1 #2", "u=http://x/#a"]) == {
        "title": "run #2 vs #3", "tag": "#1", "a": "x#y", "b": "C# #dev", "c": "run#1 #2",
        "u": "http://x/#a"}  # a kept part holding a # was cut too
    assert apply_overrides({}, ['t="x #y"', "l=[a, '#b']"]) == {"t": "x #y", "l": ["a", "#b"]}
    with pytest.raises(ConfigError, match=r"^the command line: l=\[a, b\] # c: ' #' starts a "
                       r"YAML comment, which would drop what follows it; quote the text"):
        apply_overrides({}, ["l=[a, b] # c"])
    with pytest.raises(ConfigError, match=r"^the command line: l=\[a#b, c\] # x: ' #' starts"):
        apply_overrides({}, ["l=[a#b, c] # x"])
