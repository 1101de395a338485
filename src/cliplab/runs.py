"""Run folders: ``config.yaml`` (and ``start_model.json``: the model a fresh run started from),
``metrics.jsonl`` (+ TensorBoard event files beside it) and ``checkpoints/step-N/`` written
atomically.

Every numeric value of a logged record is also a TensorBoard scalar at the record's ``step``,
so ``tensorboard --logdir runs/`` shows loss, lr, logit scale, throughput and eval metrics.
TensorBoard logging is on when the ``tensorboard`` package is importable, unless turned off
with ``RunDir(..., tensorboard=False)`` or ``CLIPLAB_TENSORBOARD=0`` (a training run without
the package says once that it writes no event files).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from cliplab.errors import ConfigError
from cliplab.extras import installed
from cliplab.output_folder import (check_apart_from_inputs, check_writable, hold, json_text,
                                   same_folder, write_json, write_utf8)
from cliplab.output_lock import check_no_run_inside, check_not_held, is_left_lock

CHECKPOINTS = "checkpoints"
SUPERSEDED = "superseded"  # checkpoints past the step a run was resumed from
TENSORBOARD_ENV = "CLIPLAB_TENSORBOARD"
# what a run writes first (output_folder.RUN_MARKERS, by which other commands tell a run folder)
CONFIG_FILE, METRICS_FILE = "config.yaml", "metrics.jsonl"
RESULTS_FILE = "results.json"  # written last: a run without it never finished
RUN_RECORDS = (CHECKPOINTS, METRICS_FILE, RESULTS_FILE)  # a run that got under way
START_MODEL_FILE = "start_model.json"  # the model a fresh run started from, beside config.yaml
STARTED_FILES = (CONFIG_FILE, START_MODEL_FILE)  # what a run writes before its first step


def default_run_dir(kind: str) -> Path:
    """``runs/<kind>-<YYYYmmdd-HHMMSS>`` under the current directory (``-2``, ``-3``, ... after
    it when runs started within the same second, so two runs never share a folder)."""
    base = Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def tensorboard_available() -> bool:
    """Whether TensorBoard event files can be written (the ``tensorboard`` package is there)."""
    return installed("tensorboard")


def tensorboard_wanted(flag: bool | None = None) -> bool:
    """``flag`` if given; else on unless ``CLIPLAB_TENSORBOARD`` is 0/false/no/off; and only
    when the package is importable."""
    if flag is None:
        flag = not tensorboard_turned_off()
    return bool(flag) and tensorboard_available()


def tensorboard_turned_off() -> bool:
    """Whether ``CLIPLAB_TENSORBOARD`` is 0/false/no/off."""
    return os.environ.get(TENSORBOARD_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def checkpoint_step(folder: Path) -> int | None:
    """N of a complete ``step-N`` checkpoint folder, else None (temp folders, other names)."""
    prefix, _, number = folder.name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() and folder.is_dir() else None


def latest_checkpoint(run_path: str | Path) -> Path | None:
    """The complete checkpoint of run folder ``run_path`` with the highest step, if any."""
    folder = Path(run_path) / CHECKPOINTS
    if not folder.is_dir():
        return None
    steps = [(step, p) for p in folder.iterdir() if (step := checkpoint_step(p)) is not None]
    return max(steps)[1] if steps else None


def check_new_run(out: str | Path, resume: str | None = None, resumable: bool = False) -> None:
    """Refuse to start a run in a folder that already holds one (its checkpoints, metrics or
    results would mix with the new run's, and ``--model OUT`` would load whichever step is
    highest); continuing it needs ``resume`` (a ``resumable`` command's), and
    ``resume="latest"`` needs a checkpoint."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the run")
    newest = latest_checkpoint(out)
    held = [name for name in RUN_RECORDS if (out / name).exists()]
    if held and (resume is None or resume == "latest" and newest is None):
        check_not_held(out)  # refused below, unless a live run writes it: that is said then
    if resume == "latest" and newest is None:
        stopped = " (its run stopped before its first checkpoint: remove it or choose a new " \
                  "--out)" if held else "; start without --resume"
        raise ConfigError(f"--resume latest: {out} holds no checkpoint to continue{stopped}")
    if resume is not None:
        return
    if held:
        what = f"checkpoints up to {newest.name}" if newest else ", ".join(held)
        complete = (out / RESULTS_FILE).exists()  # only a longer length goes on from there
        way_on = ("" if not (resumable and newest) else "extend it with --resume latest and a "
                  "longer train.steps or train.epochs, or " if complete else
                  "continue it with --resume latest, or ")
        stopped = ", stopped before its first checkpoint" if not newest and resumable else ""
        raise ConfigError(f"--out {out} already holds a run ({what}{stopped}); {way_on}choose "
                          "a new --out" + ("" if way_on else " or remove it"))


