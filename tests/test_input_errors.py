"""Bad input on the command line is one line naming the key and value, exit code 2: a wrong
value type inside a data spec, a mistyped local model path, an unknown data-spec option, a
data path that does not exist, a WiSE-FT ``options.finetuned`` that does not exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from cliplab.cli import main

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
                "tasks.0.data.n=abc"], "n: expected a valid integer"),
    (lambda t: ["pretrain", "--config", str(CONFIGS / "pretrain/tiny-shapes.yaml"),
                "--out", str(t / "run"), "data.train.n=abc"], "data.train.n: expected a valid integer"),
    (lambda t: ["adapt", "--method", "zeroshot", "--model", "tiny-clip", "--out", str(t / "a"),
                *DIGITS, "data.test.seed=abc"], "data.test.seed: expected a valid integer"),
    (lambda t: ["curate", "--config", str(CONFIGS / "curate/basic.yaml"), "--out",
                str(t / "c"), "data.n=abc"], "n: expected a valid integer"),
    (lambda t: ["index", "--model", "tiny-clip", "--data", "shapes", "--out", str(t / "i"),
                "data.n=abc"], "n: expected a valid integer"),
    (lambda t: ["data", "shard", "--data", "shapes", "--out", str(t / "s"), "data.n=abc"],
     "n: expected a valid integer"),
])
def test_a_wrong_value_type_in_a_data_spec_is_one_line(argv, expected, tmp_path, capsys):
    line = one_error(capsys, argv(tmp_path))
    assert expected in line and "'abc'" in line


def test_an_unknown_data_option_names_the_config_key(tmp_path, capsys):
    line = one_error(capsys, ["adapt", "--method", "zeroshot", "--model", "tiny-clip",
                              "--out", str(tmp_path / "a"), *DIGITS, "data.test.splt=1"])
    assert "data.test: unknown option 'splt' for digits (valid: " in line
    line = one_error(capsys, ["pretrain", "--config", str(CONFIGS / "pretrain/tiny-shapes.yaml"),
                              "--out", str(tmp_path / "run"), "data.train.nn=5"])
    assert "data.train: unknown option 'nn' for shapes (valid: " in line


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
        assert f"runs/nothere {NO_PRESET}" in line


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
