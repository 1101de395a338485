"""The benchmark scripts as a user meets them: ``--help`` of every ``benchmarks/*.py`` script
(and ``examples/merge_experiments.py``) works, with a whole-sentence description and every
flag's help and default; a bad value is a one-line usage error (exit 2), never a traceback.

Only ``--help``, argument errors, a missing optional package and missing data are run: each
answers before any heavy work (what only cliplab can check is asked of it before any model,
data or index is built; an error raised inside a run is one line too: ``cli_args.run_main``).
A bad-value case also passes an unknown flag after the bad one where it can (argparse checks
types first), so a regression still stops at a usage error instead of running the benchmark.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELPERS = ("cli_args.py", "results_file.py")  # modules the scripts import, not scripts
SCRIPTS = [p for p in sorted((REPO / "benchmarks").glob("*.py")) if p.name not in HELPERS]
SCRIPTS.append(REPO / "examples" / "merge_experiments.py")
NO_SUCH_FLAG = "--no-such-flag-here"


def run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)


def description(help_text: str) -> str:
    """The text between the usage block and the first argument section."""
    head = re.split(r"\n(?:options|positional arguments):\n", help_text)[0]
    return head.split("\n\n", 1)[1].strip()


def flags_without_help(help_text: str) -> list[str]:
    lines = help_text.split("\noptions:\n", 1)[1].splitlines()
    missing = []
    for i, line in enumerate(lines):
        if not line.startswith("  -") or re.search(r"\S {2,}\S", line):  # help beside it
            continue
        follows = lines[i + 1] if i + 1 < len(lines) else ""
        if not re.match(r" {4,}\S", follows):  # nor on the next line
            missing.append(line.strip())
    return missing


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_shows_a_whole_description_and_every_flag_with_help(script):
    out = run(script, "--help")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stdout.startswith("usage:")
    text = description(out.stdout)
    assert text.endswith("."), text  # a whole sentence, not cut at a line or a colon
    assert flags_without_help(out.stdout) == []
    if script.name != "openclip_train_step.py":  # its one argument is positional
        assert re.search(r"\(default:\s", out.stdout)


@pytest.mark.parametrize("name", ["near_dup.py", "search_latency.py"])
def test_help_spells_out_the_million_vectors(name):
    out = run(REPO / "benchmarks" / name, "--help")
    assert re.search(r"--n N +[^\n]*\(default: 1,000,000\)", out.stdout), out.stdout


BAD = [  # (script, args, the flag the error names)
    ("benchmarks/eval_suite.py", ["--n-train", "0", NO_SUCH_FLAG], "--n-train"),
    ("benchmarks/eval_suite.py", ["--model", "/nonexistent/model"], "--model"),
    ("examples/merge_experiments.py", ["--base", "/nonexistent/model", NO_SUCH_FLAG],
     "--base"),
    ("benchmarks/adapt_fewshot.py", ["--model", "./no/such/run"], "--model"),
    ("benchmarks/adapt_fewshot.py", ["--model", "x", "--shots", "-1", NO_SUCH_FLAG],
     "--shots"),
    ("benchmarks/finetune_wise_ft.py", ["--model", "x", "--epochs", "0", NO_SUCH_FLAG],
     "--epochs"),
    ("benchmarks/near_dup.py", ["--n", "0", NO_SUCH_FLAG], "--n"),
    ("benchmarks/near_dup.py", ["--n-clusters", "many", NO_SUCH_FLAG], "--n-clusters"),
    ("benchmarks/search_latency.py", ["--recall", "1.5", NO_SUCH_FLAG], "--recall"),
    ("benchmarks/serve_load.py", ["--image-every", "0", NO_SUCH_FLAG], "--image-every"),
    ("benchmarks/serve_load.py", ["--index", "/nonexistent/index", NO_SUCH_FLAG], "--index"),
    ("benchmarks/loss_memory.py", ["--tile", "-2", NO_SUCH_FLAG], "--tile"),
    ("benchmarks/quickstart_step.py", ["--warmup", "0", NO_SUCH_FLAG], "--warmup"),
    ("benchmarks/train_throughput.py", ["--steps", "two", NO_SUCH_FLAG], "--steps"),
    ("benchmarks/papers.py", ["--jobs", "0", NO_SUCH_FLAG], "--jobs"),
    ("benchmarks/papers.py", ["--data-dir", "/nonexistent/fmnist"], "--data-dir"),
    # the 2 x pooled std verdict needs a spread: fewer than 3 seeds, or one twice, is refused
    # (--data-dir is checked after --seeds: a regression stops there, not in a run)
    ("benchmarks/papers.py", ["--seeds", "1", "--data-dir", "/nonexistent/fmnist"], "--seeds"),
    ("benchmarks/papers.py", ["--seeds", "1", "2", "2", "--data-dir", "/nonexistent/fmnist"],
     "--seeds"),
    ("benchmarks/curate_claims.py", ["--seeds", "1", "2", "--quick", "--claims",
                                     "decontaminate", "--out", "/nonexistent/cc.json"], "--seeds"),
    ("benchmarks/curate_claims.py", ["--seeds", "1", "1", "1", "--quick", "--claims",
                                     "decontaminate", "--out", "/nonexistent/cc.json"], "--seeds"),
    ("benchmarks/inference_speed.py", ["--repeats", "0", NO_SUCH_FLAG], "--repeats"),
    ("benchmarks/openclip_train_step.py", ["{not json"], "arch"),
    # what only cliplab knows, asked of it before any model, data or index is built
    ("benchmarks/adapt_fewshot.py", ["--model", "x", "--methods", "foo", NO_SUCH_FLAG],
     "--methods"),
    ("benchmarks/adapt_fewshot.py", ["--model", "x", "--option", "foo"], "--option"),
    ("benchmarks/adapt_fewshot.py", ["--model", "x", "--option", "search=true"], "--option"),
    ("benchmarks/adapt_fewshot.py", ["--model", "x", "--methods", "tip-adapter", "--option",
                                     "coop.n_ctx=4"], "--option"),
    ("benchmarks/adapt_fewshot.py", ["--model", "tiny-clip", "--methods", "tip-adapter",
                                     "--option", "tip-adapter.bogus=1", "--shots", "1",
                                     "--seeds", "1", "--test-limit", "10"], "--option"),
    ("benchmarks/near_dup.py", ["--eps", "2", NO_SUCH_FLAG], "--eps"),
    ("benchmarks/near_dup.py", ["--eps", "0", NO_SUCH_FLAG], "--eps"),
    ("benchmarks/near_dup.py", ["--noise", "-0.1", NO_SUCH_FLAG], "--noise"),
    ("benchmarks/search_latency.py", ["--alternative", "bogus", "--n", "2000", "--dim", "8",
                                      "--queries", "10", "--latency-queries", "10"],
     "--alternative"),
    ("benchmarks/search_latency.py", ["--n", "5", "--dim", "8", "--queries", "10"], "--n"),
    ("benchmarks/finetune_wise_ft.py", ["--model", "x", "--train-size", "64"], "--batch-size"),
    ("benchmarks/finetune_wise_ft.py", ["--model", "tiny-clip", "--shifts", "foo",
                                        "--train-size", "128", "--test-size", "16", "--epochs",
                                        "0.1", "--skip-lora", "--out", "/nonexistent/ft"],
     "--shifts"),
    ("benchmarks/shard_stream.py", ["--repeats", "0", NO_SUCH_FLAG], "--repeats"),
    ("benchmarks/loss_memory.py", ["--sizes", "64", "--configs", "openclip-ClipLoss",
                                   "--no-openclip"], "--configs"),
]


@pytest.mark.parametrize("script, args, flag", BAD, ids=lambda v: v if isinstance(v, str) and
                         v.endswith(".py") else None)
def test_a_bad_value_is_a_one_line_usage_error(script, args, flag):
    out = run(REPO / script, *args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    *usage, error = out.stderr.strip().splitlines()
    assert error.startswith(f"{Path(script).name}: error: argument {flag}: "), error
    assert usage and usage[0].startswith("usage:")
    assert all(line.startswith(" ") for line in usage[1:]), usage  # the usage block only


@pytest.mark.parametrize("name", HELPERS)
def test_a_helper_module_run_as_a_script_says_what_it_is(name):
    out = run(REPO / "benchmarks" / name, "--help")
    assert out.returncode == 1
    assert out.stdout == "" and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "not a script" in out.stderr


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None,
                    reason="open_clip is importable here: the script would train")
def test_the_openclip_step_without_open_clip_says_which_python_to_use():
    keys = ["threads", "embed_dim", "layers", "width", "heads", "patch_size", "image_size",
            "context_length", "vocab_size", "text_width", "text_layers", "batch_size",
            "precision", "warmup", "steps"]
    out = run(REPO / "benchmarks" / "openclip_train_step.py", json.dumps(dict.fromkeys(keys, 1)))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "openclip_env.py" in out.stderr


MISSING = [  # (script, args, an optional package it needs)
    ("serve_load.py", ["--clients", "1", "--seconds", "1"], "httpx"),
    ("inference_speed.py", ["--sizes", "quickstart", "--batches", "1", "--repeats", "1"],
     "onnxruntime"),
    ("near_dup.py", ["--n", "5000"], "faiss"),
    ("search_latency.py", ["--n", "5000", "--dim", "32"], "faiss"),
]


@pytest.mark.parametrize("name, args, module", MISSING, ids=[m[0] for m in MISSING])
def test_a_missing_optional_package_is_one_line_before_any_work(tmp_path, name, args, module):
    shadow = tmp_path / module  # "not installed": importing it fails as a missing one does
    shadow.mkdir()
    (shadow / "__init__.py").write_text(
        f"raise ModuleNotFoundError({f'No module named {module!r}'!r}, name={module!r})\n",
        encoding="utf-8")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args],
                         capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith(f"{name}: error: this benchmark needs {module}"), error
    assert "pip install" in error


def test_an_installed_package_failing_to_import_keeps_its_traceback(monkeypatch):
    """``from faiss import X`` of a faiss without X is no missing faiss: told to install what
    is installed, the user lost the traceback saying what failed."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from cli_args import missing_package

    assert missing_package(ImportError("cannot import name 'X' from 'faiss'", name="faiss")) \
        is None
    assert missing_package(ModuleNotFoundError("No module named 'faiss'", name="faiss")) \
        .startswith("this benchmark needs faiss, which is not installed: pip install")