def check_run_out(out: str | Path, inputs: Iterable[str | None] = (), resume: str | None = None,
                  resumable: bool = False) -> None:
    """Every check of a run's ``--out`` before any work: no other run there (`check_new_run`),
    not an input nor holding or inside one (`check_apart_from_inputs`), no file of the user's
    (`check_no_foreign_files`)."""
    check_new_run(out, resume, resumable)
    check_apart_from_inputs(out, inputs)
    check_writable(out)
    hold(out)
    check_no_foreign_files(out)


def check_no_foreign_files(out: str | Path) -> None:
    """Refuse an ``--out`` that holds no run (`check_new_run` deals with one) yet is not empty:
    the run would write its config.yaml over a file of that name, and mix its files with the
    rest. What an attempt of cliplab stopped before it logged anything leaves there is allowed:
    the config.yaml a run writes first (`RUN_MARKERS`), written for this very folder
    (`is_own_config`), and the start_model.json beside it; an attempt that logged
    (metrics.jsonl) is a run, refused or resumed by `check_new_run`. Call it after the checks
    against the command's inputs."""
    out = Path(out)
    if not out.is_dir() or any((out / name).exists() for name in RUN_RECORDS):
        return
    check_no_run_inside(out)
    own = is_own_config(out)
    # a killed run's lock of an output inside this folder is cliplab's (`is_left_lock`)
    foreign = sorted(p.name for p in out.iterdir()
                     if not (own and p.name in STARTED_FILES) and not is_left_lock(p))
    if foreign:
        if own:  # beside this folder's own config.yaml: a run stopped before its end
            raise ConfigError(f"--out {out} holds {foreign[0]} beside the config.yaml of a run "
                              "of this folder stopped before its end; a new run needs a new or "
                              "empty folder (its files are left as they are): choose another "
                              "--out, or delete the stopped run's folder")
        raise ConfigError(f"--out {out} holds {foreign[0]}, which no cliplab run in this folder "
                          "wrote; a new run needs a new or empty folder (its files are left as "
                          "they are): choose another --out")


def is_own_config(folder: str | Path) -> bool:
    """Whether ``folder/config.yaml`` is one `RunDir.write_config` wrote for a run in
    ``folder``: its text is exactly the dump of what it holds (no comments, cliplab's layout)
    and its ``out`` is this folder. A recipe of the user's (comments, its own layout), or a run's
    config copied from another run folder, is not."""
    path = Path(folder) / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
        config = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    if not isinstance(config, dict) or not isinstance(config.get("out"), str):
        return False
    return text == _dump(config) and same_folder(Path(config["out"]).expanduser().resolve(),
                                                 Path(folder).expanduser().resolve())


def _dump(config: dict) -> str:
    """config.yaml's text for ``config`` (how every run writes it)."""
    return yaml.safe_dump(config, sort_keys=False)



