"""Bad input on the command line is one line naming the key and value, exit code 2: a wrong
value type inside a data spec, a mistyped local model path, an unknown data-spec option, a
data path that does not exist, a WiSE-FT ``options.finetuned`` that does not exist."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cliplab.cli import main
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
NO_PRESET = "does not exist (no such file or folder, and no preset of that name)"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def one_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one stderr line (no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def write_suite(tmp_path: Path) -> Path:
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - {name: zs, task: zeroshot, "
                     "data: {source: shapes, attribute: color, n: 20, image_size: 32}}\n")
    return suite


DIGITS = ["data.train={source: digits, split: train}", "data.test={source: digits, split: test}"]


@pytest.mark.parametrize("argv, expected", [
    (lambda t: ["eval", "--config", str(write_suite(t)), "--model", "tiny-clip",
                "tasks.0.data.n=abc"],
     "{t}/suite.yaml + command line: tasks[0] (name 'zs'): data.n"),
    (lambda t: ["pretrain", "--config", str(CONFIGS / "pretrain/tiny-shapes.yaml"),
                "--out", str(t / "run"), "data.train.n=abc"],
     f"{CONFIGS}/pretrain/tiny-shapes.yaml + command line: data.train.n"),
    (lambda t: ["adapt", "--method", "zeroshot", "--model", "tiny-clip", "--out", str(t / "a"),
                *DIGITS, "data.test.seed=abc"], "the command line: data.test.seed"),
    (lambda t: ["curate", "--config", str(CONFIGS / "curate/basic.yaml"), "--out",
                str(t / "c"), "data.n=abc"], f"{CONFIGS}/curate/basic.yaml + command line: data.n"),
    (lambda t: ["index", "--model", "tiny-clip", "--data", "shapes", "--out", str(t / "i"),
                "data.n=abc"], "the command line: data.n"),
    (lambda t: ["data", "shard", "--data", "shapes", "--out", str(t / "s"), "data.n=abc"],
     "the command line: data.n"),
])
def test_a_wrong_value_type_in_a_data_spec_is_one_line(argv, expected, tmp_path, capsys):
    """Named like any config error: the file (and whether the command line set it), then the
    whole key path, before any output is made."""
    line = one_error(capsys, argv(tmp_path))
    assert line == (f"cliplab: error: {expected.format(t=tmp_path)}: expected a valid integer, "
                    "unable to parse string as an integer, got 'abc'")
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "suite.yaml"])


@pytest.mark.parametrize("argv, expected", [
    # each was a traceback (digits' KeyError) or an error only once loading began, without
    # the config it came from (the index left an empty OUT.partial behind)
    (["adapt", "--method", "zeroshot", "--model", "tiny-clip", "--config",
      str(CONFIGS / "adapt/digits.yaml"), "--out", "{t}/a", "data.test.split=bad"],
     f"{CONFIGS}/adapt/digits.yaml + command line: data.test.split: expected 'all', 'train' or "
     "'test', got 'bad'"),
    (["data", "shard", "--data", "digits", "--out", "{t}/s", "data.split=bad"],
     "the command line: data.split: expected 'all', 'train' or 'test', got 'bad'"),
    (["index", "--model", "tiny-clip", "--data", "shapes", "--out", "{t}/i",
      "data.attribute=size"], "the command line: data.attribute: expected 'shape' or 'color', "
     "got 'size'"),
    (["pretrain", "--config", str(CONFIGS / "pretrain/tiny-shapes.yaml"), "--out", "{t}/r",
      "data.train.seed=-1"], f"{CONFIGS}/pretrain/tiny-shapes.yaml + command line: "
     "data.train.seed: expected greater than or equal to 0, got -1"),
    (["pretrain", "--config", str(CONFIGS / "pretrain/tiny-shapes.yaml"), "--out", "{t}/r",
      "data.replay={ratio: 2, source: shapes}"], f"{CONFIGS}/pretrain/tiny-shapes.yaml + "
     "command line: data.replay.ratio: expected less than 1, got 2"),
    (["pretrain", "--config", str(CONFIGS / "pretrain/tiny-shapes.yaml"), "--out", "{t}/r",
      "data.replay={ratio: 0.2}"], f"{CONFIGS}/pretrain/tiny-shapes.yaml + command line: "
     "data.replay: no 'source' key (one of: fashion-mnist, digits, shapes, manifest, "
     "clip-benchmark, shards, image-folder, multilabel-manifest)"),
    (["adapt", "--method", "zeroshot", "--model", "tiny-clip", "--out", "{t}/a",
      "data.train={source: digits}", "data.test={source: manifest}"],
     "the command line: data.test: manifest needs the option path (e.g. {source: manifest, "
     "path: ...})"),
])
def test_a_bad_data_option_value_is_a_config_error(argv, expected, tmp_path, capsys):
    line = one_error(capsys, [a.replace("{t}", str(tmp_path)) for a in argv])
    assert line == f"cliplab: error: {expected}"
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_data_option_names_the_config_key(tmp_path, capsys):
    line = one_error(capsys, ["adapt", "--method", "zeroshot", "--model", "tiny-clip",
                              "--out", str(tmp_path / "a"), *DIGITS, "data.test.splt=1"])
    assert line.startswith("cliplab: error: the command line: data.test: unknown option 'splt' "
                           "for digits (valid: ")
    line = one_error(capsys, ["pretrain", "--config", str(CONFIGS / "pretrain/tiny-shapes.yaml"),
                              "--out", str(tmp_path / "run"), "data.train.nn=5"])
    assert line.startswith(f"cliplab: error: {CONFIGS}/pretrain/tiny-shapes.yaml + command line: "
                           "data.train: unknown option 'nn' for shapes (valid: ")


@pytest.mark.parametrize("command", [
    ["data", "shard", "--out", "OUT/s", "--data", "./nodir"],
    ["index", "--model", "tiny-clip", "--out", "OUT/i", "--data", "nothere/"],
])
def test_a_data_path_that_does_not_exist_says_so(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error(capsys, [a.replace("OUT", str(tmp_path)) for a in command])
    assert f"{command[-1]} does not exist (no such file or folder" in line


@pytest.mark.parametrize("command", [
    ["eval", "--config", "SUITE", "--model", "runs/nothere"],
    ["adapt", "--method", "zeroshot", "--model", "runs/nothere", "--out", "OUT/a", *DIGITS],
    ["export", "runs/nothere", "--format", "onnx", "--out", "OUT/e"],
    ["merge", "--models", "runs/nothere", "runs/nothere2", "--out", "OUT/m", "method=uniform"],
])
def test_a_mistyped_local_model_path_is_no_hub_id(command, tmp_path, capsys, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    suite = write_suite(tmp_path)
    line = one_error(capsys, [a.replace("SUITE", str(suite)).replace("OUT", str(tmp_path))
                              for a in command])
    assert "runs/nothere does not exist" in line and "hf download" not in line
    if command[0] != "merge":  # merge's own message names --models
        assert f"runs/nothere {NO_PRESET} in the working folder {tmp_path}" in line


def test_a_relative_model_path_that_may_be_a_hub_id_names_the_working_folder(
        tmp_path, capsys, monkeypatch):
    """A shipped config's ``model: runs/tiny-shapes`` run before tiny-shapes.yaml, from another
    folder, was told only to `hf download runs/tiny-shapes`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    line = one_error(capsys, ["eval", "--config", str(write_suite(tmp_path)),
                              "--model", "runs/tiny-shapes"])
    assert f"runs/tiny-shapes {NO_PRESET} in the working folder {tmp_path}, and is not in " \
           "the Hugging Face cache" in line


