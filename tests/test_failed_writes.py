"""A write the system refuses (a full disk, a file-size limit, a read-only cache): the failed
write leaves no half file that a re-run takes for someone else's, the command ends in one line
naming the file, and a run or output folder it leaves is one the same command takes again.
Simulated by writers that raise as a full disk does (no root or mount needed)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from cliplab.errors import CliplabError


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _half_then_full(self, data, *args, **kwargs):
    """Path.write_text that gets some bytes out before the disk is full."""
    with open(self, "w", encoding="utf-8") as f:
        f.write(data[:3])
    raise OSError(errno.ENOSPC, "No space left on device", str(self))


def test_a_failed_atomic_write_leaves_no_tmp_file(tmp_path, monkeypatch):
    from cliplab.output_folder import write_json, write_utf8

    (tmp_path / "old.txt").write_text("old", encoding="utf-8")
    monkeypatch.setattr(Path, "write_text", _half_then_full)
    with pytest.raises(OSError):
        write_utf8(tmp_path / "old.txt", "new text")
    with pytest.raises(OSError):
        write_json(tmp_path / "results.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
    assert (tmp_path / "old.txt").read_text(encoding="utf-8") == "old"


def test_eval_takes_a_folder_holding_only_its_own_tmp_file(tmp_path):
    """A results.json.tmp a killed eval left: its own, so --overwrite replaces it, and without
    --overwrite the message points at it (it said "no previous eval output")."""
    from cliplab.cli.evaluate import _results_folder

    out = tmp_path / "ev"
    out.mkdir()
    (out / "results.json.tmp").write_text("", encoding="utf-8")
    assert _results_folder(str(out), [], overwrite=True) == out
    with pytest.raises(CliplabError, match="--overwrite to replace a previous eval output"):
        _results_folder(str(out), [])
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(CliplabError, match="holds other files"):
        _results_folder(str(out), [], overwrite=True)


def test_report_takes_a_folder_holding_only_its_own_tmp_file(tmp_path):
    from cliplab.evaluate.report import _previous_or_leftover

    out = tmp_path / "rp"
    out.mkdir()
    (out / "report.md.tmp").write_text("", encoding="utf-8")
    assert _previous_or_leftover(out)
    (out / "notes.md").write_text("mine", encoding="utf-8")
    assert not _previous_or_leftover(out)


def test_curate_and_index_take_a_work_folder_holding_their_first_records_tmp(tmp_path):
    """The state.json.tmp / progress.json.tmp a failed first write left: the folder is the
    command's own work folder, started over (it was refused as "not a work folder")."""
    from cliplab.curate.pipeline import _open_work as curate_work
    from cliplab.serve.build import _open_work as index_work

    work = tmp_path / "cur.partial"
    (work / "cache" / "pool").mkdir(parents=True)
    (work / "state.json.tmp").write_text("", encoding="utf-8")
    curate_work(work, {"data": "x"}, False, {})
    assert (work / "state.json").is_file() and not (work / "state.json.tmp").exists()

    work = tmp_path / "idx.partial"
    (work / "chunks").mkdir(parents=True)
    (work / "progress.json.tmp").write_text("", encoding="utf-8")
    state = index_work(work, tmp_path / "idx", {"collection": None, "backend": "faiss"}, None)
    assert state["count"] == 0 and not (work / "progress.json.tmp").exists()


def test_other_tmp_then_rename_writers_remove_their_tmp_on_failure(tmp_path, monkeypatch):
    import numpy as np

    from cliplab.curate import engine
    from cliplab.serve import build

    monkeypatch.setattr(np, "save", lambda path, *a, **k: (Path(path).write_bytes(b"x"),
                                                          _full_disk())[1])
    monkeypatch.setattr(np, "savez", lambda path, *a, **k: (Path(path).write_bytes(b"x"),
                                                           _full_disk())[1])
    with pytest.raises(OSError):
        build._save_npy(tmp_path / "000000.npy", np.zeros(2))
    with pytest.raises(OSError):
        engine.save_columns(tmp_path / "chunk.npz", {"a": np.zeros(2)}, 2, "here")
    assert list(tmp_path.iterdir()) == []


REPO = Path(__file__).parents[1]
SMALL_PRETRAIN = ["--no-progress", "data.train.n=32", "train.batch_size=16", "train.epochs=1",
                  "eval=null", "model.options.width=32", "model.options.layers=1",
                  "model.options.embed_dim=16"]


def _pretrain_line(out: str = "run") -> list[str]:
    return ["pretrain", "--config", str(REPO / "configs" / "pretrain" / "tiny-shapes.yaml"),
            "--out", out, "--resume", "auto", *SMALL_PRETRAIN]