def _record_step(line: str) -> float:
    """The ``step`` of a metrics.jsonl line (a line without one, or unreadable: -inf, kept)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return float("-inf")
    return step if isinstance(step, (int, float)) else float("-inf")


@contextmanager
def removed_if_unstarted(path: str | Path, existed: bool) -> Iterator[None]:
    """Run the block; if it fails while the run folder ``path`` (made by this command:
    ``existed`` is False) holds nothing but its ``config.yaml`` (and ``start_model.json``),
    remove the folder, so a run refused at its start (a batch larger than the data, ...) or
    stopped there (Ctrl-C, SIGTERM) leaves nothing behind."""
    try:
        yield
    except BaseException:  # a stop too: each Ctrl-C'd quickstart left a folder of its config
        path = Path(path)
        if not existed and path.is_dir() and \
                {p.name for p in path.iterdir() if not is_left_lock(p)} <= set(STARTED_FILES):
            shutil.rmtree(path, ignore_errors=True)  # other ranks may be removing it too
        raise


@contextmanager
def removed_unless_checkpointed(path: str | Path, existed: bool, command: str
                                ) -> Iterator[None]:
    """`removed_if_unstarted`, and for a ``command`` that cannot resume a run: stopped
    (Ctrl-C, SIGTERM) before its first complete checkpoint, what the run wrote is removed (the
    folder, or in a folder that was there before, its logs beside config.yaml), so its --out
    takes the same command again; stopped after one, the folder is kept and said on stderr."""
    try:
        with removed_if_unstarted(path, existed):
            yield
    except KeyboardInterrupt:
        path = Path(path)
        if path.is_dir():
            _after_stop(path, existed, command)
        raise


def _after_stop(run: Path, existed: bool, command: str) -> None:
    """A stopped, non-resumable run folder: removed as half-built, or kept (with checkpoints)
    and said."""
    newest = latest_checkpoint(run)
    if newest is not None:
        held = sorted(p.name for p in newest.iterdir() if p.is_dir())  # model/ or adapter/
        what = f"each {CHECKPOINTS}/step-N/{held[0]}" if held else "its checkpoints"
        print(f"{command}: stopped; {run} keeps its checkpoints up to {newest.name} ({what} "
              f"is what the run had trained), but {command} does not resume a run, so that "
              "--out is refused: remove it or choose another", file=sys.stderr)
    elif not existed:
        shutil.rmtree(run, ignore_errors=True)
    else:  # the user's folder: only what the run logged goes, its config.yaml may stay
        for item in [run / METRICS_FILE, run / CHECKPOINTS, *run.glob("events.out.tfevents.*")]:
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            elif item.exists():
                item.unlink()


def restart_unsaved_run(out: str | Path, command: str) -> bool:
    """Clear a run folder whose run stopped before its first complete checkpoint (an error such
    as a full disk, a kill), for ``--resume auto``, which then starts the run there: there is
    nothing to resume from. What the attempt logged goes (metrics.jsonl, TensorBoard events,
    an unfinished checkpoints/step-N.tmp); its config.yaml stays. A failure itself keeps them
    (`removed_if_unstarted`: a diverged run's record is read by ``cliplab report``); only this
    explicit restart clears them. Touches only a folder holding nothing but such a run's own
    files (`is_own_config`); returns whether it cleared one."""
    out = Path(out)
    if not out.is_dir() or latest_checkpoint(out) is not None or not is_own_config(out):
        return False
    events = list(out.glob("events.out.tfevents.*"))
    ours = {*STARTED_FILES, METRICS_FILE, CHECKPOINTS, *(p.name for p in events)}
    checkpoints = out / CHECKPOINTS
    unfinished = list(checkpoints.iterdir()) if checkpoints.is_dir() else []
    other = any(p.name not in ours and not is_left_lock(p) for p in out.iterdir())
    if other or (checkpoints.exists() and (
            not checkpoints.is_dir() or any(not (p.is_dir() and p.name.endswith(".tmp"))
                                            for p in unfinished))):
        return False  # anything else: check_new_run refuses it, untouched
    if not (out / METRICS_FILE).exists() and not checkpoints.exists():
        return False  # only its config: the run starts over it anyway
    if os.environ.get("RANK", "0") != "0":
        try:  # held: by this job's rank 0, which cleared it, or a live run rank 0 refuses
            check_not_held(out)
        except ConfigError:
            return False
    else:  # a live run that has not saved yet is no stopped one: never cleared under it
        check_not_held(out)
        print(f"{command}: {out} holds a run stopped before its first checkpoint (nothing to "
              "resume from): starting it again (--resume auto)", file=sys.stderr)
    # every rank clears (each checks the folder next); ranks may be removing it together
    shutil.rmtree(checkpoints, ignore_errors=True)
    for item in [out / METRICS_FILE, *events]:
        item.unlink(missing_ok=True)
    return True


def _wait_to_name_events_after(folder: Path) -> None:
    """Wait (under a second) until a new event file's name sorts after those in ``folder``.

    TensorBoard reads a folder's event files in name order and applies a writer's purge to the
    files before its own. A name holds the second, the pid and a per-process counter, so a writer
    opened in the same second as an earlier one could sort before it (counter 10 < 9 as text) and
    have its purge undone."""
    seconds = [int(parts[3]) for parts in
               (p.name.split(".") for p in folder.glob("events.out.tfevents.*"))
               if len(parts) > 3 and parts[3].isdigit()]
    if seconds:
        wait = max(seconds) + 1 - time.time()
        if 0 < wait <= 1:  # a file from the future (clock changed) is not waited for
            time.sleep(wait)


class RunDir:
    """The folder one run writes everything into.

    ``tensorboard``: write event files beside metrics.jsonl (None: on when available and not
    turned off by ``CLIPLAB_TENSORBOARD=0``)."""

    def __init__(self, path: str | Path, tensorboard: bool | None = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_file = self.path / METRICS_FILE
        self.tensorboard = tensorboard_wanted(tensorboard)
        self._writer = None  # made at the first record, so ranks that never log write nothing
        self._purge_step: int | None = None  # TensorBoard events from this step on are stale
        self._replay: list[dict] = []  # records to write again to TensorBoard after the purge

    def write_config(self, config: dict) -> None:
        """config.yaml, written atomically: a full disk left a 0-byte one, which the re-run
        then refused as not written by cliplab."""
        write_utf8(self.path / CONFIG_FILE, _dump(config))

    def log(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl and its numbers to the TensorBoard events."""
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(json_text(record) + "\n")
        if self.tensorboard:
            self._log_scalars(record)

    def drop_records_after(self, step: int) -> None:
        """Forget what was logged after ``step`` (a resume from that step's checkpoint logs
        those steps again): metrics.jsonl keeps its records up to ``step``, and TensorBoard
        purges its later events when it next writes."""
        self._keep_lines(lambda line: _record_step(line) <= step)
        self._purge_from(step + 1)

    def drop_records_at(self, step: int, keep: Callable[[dict], bool]) -> None:
        """Forget the records of ``step`` but those ``keep(record)`` accepts (e.g. an
        evaluation about to be redone); TensorBoard purges its events from ``step`` on and is
        given the kept records again."""
        def kept(line: str) -> bool:
            if _record_step(line) != step:
                return True
            record = json.loads(line)
            return isinstance(record, dict) and keep(record)
        self._keep_lines(kept)
        self._purge_from(step)
        self._replay = [r for r in self.records()
                        if isinstance(r.get("step"), int) and r["step"] >= step]

    def _purge_from(self, step: int) -> None:
        """TensorBoard drops the events from ``step`` on when its writer next opens (closed
        now, so the purge also reaches a writer this process already had)."""
        self.close()
        self._purge_step, self._replay = step, []

    def records(self) -> list[dict]:
        """The readable records of metrics.jsonl, in order (none without the file)."""
        if not self.metrics_file.is_file():
            return []
        out = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def _keep_lines(self, keep: Callable[[str], bool]) -> None:
        """Rewrite metrics.jsonl (atomically) with only the lines ``keep`` accepts."""
        if not self.metrics_file.is_file():
            return
        lines = self.metrics_file.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if keep(line)]
        if len(kept) < len(lines):
            write_utf8(self.metrics_file, "".join(kept))

    def _log_scalars(self, record: dict) -> None:
        step = record.get("step")
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        if not scalars:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            _wait_to_name_events_after(self.path)
            self._writer = SummaryWriter(log_dir=str(self.path), purge_step=self._purge_step)
            # purged once: a writer reopened later must not drop what this one writes
            replay, self._replay, self._purge_step = self._replay, [], None
            for kept in replay:
                self._log_scalars(kept)
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()  # a killed run keeps every record it logged

    def close(self) -> None:
        """Close the TensorBoard writer (logging again reopens one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write_json(self, name: str, data: dict) -> Path:
        """``name`` in the run folder, written atomically (`output_folder.write_json`)."""
        path = self.path / name
        write_json(path, data)
        return path

    def checkpoint_dir(self, step: int) -> Path:
        return self.path / CHECKPOINTS / f"step-{step}"

    def atomic_checkpoint(self, step: int, write) -> Path:
        """Call ``write(tmp_folder)`` then rename the folder to ``checkpoints/step-N``, so a run
        killed mid-write never leaves a half checkpoint under the final name; one whose write
        fails (a full disk) leaves no half of it behind either."""
        final = self.checkpoint_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def latest_checkpoint(self) -> Path | None:
        """The complete checkpoint with the highest step, if any."""
        return latest_checkpoint(self.path)

    def set_aside_checkpoints_after(self, step: int) -> list[Path]:
        """Move the complete checkpoints past ``step`` to ``superseded/`` (a resume from an
        earlier checkpoint: they hold the run before it, whose records past ``step`` are
        dropped, and ``--resume latest`` would continue them); returns their new places."""
        folder = self.path / CHECKPOINTS
        later = sorted(p for p in folder.iterdir()
                       if (n := checkpoint_step(p)) is not None and n > step) \
            if folder.is_dir() else []
        return [self._set_aside(path) for path in later]

    def set_aside_results(self) -> Path | None:
        """Move the run's results.json to ``superseded/`` (a resume that trains again: it
        describes the run before, whose final checkpoint may be set aside); its new place, or
        None when there was none."""
        results = self.path / RESULTS_FILE
        return self._set_aside(results) if results.is_file() else None

    def _set_aside(self, path: Path) -> Path:
        """Move ``path`` into ``superseded/``, numbered after what an earlier resume put there."""
        target, n = self.path / SUPERSEDED / path.name, 2
        while target.exists():  # set aside by an earlier resume too
            target, n = self.path / SUPERSEDED / f"{path.stem}-{n}{path.suffix}", n + 1
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        return target

    def keep_newest_checkpoints(self, keep: int, step: int) -> list[Path]:
        """Remove the complete checkpoints before the newest ``keep`` up to ``step`` (the one
        just saved, always kept; later steps are left alone); returns the removed folders."""
        folder = self.path / CHECKPOINTS
        steps = sorted((n, p) for p in folder.iterdir()
                       if (n := checkpoint_step(p)) is not None and n <= step) \
            if folder.is_dir() else []
        old = [p for _, p in steps[:-keep]] if keep > 0 else []
        for path in old:
            shutil.rmtree(path)
        return old
