"""A damaged or inconsistent model folder is one line naming the file and what is wrong
(a `ModelError`; exit code 2 and no traceback from the CLI)."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from cliplab.cli import main
from cliplab.errors import ModelError
from cliplab.models import build_model
from cliplab.models.resolve import load_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "model"
    build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                embed_dim=16, context_length=32).save(folder)
    return folder


def _truncate(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _bad_config_json(folder):
    (folder / "config.json").write_text('{"model_type": "clip",')


def _no_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


def _config_says_other_shape(folder):
    config = json.loads((folder / "config.json").read_text())
    config["projection_dim"] = 8
    (folder / "config.json").write_text(json.dumps(config))


def _width_not_a_multiple_of_heads(folder):
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(hidden_size=33, num_attention_heads=2)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(edit):
    def damage(folder):
        state = load_file(folder / "model.safetensors")
        edit(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return damage


def _no_weights(folder):
    (folder / "model.safetensors").unlink()


def _bad_cliplab_json(folder):
    (folder / "cliplab.json").write_text("{")


def _no_tokenizer_config(folder):
    """It loaded, then failed on first use: eval died in a 17-frame traceback, exit 1."""
    (folder / "tokenizer_config.json").unlink()


def _not_a_dual_encoder(folder):
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))


CASES = {
    "truncated weights": (_truncate, r"model.safetensors: cannot be read, truncated"),
    "config not JSON": (_bad_config_json, r"config.json: not valid JSON"),
    "no tokenizer": (_no_tokenizer, r"no tokenizer \(tokenizer.json"),
    "shape mismatch": (_config_says_other_shape,
                       r"model.safetensors: weights do not fit .*config.json: "
                       r"\S*projection.weight has shape \[16, 32\] in the file, \[8, 32\] in "
                       r"the config \(and 1 more\)"),
    "width not a multiple of heads": (_width_not_a_multiple_of_heads,
                                     r"config.json: not a valid clip config \(The hidden size "
                                     r"\(33\) is not a multiple of the number of attention "
                                     r"heads \(2\)\.\)$"),
    "missing weight": (_edit_weights(lambda s: s.pop("visual_projection.weight")),
                       r"weights do not fit .*visual_projection.weight is missing"),
    "extra weight": (_edit_weights(lambda s: s.update(extra=s["logit_scale"].clone())),
                     r"weights do not fit .*the file has extra, which the config has no place"),
    "no tokenizer_config.json": (_no_tokenizer_config,
                                 r"the tokenizer cannot be read \(Exception: Unk token .* not "
                                 r"found in the vocabulary\); tokenizer_config.json is missing"),
    "no weights": (_no_weights, r"no weights \(model.safetensors or pytorch_model.bin\)"),
    "cliplab.json not JSON": (_bad_cliplab_json, r"cliplab.json: not valid JSON"),
    "not a dual encoder": (_not_a_dual_encoder, r"config.json: model type 'bert' is not a dual"),
}


def _damaged(good, tmp_path, case):
    folder = tmp_path / "bad"
    shutil.copytree(good, folder)
    CASES[case][0](folder)
    return folder


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_damage_is_one_line_naming_the_file(case, good, tmp_path):
    folder = _damaged(good, tmp_path, case)
    with pytest.raises(ModelError, match=CASES[case][1]) as err:
        load_model(str(folder))
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


def _suite(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text("tasks: [{task: zeroshot, data: {source: digits, split: test}}]\n")
    return suite


@pytest.mark.parametrize("case", ["config not JSON", "no tokenizer", "shape mismatch",
                                  "width not a multiple of heads"])
def test_cli_exits_2_with_one_line(case, good, tmp_path, capsys):
    folder = _damaged(good, tmp_path, case)
    assert main(["eval", "--model", str(folder), "--suite", str(_suite(tmp_path)),
                 "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cliplab: error:"), lines
    assert re.search(CASES[case][1], lines[0]), lines[0]


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_a_truncated_model_ends_the_process_with_one_line_and_exit_2(good, tmp_path):
    folder = _damaged(good, tmp_path, "truncated weights")
    out = subprocess.run([sys.executable, "-m", "cliplab", "eval", "--model", str(folder),
                          "--suite", str(_suite(tmp_path)), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cliplab: error:"), out.stderr
    assert re.search(CASES["truncated weights"][1], lines[0]), lines[0]