def test_resume_auto_starts_again_a_run_whose_first_checkpoint_failed(tmp_path, monkeypatch,
                                                                      capsys):
    """A full disk at the first checkpoint: the half-written step-N.tmp goes, and the same
    `--resume auto` command line starts the run again once there is space (it was refused for
    good: "already holds a run ... stopped before its first checkpoint")."""
    from cliplab.cli import main
    from cliplab.train import checkpoint

    save = checkpoint.torch.save

    def full(obj, file, *args, **kwargs):
        file.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint.torch, "save", full)
    assert main(_pretrain_line()) == 2
    assert capsys.readouterr().err.endswith(
        "trainer_state.pt: No space left on device; free space there or choose another --out\n")
    assert (tmp_path / "run" / "metrics.jsonl").is_file()  # what it logged stays for now
    assert not list((tmp_path / "run" / "checkpoints").iterdir())
    monkeypatch.setattr(checkpoint.torch, "save", save)
    assert main(_pretrain_line()) == 0
    said = capsys.readouterr().err
    assert "stopped before its first checkpoint (nothing to resume from): starting it" in said
    records = (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(r)["step"] for r in records] == [2]  # the failed attempt's went
    # a folder holding anything else is left to the usual refusal, untouched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    assert main(_pretrain_line("other")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "other" / "metrics.jsonl").is_file()


def test_resume_auto_never_clears_a_live_run_that_has_not_saved_yet(tmp_path, monkeypatch,
                                                                   capsys):
    """`--resume auto` clears a run stopped before its first checkpoint; a run still going
    before its first save looks the same on disk, and its log was deleted under it."""
    import subprocess
    import sys

    from cliplab.cli import main
    from cliplab.runs import RunDir

    monkeypatch.chdir(tmp_path)
    RunDir(tmp_path / "run").write_config({"model": {"name": "tiny-clip"}, "out": "run"})
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom cliplab.output_folder import hold\n"
         "from cliplab.output_lock import holding_outputs\nwith holding_outputs():\n"
         "    hold(sys.argv[1])\n"
         "    print('held', flush=True)\n    sys.stdin.read()\n", str(tmp_path / "run")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert main(_pretrain_line()) == 2
        assert f"is being written by another cliplab run (pid {holder.pid})" in \
            capsys.readouterr().err
    finally:
        holder.communicate("")
    assert (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8") == '{"step": 1}\n'


class _FullDisk(__import__("io").RawIOBase):
    """A file whose disk fills after ``room`` bytes."""

    def __init__(self, room: int, code: int = errno.ENOSPC):
        self.room, self.code = room, code

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(self.code, __import__("os").strerror(self.code))
        self.room -= len(data)
        return len(data)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_a_checkpoints_state_that_cannot_be_written_is_an_oserror_naming_it(tmp_path,
                                                                             monkeypatch, code):
    """torch's writer said `RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos`, a traceback; the system's error is raised instead, naming the file. A RuntimeError
    that is no refused write stays what it is."""
    import torch

    from cliplab.train import checkpoint

    path = tmp_path / "trainer_state.pt"
    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: _FullDisk(300, code), raising=False)
    with pytest.raises(OSError) as raised:
        checkpoint.save_state({"w": torch.zeros(1000)}, path)
    assert (raised.value.errno, raised.value.filename) == (code, str(path))
    monkeypatch.undo()

    def bug(*args, **kwargs):
        raise RuntimeError("a real bug")
    monkeypatch.setattr(checkpoint.torch, "save", bug)
    with pytest.raises(RuntimeError, match="a real bug"):
        checkpoint.save_state({}, path)


def test_a_tokenizer_save_on_a_full_disk_is_an_oserror_naming_the_folder(tiny_model_dir,
                                                                          tmp_path,
                                                                          monkeypatch):
    """tokenizers' `Exception: No space left on device (os error 28)` was a traceback of every
    model write (merge, export, convert, checkpoints); any other error stays as it is."""
    from cliplab.models.resolve import load_model

    model = load_model(str(tiny_model_dir), "cpu")

    def full(*args, **kwargs):
        raise Exception("No space left on device (os error 28)")
    monkeypatch.setattr(model.tokenizer, "save_pretrained", full)
    with pytest.raises(OSError) as raised:
        model.save_tokenizer(tmp_path / "m")
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(tmp_path / "m"))

    def other(*args, **kwargs):
        raise Exception("a tokenizer bug")
    monkeypatch.setattr(model.tokenizer, "save_pretrained", other)
    with pytest.raises(Exception, match="a tokenizer bug"):
        model.save_tokenizer(tmp_path / "m")