def test_wise_ft_checks_options_finetuned_before_encoding(tmp_path, capsys, monkeypatch):
    from cliplab.models.dual_encoder import DualEncoder

    encoded = []
    original = DualEncoder.encode_image
    monkeypatch.setattr(DualEncoder, "encode_image",
                        lambda self, *a, **k: encoded.append(1) or original(self, *a, **k))
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    line = one_error(capsys, ["adapt", "--method", "wise-ft", "--model", "tiny-clip",
                              "--out", str(tmp_path / "w"), "--no-progress", *DIGITS,
                              "options.finetuned=runs/nothere"])
    assert "options.finetuned: runs/nothere does not exist" in line
    assert "hf download" not in line
    assert not encoded


def test_one_string_for_a_list_option_is_a_list_of_one(tmp_path):
    """`data.kinds=single` (one kind where the loader takes a list) loads as it did before the
    options were type-checked; pydantic alone refuses a str as a sequence."""
    from cliplab.data.sources import check_options, load_source

    spec = check_options({"source": "shapes", "kinds": "single", "colors": "red", "n": "6"})
    assert spec == {"source": "shapes", "kinds": ["single"], "colors": ["red"], "n": 6}
    data = load_source({"source": "shapes", "kinds": "single", "colors": "red", "n": 6,
                        "image_size": 32})
    assert len(data) == 6 and all("red" in c[0] for c in data.captions)


