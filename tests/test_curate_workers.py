"""The local engine's worker processes end with the process that started them: killed (kill -9,
the OOM killer), it cannot stop its pool, and a spawned worker blocked on the pool's queue
never saw it close (python/cpython#111873) — each kept ~450 MB for ever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

POOL = textwrap.dedent("""
    import os, time
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    from cliplab.curate.engine import _exit_with_parent

    if __name__ == "__main__":
        pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"),
                                   initializer=_exit_with_parent)
        print(pool.submit(os.getpid).result(), flush=True)
        pool.submit(time.sleep, 600)
        time.sleep(600)
""")


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:  # a zombie (exited, not yet reaped by whoever adopted it) is gone
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_worker_exits_when_its_parent_is_killed(tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(POOL)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = 0
    try:
        worker = int(parent.stdout.readline())
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 60  # at once in fact: the sentinel closes with the parent
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if worker and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_worker_takes_its_parents_warning_filters_and_form(capsys):
    """Spawned workers started with Python's filters and display: a script's
    `filterwarnings("ignore", category=CliplabWarning)` did not reach them, and under the
    command line their warnings came in Python's source-line form."""
    import warnings

    from cliplab.curate import engine
    from cliplab.errors import CliplabWarning, show_warning_on_one_line, warn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CliplabWarning)
        filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.resetwarnings()
        engine._init_worker(None, filters, one_line=False)
        warn("silenced in the parent")
        assert warnings.showwarning is not show_warning_on_one_line
    with warnings.catch_warnings():
        engine._init_worker(None, [("always", None, Warning, None, 0)], one_line=True)
        warn("said on one line")
    engine._WORKER_STEP.clear()
    assert capsys.readouterr().err == "cliplab: warning: said on one line\n"