def test_a_file_too_large_is_a_refused_write_with_what_to_do():
    """EFBIG (`ulimit -f`, FAT32's 4 GB) was a traceback, from Python's writers and from
    safetensors'."""
    import argparse

    from safetensors import SafetensorError

    from cliplab.cli import _refused_write_line, _write_refusal

    err = _write_refusal(OSError(errno.EFBIG, "File too large", "out/00000.tar"))
    assert err is not None and "4 GB" in _refused_write_line(err, argparse.Namespace(out="out"))
    err = _write_refusal(SafetensorError("Error while serializing: I/O error: File too large "
                                         "(os error 27)"))
    assert err is not None and err.errno == errno.EFBIG


def test_a_cache_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    import cliplab.output_folder as output_folder
    from cliplab.output_folder import check_cache_dir

    ro = tmp_path / "rocache"
    ro.mkdir()
    real = __import__("os").access
    monkeypatch.setattr(output_folder.os, "access",
                        lambda path, mode: Path(path) != ro and real(path, mode))
    with pytest.raises(CliplabError, match=rf"^--cache-dir {ro}: cannot write in {ro} .*"
                                           "choose another folder$"):
        check_cache_dir(str(ro), [])


def test_a_full_cache_dir_is_named_not_the_out(tmp_path, monkeypatch):
    """safetensors names no file: a full --cache-dir was reported as --out, another disk."""
    import argparse

    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from cliplab.cli import _refused_write_line
    from cliplab.file_modes import save_tensors

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    cached = tmp_path / "cache" / "abc-x.safetensors.tmp"
    with pytest.raises(OSError) as raised:
        save_tensors({"x": torch.zeros(2)}, cached)
    assert raised.value.filename == str(cached)
    args = argparse.Namespace(out=str(tmp_path / "ev"), cache_dir=str(tmp_path / "cache"))
    assert _refused_write_line(raised.value, args) == (
        f"{cached}: No space left on device; free space there or choose another --cache-dir")


def test_eval_prints_its_scores_though_results_json_cannot_be_written(tiny_model_dir, tmp_path,
                                                                      monkeypatch, capsys):
    """eval wrote results.json before printing: a full disk after the whole suite lost every
    score."""
    import cliplab.output_folder as output_folder
    from cliplab.cli import main

    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - {name: zs, task: zeroshot, data: {source: digits, "
                     "split: test}}\n", encoding="utf-8")
    monkeypatch.setattr(output_folder, "write_json", _full_disk)
    assert main(["eval", "--model", str(tiny_model_dir), "--config", str(suite), "--out",
                 str(tmp_path / "ev"), "--no-progress"]) == 2
    said = capsys.readouterr()
    assert json.loads(said.out)["results"]["zs"]["n"] > 0
    assert "No space left on device; free space there" in said.err


def test_a_runs_config_and_an_adapters_json_are_written_whole_or_not_at_all(tmp_path,
                                                                           monkeypatch):
    """adapt on a full disk left a 0-byte config.yaml, which the re-run refused as "no cliplab
    run in this folder wrote", and a 0-byte adapter.json beside complete weights."""
    import torch

    from cliplab.adapt.base import Adapter
    from cliplab.runs import RunDir, check_no_foreign_files
    from tests.tiny_models import small_model

    class Tiny(Adapter):
        method = "tiny"

        def state(self):
            return {"w": torch.zeros(2)}

    run = RunDir(tmp_path / "ad")
    adapter = Tiny(small_model(), ["a", "b"], {})
    monkeypatch.setattr(Path, "write_text", _half_then_full)
    with pytest.raises(OSError):
        run.write_config({"out": str(run.path)})
    with pytest.raises(OSError):
        adapter.save(tmp_path / "saved")
    assert list(run.path.iterdir()) == []
    check_no_foreign_files(run.path)  # the same command takes the folder again
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["adapter.safetensors"]


def test_a_failed_atomic_write_names_its_file(tmp_path, monkeypatch):
    """Python's write names no file: the refusal named --out, not results.json."""
    from cliplab.output_folder import write_json

    monkeypatch.setattr(Path, "write_text", _full_disk)
    with pytest.raises(OSError) as raised:
        write_json(tmp_path / "results.json", {})
    assert raised.value.filename == str(tmp_path / "results.json")


def test_a_refused_open_of_the_temporary_file_names_the_users_file(tmp_path):
    """Out of inodes at the temporary file's creation (or its rename refused), the error named
    results.json.tmp, a file the user never asked for."""
    from cliplab.output_folder import atomic_path

    with pytest.raises(OSError) as raised:
        with atomic_path(tmp_path / "results.json") as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert raised.value.filename == str(tmp_path / "results.json")