def test_a_cliplab_error_in_a_run_is_one_line_and_exit_2(tmp_path):
    """Missing data (cliplab's DataError, raised inside the run) ends as the CLI's errors do."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "shard_stream.py"),
                          "--n", "100", "--workers", "0"], capture_output=True, text=True,
                         cwd=REPO, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1",
                              "CLIPLAB_FASHION_MNIST": str(tmp_path)})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shard_stream.py: error: Fashion-MNIST"), lines


def test_run_main_keeps_the_traceback_of_a_bug(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import cli_args
    from cliplab.errors import ConfigError

    def bad_input():
        raise ConfigError("bad value")

    with pytest.raises(SystemExit) as stop:
        cli_args.run_main(bad_input, prog="x.py")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "x.py: error: bad value\n"

    def bug():
        raise ImportError("cannot import name 'nope'", name="cliplab.nope")

    with pytest.raises(ImportError):  # not an optional package: a bug, its traceback kept
        cli_args.run_main(bug, prog="x.py")


def in_a_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_eval_suite_answers_help_before_importing_torch():
    code = ("import runpy, sys\n"
            "sys.argv = ['eval_suite.py', '--help']\n"
            "try:\n"
            "    runpy.run_path('benchmarks/eval_suite.py', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    out = in_a_python(code, {**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip().endswith("torch imported: False"), out.stdout + out.stderr


def test_eval_suite_is_offline_unless_told_otherwise():
    """HF_HUB_OFFLINE is read once, when huggingface_hub is imported: the script's default must
    be set before that (the run is stopped at its first torch call, after the imports)."""
    code = ("import runpy, sys, torch\n"
            "def stop(seed):\n"
            "    raise RuntimeError('stopped')\n"
            "torch.manual_seed = stop\n"
            "sys.argv = ['eval_suite.py', '--model', 'tiny-clip']\n"
            "try:\n"
            "    runpy.run_path('benchmarks/eval_suite.py', run_name='__main__')\n"
            "except RuntimeError:\n"
            "    pass\n"
            "import huggingface_hub.constants\n"
            "print('offline:', huggingface_hub.constants.HF_HUB_OFFLINE)\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = in_a_python(code, env)
    assert out.stdout.strip().endswith("offline: True"), out.stdout + out.stderr


def test_train_throughput_profile_is_an_extra_run_kept_out_of_the_timing(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import train_throughput

    calls = []

    def fake(precision, warmup, steps, profile):  # a profiled run is slow: 1 image/s
        calls.append(profile)
        return {"images_per_s": 1.0 if profile else 100.0, "params": 7}

    monkeypatch.setattr(train_throughput, "cliplab_throughput", fake)
    train_throughput.main(["--precision", "fp32", "--repeats", "2", "--profile",
                           "--no-openclip"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(calls) == [False, False, True]  # the profiled run is an extra one
    assert line["cliplab_runs"] == [100.0, 100.0] and line["cliplab_images_per_s"] == 100.0


def test_search_latency_warms_each_index_up_before_timing(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import numpy as np
    import search_latency

    class Index:
        searches = 0

        def search(self, q, k):
            Index.searches += 1

    lat = search_latency.latencies_ms(Index(), np.zeros((30, 4), dtype=np.float32), warmup=5)
    assert len(lat) == 30 and Index.searches == 35  # 5 untimed, then the 30 timed


def test_inference_speed_rows_record_how_they_were_made(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import inference_speed
    from cliplab.models import onnx_encoder, onnx_export

    class Session:  # ONNX export and onnxruntime are not what this checks: stand-ins
        def encode_image(self, pixels):
            return pixels

    monkeypatch.setattr(onnx_export, "export_onnx", lambda model, out, **kw: out)
    monkeypatch.setattr(onnx_encoder, "load_onnx", lambda folder, **kw: Session())
    monkeypatch.setitem(inference_speed.SIZES, "tiny", dict(
        batch=2, build=lambda: inference_speed._preset("tiny_clip", image_size=16, patch_size=8,
                                                       width=32, layers=1, heads=2)))
    rows = inference_speed.speed_rows("tiny", batches=2, repeats=3, threads=1, tmp=tmp_path)
    assert rows
    for row in rows:
        assert row["batches"] == 2 and row["repeats"] == 3
        assert row["torch"] and row["onnxruntime"]
        assert "cpu" in row and isinstance(row["cpu_native_bf16"], bool)


def test_shard_stream_times_both_readers_in_turns_over_repeats(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import shard_stream
    from cliplab.data import shards, sources

    order = []

    def reader(name):
        def read(folder, batch_size, workers):
            order.append(name)
            return 10
        return read

    monkeypatch.setattr(shard_stream, "plain_webdataset", reader("w"))
    monkeypatch.setattr(shard_stream, "cliplab_stream", reader("c"))
    monkeypatch.setattr(sources, "load_source", lambda spec: None)
    monkeypatch.setattr(shards, "write_shards", lambda *a, **kw: None)
    shard_stream.main(["--n", "10", "--workers", "0", "--repeats", "3"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert order == ["w", "c",  # untimed: the page cache
                     "w", "c", "c", "w", "w", "c"]  # timed, the order swapped every repeat
    assert len(line["webdataset_runs"]) == len(line["cliplab_runs"]) == 3
    assert len(line["ratio_runs"]) == 3 and line["repeats"] == 3