@pytest.mark.parametrize("kind, name", [("manifest", "missing.csv"), ("image-folder", "photos")])
def test_a_missing_data_path_is_said_one_way_by_every_command(tmp_path, capsys, kind, name):
    """index and curate said `manifest X does not exist; check the path`, data shard and eval
    `manifest not found: X` and `image folder X does not exist or is not a folder`."""
    missing = tmp_path / name
    spec = f"{{source: {kind}, path: {missing}}}"
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"tasks: [{{task: zeroshot, data: {spec}}}]\n", encoding="utf-8")
    commands = [["index", "--model", "tiny-clip", f"data={spec}"],
                ["data", "shard", f"data={spec}"],
                ["eval", "--model", "tiny-clip", "--config", str(suite)]]
    for command in commands:
        assert main([*command, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cliplab: error: ") and "\n" not in err
        assert err.endswith(f"{kind} {missing} does not exist; check the path"), err


@pytest.mark.parametrize("args, words", [
    (["eval", "--model", "tiny-clip", "--config", "SUITE", "tasks.0.data.colors=[purple,pink]"],
     "data: shapes: unknown colour name 'pink'; valid: red, green, blue, yellow, purple, cyan, "
     "orange, white"),
    (["eval", "--model", "tiny-clip", "--config", "SUITE",
      "tasks.0.data={source: digits, classes: [one, two, one]}"],
     "data: classes: 'one' is named twice"),
    (["eval", "--model", "tiny-clip", "--config", "SUITE", "tasks.0.data.source=[shapes]"],
     "a data source is a name (fashion-mnist, "),
    (["adapt", "--method", "tip-adapter", "--model", "tiny-clip", "data.train={source: digits}",
      "data.test={source: digits}", "options.augment=[hflip]"],
     "options.augment: expected a mapping of overrides such as {hflip: false}, got a list "
     "(hflip)"),
    (["adapt", "--method", "tip-adapter", "--model", "tiny-clip", "data.train={source: digits}",
      "data.test={source: digits}", "options.augment.foo=1"],
     "options.augment: unknown augment option 'foo' (valid: scale, translate, rotate_deg, "
     "hflip)"),
])
def test_messages_name_values_in_words_not_python_lists(tmp_path, capsys, args, words):
    """Python lists, dicts and type names leaked into these (['pink'], classes ['one', 'one'],
    not list ['shapes'], got ['hflip'], augment option(s) ['foo'])."""
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks: [{task: zeroshot, data: {source: shapes, n: 20}}]\n",
                     encoding="utf-8")
    args = [str(suite) if a == "SUITE" else a for a in args]
    assert main([*args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err, err
    assert "[" not in err.split("error: ", 1)[1].replace("tasks[0]", ""), err


UNKNOWN = "unknown model 'nosuch': give a preset"
MISSING = "nosuch does not exist (merge needs a model"


def _yaml(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text, encoding="utf-8")
    return str(tmp_path / name)


@pytest.mark.parametrize("argv, expected", [
    (lambda t: ["eval", "--config", str(write_suite(t)), "--model", "nosuch"],
     f"--model: {UNKNOWN}"),
    (lambda t: ["adapt", "--method", "zeroshot", "--model", "nosuch", "--out", str(t / "a"),
                *DIGITS], f"--model: {UNKNOWN}"),
    (lambda t: ["adapt", "--config", _yaml(t, "a.yaml", "method: zeroshot\nmodel: nosuch\n"),
                "--out", str(t / "a"), *DIGITS], f"{{t}}/a.yaml + command line: model: {UNKNOWN}"),
    (lambda t: ["adapt", "--method", "zeroshot", "model=nosuch", "--out", str(t / "a"),
                *DIGITS], f"the command line: model: {UNKNOWN}"),
    (lambda t: ["index", "--model", "nosuch", "--data", "shapes", "--out", str(t / "i")],
     f"--model: {UNKNOWN}"),
    (lambda t: ["index", "--config", _yaml(t, "i.yaml", "model: nosuch\n"), "--data", "shapes",
                "--out", str(t / "i")], f"{{t}}/i.yaml: model: {UNKNOWN}"),
    (lambda t: ["serve", str(t / "index"), "--model", "nosuch", "--port", str(free_port())],
     f"--model: {UNKNOWN}"),
    (lambda t: ["merge", "--models", "nosuch", str(t / "m2"), "--out", str(t / "m"),
                "--method", "uniform"], f"--models: {MISSING}"),
    (lambda t: ["merge", "--config", _yaml(t, "m.yaml", f"models: [nosuch, {t / 'm2'}]\n"),
                "--out", str(t / "m"), "--method", "uniform"], f"{{t}}/m.yaml: models: {MISSING}"),
    (lambda t: ["merge", "--models", str(t / "m2"), str(t / "m2b"), "--base", "nosuch",
                "--out", str(t / "m"), "--method", "task-arithmetic"], f"--base: {MISSING}"),
    (lambda t: ["export", "nosuch", "--format", "onnx", "--out", str(t / "e")],
     f"MODEL: {UNKNOWN}"),
    (lambda t: ["convert", "nosuch", "--out", str(t / "c")],
     "SRC: nosuch: no such OpenCLIP checkpoint file or folder"),
    (lambda t: ["pretrain", "--config", _yaml(t, "p.yaml", "model: nosuch\ndata: {train: "
                                                 "{source: shapes}}\ntrain: {steps: 1}\n"),
                "--out", str(t / "p")], f"{{t}}/p.yaml: model: {UNKNOWN}"),
    (lambda t: ["curate", "--config", _yaml(t, "cu.yaml", "data: {source: shapes, n: 10}\nsteps:"
                                             "\n  - {step: clip_score, model: nosuch, "
                                             "keep_top: 0.5}\n"), "--out", str(t / "cu")],
     f"{{t}}/cu.yaml: steps[0].model (clip_score): {UNKNOWN}"),
], ids=["eval", "adapt", "adapt-config", "adapt-override", "index", "index-config", "serve",
        "merge", "merge-config", "merge-base", "export", "convert", "pretrain-config",
        "curate-config"])
def test_an_unknown_model_names_the_argument_it_came_from(argv, expected, tmp_path, capsys,
                                                          monkeypatch, served_index):
    """`cliplab eval --model nosuch` said what was wrong, not which argument held it: each
    command's model argument, option or config key, is named as config errors name keys."""
    from cliplab.models import build_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "index").symlink_to(served_index)
    for name in ("m2", "m2b"):
        build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                    embed_dim=16, context_length=48).save(tmp_path / name)
    line = one_error(capsys, argv(tmp_path))
    assert line.startswith("cliplab: error: " + expected.replace("{t}", str(tmp_path))), line


def test_debug_shows_where_an_unknown_model_was_looked_up(tmp_path, capsys):
    """Naming the argument an unknown model came from kept the message but lost the traceback:
    --debug showed only the CLI's re-raise, not the resolver that found no model."""
    assert main(["--debug", "eval", "--config", str(write_suite(tmp_path)),
                 "--model", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert f"--model: {UNKNOWN}" in err
    frames = [line for line in err.splitlines() if line.lstrip().startswith("File ")]
    assert any(f"cliplab{os.sep}models{os.sep}" in line for line in frames), err


@pytest.fixture(scope="module")
def served_index(tmp_path_factory) -> Path:
    """A small index of the shapes, for `serve`."""
    out = tmp_path_factory.mktemp("served") / "index"
    assert main(["index", "--model", "tiny-clip", "--data", "shapes", "data.n=8",
                 "--out", str(out), "--no-progress"]) == 0
    return out


def test_a_missing_out_is_said_in_one_wording_by_every_command(tmp_path, capsys, monkeypatch):
    """export and convert said argparse's "the following arguments are required: --out", merge,
    index and data shard "the command line: out is required", curate and report "say where to
    write ...": one wording now, `missing_out`'s."""
    monkeypatch.chdir(tmp_path)
    commands = {
        "the export": ["export", "tiny-clip", "--format", "onnx"],
        "the model folder": ["convert", "x.pt"],
        "the merged model": ["merge", "--method", "uniform", "--models", "a", "b"],
        "the index": ["index", "--model", "tiny-clip", "--data", "shapes"],
        "the shards": ["data", "shard", "--data", "shapes"],
        "the curated pool": ["curate", "--config", str(CONFIGS / "curate/basic.yaml")],
        "the report": ["report", "--inputs", "x"],
    }
    said = {what: one_error(capsys, argv) for what, argv in commands.items()}
    assert said == {what: f"cliplab: error: say where to write {what}: --out DIR"
                    for what in commands}
    # the config's out is an output as --out is
    assert "say where" not in one_error(capsys, ["merge", "--method", "uniform", "--config",
                                                 _yaml(tmp_path, "m.yaml", "out: o\n"),
                                                 "--models", "a", "b"])


# each stage command with a config that names all but its out, by what it writes
STAGE_CONFIGS = {
    "the merged model": (["merge"], "method: uniform\nmodels: [a, b]\n"),
    "the index": (["index"], "model: tiny-clip\ndata: {source: shapes}\n"),
    "the shards": (["data", "shard"], "data: {source: shapes}\n"),
    "the curated pool": (["curate"], "data: {source: shapes}\n"),
    "the report": (["report"], "inputs: [x]\n"),
}


@pytest.mark.parametrize("given, in_file", [
    ([], 'out: ""\n'), (["out="], ""), (["out=  "], ""), (["--out", " "], "")],
    ids=["config", "override", "override-spaces", "option-spaces"])
def test_an_empty_out_is_a_missing_one_wherever_it_is_given(given, in_file, tmp_path, capsys,
                                                            monkeypatch):
    """An empty ``out=`` (``out=$OUT`` with OUT unset) or config ``out: ""`` counted as given:
    each command then said something else (index took the working folder for the index)."""
    monkeypatch.chdir(tmp_path)
    for what, (command, text) in STAGE_CONFIGS.items():
        config = _yaml(tmp_path, "c.yaml", text + in_file)
        line = one_error(capsys, [*command, "--config", config, *given])
        assert line == f"cliplab: error: say where to write {what}: --out DIR", line
        assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


@pytest.mark.parametrize("what", list(STAGE_CONFIGS))
def test_a_missing_out_is_listed_with_the_configs_other_problems(what, tmp_path, capsys):
    """The missing out was said before the config was checked, hiding its other problems until
    --out was given: both are said on one line, the out in `missing_out`'s wording."""
    command, text = STAGE_CONFIGS[what]
    config = _yaml(tmp_path, "c.yaml", text + "bogus: 3\n")
    line = one_error(capsys, [*command, "--config", config])
    assert line.startswith(f"cliplab: error: {config}: say where to write {what}: --out DIR; "
                           "unknown key bogus (valid: "), line


@pytest.mark.parametrize("command", ["export", "convert"])
def test_the_usage_shows_out_as_required_where_the_command_checks_it(command, capsys):
    """export and convert check --out themselves (for `missing_out`'s wording), which made
    argparse's usage show it optional: ``[--out DIR]``."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert usage.startswith(f"usage: cliplab {command} ")
    assert " --out DIR" in usage and "[--out DIR]" not in usage, usage
