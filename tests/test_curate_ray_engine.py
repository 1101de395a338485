"""The Ray engine's driver side (`cliplab.curate.ray_engine`) against a stand-in `ray` module
that runs its actors in process: how Ray is started, which chunks are mapped on a resumed run,
what is saved, and the errors; then (slow) on a real local Ray instance: each actor given the
prepared step once for the whole step, the chunks in flight bounded, a killed run resumed,
outputs byte for byte the local engine's. `test_curate_pipeline.py` runs a curation on Ray
against the local engine (slow)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplab.curate.ray_engine import map_chunks_ray, start_ray
from cliplab.errors import CliplabError, ConfigError


class FakeRay(types.ModuleType):
    """`ray` as far as the engine uses it: ``init`` / ``is_initialized`` recorded; actors
    (``remote(cls).options(...).remote(...)``) made in this process, each call run when it is
    made, its result an object ref (``get``, ``put``, ``kill`` as Ray's). ``wait`` gives an
    actor's ``ready`` answers first, then the refs in the order they were made, or the last
    first (``last_first``: results coming back out of order). The actors numbered in
    ``never_start`` are ones Ray cannot place (no free CPU): their calls never answer, and a
    ``wait`` on only such refs raises (Ray would wait for ever)."""

    def __init__(self, initialized: bool = False, last_first: bool = False,
                 never_start: frozenset[int] = frozenset()):
        super().__init__("ray")
        self.initialized, self.last_first, self.inits, self.calls = initialized, last_first, [], []
        self.never_start = never_start
        self.exceptions = types.SimpleNamespace(RayActorError=FakeActorDied)

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **options) -> None:
        self.inits.append(options)

    def shutdown(self) -> None:
        self.shutdowns = getattr(self, "shutdowns", 0) + 1
        self.initialized = False

    def put(self, value) -> "FakeRef":
        return FakeRef(value)

    def get(self, ref: "FakeRef"):
        if ref.died is not None:
            raise ref.died
        return ref.value

    def wait(self, refs: list, num_returns: int):
        refs = refs[::-1] if self.last_first else refs
        ready = sorted((r for r in refs if not r.pending), key=lambda r: not r.first)
        if len(ready) < num_returns:
            raise AssertionError(f"ray.wait on {len(refs)} refs of which {len(ready)} can "
                                 "ever be ready: Ray would wait for ever")
        return ready[:num_returns], [r for r in refs if r not in ready[:num_returns]]

    def kill(self, actor) -> None:
        self.calls.append(("kill", actor.number))

    def remote(self, cls):
        fake = self

        class ActorClass:
            def options(self, **options):
                fake.calls.append(("options", options))
                return self

            def remote(self, *args):
                values = [a.value if isinstance(a, FakeRef) else a for a in args]
                number = sum(call[0] == "actor" for call in fake.calls)
                fake.calls.append(("actor", number))
                return FakeActor(cls(*values), number, number not in fake.never_start)
        return ActorClass()


class FakeActorDied(Exception):
    """Ray's ``RayActorError`` (``ActorDiedError``): what ``get`` raises for a call whose actor
    died once its restarts ran out."""


class FakeRef:
    def __init__(self, value, pending: bool = False, first: bool = False,
                 died: FakeActorDied | None = None):
        self.value, self.pending, self.first, self.died = value, pending, first, died


class FakeActor:
    """An actor's handle: ``handle.method.remote(...)`` runs the method at once (never, on an
    actor not ``started``: its ref never answers)."""

    def __init__(self, instance, number: int, started: bool = True):
        self.instance, self.number, self.started = instance, number, started

    def __getattr__(self, name: str):
        method = getattr(self.instance, name)
        if not self.started:
            return types.SimpleNamespace(remote=lambda *args: FakeRef(None, pending=True))

        def call(*args) -> FakeRef:
            try:
                return FakeRef(method(*args), first=name == "ready")
            except FakeActorDied as died:  # the step's map "killed" its actor
                return FakeRef(None, died=died)
        return types.SimpleNamespace(remote=call)


@pytest.fixture
def fake_ray(monkeypatch):
    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    return ray


class MeanStep:
    """A step whose map gives each image's mean pixel (``short``: one value too few)."""

    def __init__(self, short: bool = False):
        self.short, self.mapped = short, []

    def map(self, batch):
        self.mapped.append(list(batch.keys))
        means = [float(np.asarray(im, dtype=float).mean()) for im in batch.images]
        return {"mean": np.array(means[:-1] if self.short else means)}


def pool(tmp_path, sizes):
    """Chunks of records of flat-colour PNGs: chunk c holds ``sizes[c]`` images of value 10·c + i."""
    chunks = {}
    for c, n in enumerate(sizes):
        chunks[c] = []
        for i in range(n):
            path = tmp_path / f"{c}-{i}.png"
            Image.fromarray(np.full((4, 4, 3), 10 * c + i, dtype=np.uint8)).save(path)
            chunks[c].append({"key": f"{c}-{i}", "caption": "x", "location": {"file": str(path)},
                              "meta": {}})
    return chunks


@pytest.fixture
def listening():
    """A local port that accepts connections (the head of a cluster, as far as TCP goes)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def test_start_ray_reaches_the_address_or_starts_a_local_instance_of_workers_cpus(monkeypatch,
                                                                                  listening):
    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    head = f"ray://127.0.0.1:{listening}"
    start_ray(head, 4)
    start_ray(None, 3)
    assert [{k: v for k, v in o.items() if k in ("address", "num_cpus")} for o in ray.inits] == [
        {"address": head}, {"num_cpus": 3}]
    started = FakeRay(initialized=True)  # a user's own ray.init() is kept
    monkeypatch.setitem(sys.modules, "ray", started)
    start_ray(head, 4)
    assert started.inits == []


def test_a_ray_started_for_a_curation_ends_with_it(monkeypatch):
    """A curation from Python left its local Ray running after it returned: ten processes,
    ~1 GB. A Ray the caller started (or connected to) is theirs and stays."""
    from cliplab.curate.ray_engine import ray_session

    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    with ray_session("ray"):
        ray.initialized = True  # as start_ray's ray.init leaves it
    assert ray.shutdowns == 1
    theirs = FakeRay(initialized=True)
    monkeypatch.setitem(sys.modules, "ray", theirs)
    with pytest.raises(RuntimeError), ray_session("ray"):
        raise RuntimeError("a step failed")
    with ray_session("local"):
        pass
    assert not hasattr(theirs, "shutdowns") and theirs.is_initialized()


def test_start_ray_keeps_cliplabs_sigterm_handler(monkeypatch):
    """ray.init puts its own SIGTERM handler in place (checked against real Ray: its
    ``init.<locals>.sigterm_handler``): a kill then aborted a curate run with SIGABRT, not
    the "cliplab: terminated" every other command says. The handler before it is put back."""
    import signal

    def ours(signum, frame):
        pass

    ray = FakeRay()
    ray.init = lambda **options: signal.signal(signal.SIGTERM, lambda s, f: None)
    monkeypatch.setitem(sys.modules, "ray", ray)
    before = signal.signal(signal.SIGTERM, ours)
    try:
        start_ray(None, 1)
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_address_nothing_answers_at_is_refused_at_once(monkeypatch, listening):
    """Ray retried its connection for minutes without a word (curate seemed to hang)."""
    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    for address, host, why in ((f"127.0.0.1:{port}", f"127.0.0.1:{port}", "Connection refused"),
                               (f"ray://127.0.0.1:{port}", f"127.0.0.1:{port}",
                                "Connection refused"),
                               ("notahost.invalid:6379", "notahost.invalid:6379", "")):
        with pytest.raises(ConfigError, match=rf"^ray_address {address}: nothing answers at "
                           rf"{host} \({why}"):
            start_ray(address, 2)
    assert ray.inits == []
    start_ray("auto", 2)  # Ray's own ways of finding a cluster are left to it
    start_ray(f"127.0.0.1:{listening}", 2)
    assert [o["address"] for o in ray.inits] == ["auto", f"127.0.0.1:{listening}"]


def test_start_ray_without_ray_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"^engine: ray needs Ray: pip install "
                                          r"'cliplab\[ray\]'$"):
        start_ray(None, 1)


def test_a_resumed_run_maps_only_the_chunks_without_columns_and_saves_each(tmp_path, fake_ray):
    """Chunk 0's columns exist (a killed run saved them): only chunks 1 and 2 are sent to Ray, on
    min(workers, 2) actors of a CPU each, one chunk per call; chunk 0's file is left as it was;
    each saved column is the step's value per item (the image's flat value)."""
    chunks = pool(tmp_path, [2, 3, 1])
    out = tmp_path / "cols"
    out.mkdir()
    (out / "0.npz").write_bytes(b"saved before the kill")
    step = MeanStep()
    map_chunks_ray(step, chunks, lambda c: out / f"{c}.npz", tmp_path, workers=4,
                   progress=False)
    assert fake_ray.calls == [
        ("options", {"num_cpus": 1, "max_restarts": 3, "max_task_retries": 3}),
        ("actor", 0), ("actor", 1), ("kill", 0), ("kill", 1)]
    assert step.mapped == [["1-0", "1-1", "1-2"], ["2-0"]]
    assert (out / "0.npz").read_bytes() == b"saved before the kill"
    for c, expected in ((1, [10, 11, 12]), (2, [20])):
        with np.load(out / f"{c}.npz") as saved:
            assert saved["mean"].tolist() == expected
    # run again: everything is saved, so Ray is not asked for anything (no actor is started)
    fake_ray.calls.clear()
    map_chunks_ray(step, chunks, lambda c: out / f"{c}.npz", tmp_path, workers=4,
                   progress=False)
    assert fake_ray.calls == []


def test_chunks_go_only_to_actors_that_started_and_the_others_are_killed(tmp_path,
                                                                        monkeypatch):
    """Ray with fewer free CPUs than ``--workers`` (a cluster's, or a caller's
    ``ray.init(num_cpus=1)``) cannot place every actor: the chunks queued on one that never
    started were never mapped and the step waited for ever. Chunks now go only to actors that
    answered ``ready``; the one that never did is killed at the end with the others."""
    ray = FakeRay(never_start=frozenset({1}))
    monkeypatch.setitem(sys.modules, "ray", ray)
    chunks = pool(tmp_path, [1] * 6)
    step = MeanStep()
    map_chunks_ray(step, chunks, lambda c: tmp_path / f"{c}.npz", tmp_path, workers=3,
                   progress=False)
    assert sorted(keys[0] for keys in step.mapped) == [f"{c}-0" for c in range(6)]
    assert all((tmp_path / f"{c}.npz").is_file() for c in range(6))
    assert sorted(call[1] for call in ray.calls if call[0] == "kill") == [0, 1, 2]


def test_a_chunk_that_kills_its_actor_each_time_is_one_line_naming_the_step_and_chunk(
        tmp_path, fake_ray):
    """A chunk that kills its actor every time (out of memory, a native crash) was retried
    for ever (no limit on restarts): the run never ended. Ray now gives up after
    `RAY_RETRIES` and its actor-died error is one line, as the local engine's `WorkerDied`;
    the chunks saved before it are kept."""
    from cliplab.curate.engine import WorkerDied

    class DyingStep(MeanStep):
        def map(self, batch):
            if batch.keys[0].startswith("1-"):
                raise FakeActorDied("ActorDiedError: The actor died unexpectedly ...")
            return super().map(batch)

    chunks = pool(tmp_path, [1, 1, 1])
    with pytest.raises(WorkerDied) as died:
        map_chunks_ray(DyingStep(), chunks, lambda c: tmp_path / f"{c}.npz", tmp_path,
                       workers=1, desc="01-clip_score", progress=False)
    assert str(died.value) == (
        "step 01-clip_score chunk 1: the Ray actor mapping it (or a chunk queued with it) died "
        "4 times (killed, or out of memory?); the chunks finished are kept: run the same "
        "command again to resume (with fewer --workers if memory is short)")
    assert died.value.__cause__ is None and died.value.__suppress_context__
    assert (tmp_path / "0.npz").is_file() and not (tmp_path / "1.npz").exists()


def test_a_failing_kill_hides_no_error_and_spares_no_actor(tmp_path, fake_ray, monkeypatch):
    """The actors are killed at a step's end; a ``ray.kill`` that fails (Ray's connection gone,
    often why the map failed) raised its own error in place of the map's, left the other
    actors running and the bar open. Each actor is still tried and the map's error raised."""
    import cliplab.curate.ray_engine as ray_engine

    def kill(actor) -> None:
        fake_ray.calls.append(("kill", actor.number))
        raise ConnectionError("GCS is gone")
    fake_ray.kill = kill
    bars = []
    made = ray_engine.chunk_progress
    monkeypatch.setattr(ray_engine, "chunk_progress", lambda *a: bars.append(made(*a)) or bars[-1])
    with pytest.raises(CliplabError, match=r"^step s chunk 0: map column 'mean' must be"):
        map_chunks_ray(MeanStep(short=True), pool(tmp_path, [2, 2]),
                       lambda c: tmp_path / f"{c}.npz", tmp_path, workers=2, desc="step s")
    assert [call for call in fake_ray.calls if call[0] == "kill"] == [("kill", 0), ("kill", 1)]
    assert len(bars) == 1 and bars[0].disable


def test_one_worker_maps_on_one_actor_and_no_progress_draws_no_bar(tmp_path, fake_ray, capsys):
    chunks = pool(tmp_path, [1, 1, 1])
    map_chunks_ray(MeanStep(), chunks, lambda c: tmp_path / f"{c}.npz", tmp_path, workers=1,
                   desc="mean", progress=False)
    assert [c for c in fake_ray.calls if c[0] == "actor"] == [("actor", 0)]
    assert capsys.readouterr().err == ""


def test_a_short_map_column_names_its_chunk(tmp_path, fake_ray):
    chunks = pool(tmp_path, [2, 2])
    with pytest.raises(CliplabError, match=r"^step s chunk 0: map column 'mean' must be"):
        map_chunks_ray(MeanStep(short=True), chunks, lambda c: tmp_path / f"{c}.npz", tmp_path,
                       desc="step s", progress=False)
    assert not list(tmp_path.glob("*.npz"))


def test_the_progress_bar_counts_every_item_and_closes_on_an_error(tmp_path, fake_ray, capsys,
                                                                    monkeypatch):
    """As the local engine's: the total is the whole pool with saved chunks already counted,
    and a failing map leaves the bar closed (tqdm's close disables it)."""
    import cliplab.curate.ray_engine as ray_engine

    chunks = pool(tmp_path, [2, 3])
    (tmp_path / "0.npz").write_bytes(b"done")
    map_chunks_ray(MeanStep(), chunks, lambda c: tmp_path / f"{c}.npz", tmp_path, desc="mean")
    err = capsys.readouterr().err
    assert "5/5" in err and "2/5" in err
    (tmp_path / "1.npz").unlink()
    bars = []
    made = ray_engine.chunk_progress
    monkeypatch.setattr(ray_engine, "chunk_progress", lambda *a: bars.append(made(*a)) or bars[-1])
    with pytest.raises(CliplabError):
        map_chunks_ray(MeanStep(short=True), chunks, lambda c: tmp_path / f"{c}.npz", tmp_path,
                       desc="mean")
    assert len(bars) == 1 and bars[0].disable


def test_an_image_gone_since_the_read_is_the_one_line_error_not_rays_wrapped_one(tmp_path,
                                                                                 fake_ray):
    """Raised in an actor, the error reached the driver as a Ray ``RayTaskError``: a page of
    traceback that does not keep its cause. The actor hands it back as its row's ``error``;
    the driver raises it as it was, after saving the chunks mapped before it."""
    from cliplab.curate.pool import SourceChanged

    chunks = pool(tmp_path, [2, 2])
    (tmp_path / "1-1.png").unlink()
    with pytest.raises(SourceChanged) as gone:
        map_chunks_ray(MeanStep(), chunks, lambda c: tmp_path / f"{c}.npz", tmp_path,
                       desc="mean", progress=False)
    assert str(gone.value).startswith(f"item 1-1: its image at {tmp_path / '1-1.png'} can no "
                                      "longer be read (No such file or directory): the "
                                      "source changed")
    assert (tmp_path / "0.npz").is_file() and not (tmp_path / "1.npz").exists()


def test_ray_address_in_the_environment_connects_as_ray_does_without_cpus(monkeypatch,
                                                                          listening):
    """With ``RAY_ADDRESS`` set (``ray job submit`` sets it) ``ray.init(num_cpus=...)`` is Ray
    connecting to that cluster with a CPU count, which it refuses (a traceback once the pool
    was read). It is connected to as ``ray_address`` is; ``ray_address`` wins; ``local`` is
    Ray's own word for a local instance."""
    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    head = f"127.0.0.1:{listening}"
    monkeypatch.setenv("RAY_ADDRESS", head)
    start_ray(None, 3)
    start_ray(f"ray://{head}", 3)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    start_ray(None, 2)
    monkeypatch.setenv("RAY_ADDRESS", "")
    start_ray(None, 1)
    assert [{k: v for k, v in o.items() if k in ("address", "num_cpus")} for o in ray.inits] == [
        {"address": head}, {"address": f"ray://{head}"}, {"num_cpus": 2}, {"num_cpus": 1}]


def test_a_ray_address_nothing_answers_at_is_refused_before_the_pool_is_read(
        tmp_path, monkeypatch, capsys):
    """The engine started only once the pool was read: a cluster nothing answers at (here
    ``RAY_ADDRESS``'s) is one line before any work, no ``OUT.partial`` left behind."""
    from cliplab.cli import main
    from cliplab.output_folder import partial_path

    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    monkeypatch.setitem(sys.modules, "ray", FakeRay())
    folder = tmp_path / "pool"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {folder}\nsteps:\n  - {{step: exact_dedup}}\n", encoding="utf-8")
    assert main(["curate", "--config", str(path), "--out", str(tmp_path / "out"),
                 "--no-progress", "--engine", "ray"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"cliplab: error: RAY_ADDRESS 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port} "
        "(Connection refused); start the cluster there (ray start --head), or unset "
        "RAY_ADDRESS for a local instance")
    assert not partial_path(tmp_path / "out").exists()


def test_the_chunks_in_flight_are_bounded_and_saved_in_whatever_order_they_come_back(
        tmp_path, monkeypatch):
    """The driver sends a chunk's records only while the items in flight stay within
    ``RAY_ITEMS_IN_FLIGHT`` (each actor is given one chunk however large), at most two per
    actor; results coming back out of order are saved by chunk number: the files are byte
    for byte the local engine's."""
    import cliplab.curate.ray_engine as ray_engine
    from cliplab.curate.engine import LazyChunks, map_chunks

    monkeypatch.setitem(sys.modules, "ray", FakeRay(last_first=True))
    monkeypatch.setattr(ray_engine, "RAY_ITEMS_IN_FLIGHT", 3)
    save = ray_engine.save_columns
    records = pool(tmp_path, [1] * 10)
    (tmp_path / "local").mkdir()
    map_chunks(MeanStep(), records, lambda c: tmp_path / "local" / f"{c}.npz", tmp_path)
    for size, most in ((1, 3), (5, 2)):  # 3 one-item chunks; one 5-item chunk per actor
        chunks = {c: rows * size for c, rows in records.items()}
        saved, in_flight = [], []

        def load(c):
            in_flight.append(c)
            assert len(in_flight) <= most, in_flight
            return chunks[c]

        def saving(path, *a):
            saved.append(int(path.stem))
            in_flight.remove(int(path.stem))
            save(path, *a)
        monkeypatch.setattr(ray_engine, "save_columns", saving)
        folder = tmp_path / f"ray{size}"
        folder.mkdir()
        map_chunks_ray(MeanStep(), LazyChunks({c: size for c in chunks}, load),
                       lambda c: folder / f"{c}.npz", tmp_path, workers=2, progress=False)
        assert sorted(saved) == list(range(10)) and saved != sorted(saved)  # out of order
    assert all((tmp_path / "ray1" / f"{c}.npz").read_bytes() ==
               (tmp_path / "local" / f"{c}.npz").read_bytes() for c in range(10))


class RecordingStep:
    """A step without images that records (in ``marks``) each time it reaches an actor (it is
    unpickled there: the prepared step arriving; dfn then loads its network, basic its
    language identifier) and each chunk it maps; with ``hold``, chunk 0 waits until another
    chunk was mapped, so it comes back after it. Its columns: each caption's length and key."""

    needs_images = False

    def __init__(self, marks: Path, hold: bool = False):
        self.marks, self.hold = str(marks), hold

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        with open(Path(self.marks) / "received", "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")

    def map(self, batch):
        chunk = batch.keys[0].split("-")[0]
        waited = 0.0
        while self.hold and chunk == "0" and not marked(Path(self.marks), "mapped"):
            assert waited < 60, "no other chunk was mapped"
            time.sleep(0.05)
            waited += 0.05
        with open(Path(self.marks) / "mapped", "a", encoding="utf-8") as f:
            f.write(f"{chunk}\n")
        return {"length": np.array([len(c) for c in batch.captions]),
                "key": np.array(batch.keys)}


def marked(marks: Path, name: str) -> list[str]:
    path = marks / name
    return path.read_text(encoding="utf-8").split() if path.exists() else []


def plain_pool(sizes: list[int]) -> dict[int, list[dict]]:
    """Chunks of records without images: chunk c holds ``sizes[c]`` items."""
    return {c: [{"key": f"{c}-{i}", "caption": "x" * (i % 7), "location": {}, "meta": {}}
                for i in range(n)] for c, n in enumerate(sizes)}


@pytest.fixture(scope="module")
def real_ray():
    """A local Ray instance of 2 CPUs for the module's slow tests, its session files in a
    folder of its own (short: Ray's socket paths must fit in 107 bytes), removed after."""
    ray = pytest.importorskip("ray")
    sessions = tempfile.mkdtemp(prefix="ray-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=sessions)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(sessions, ignore_errors=True)


def local_reference(records, tmp_path):
    """The marks folder a `RecordingStep` records in, after the local engine has written the
    files of ``records`` to tmp_path/local (tmp_path/ray made for Ray's)."""
    from cliplab.curate.engine import map_chunks

    marks = tmp_path / "marks"
    marks.mkdir()
    for folder in ("local", "ray"):
        (tmp_path / folder).mkdir()
    map_chunks(RecordingStep(marks), records, lambda c: tmp_path / "local" / f"{c}.npz",
               tmp_path)
    return marks


@pytest.mark.slow
def test_each_actor_gets_the_prepared_step_once_for_the_whole_step(tmp_path, real_ray,
                                                                   monkeypatch):
    """Ray was given a step's chunks ~200k items at a time, each time on a new pool of actors:
    each actor received the prepared step (a model step's model) again for every 200k items
    (a 10M pool: 50 times). Now one set of actors maps the whole step, each receiving it once;
    the records in flight stay bounded (two chunks per actor here, 120k items); chunks come
    back out of order and are saved by number, byte for byte the local engine's files."""
    import cliplab.curate.ray_engine as ray_engine
    from cliplab.curate.engine import LazyChunks

    records = plain_pool([30_000] * 8)  # 240k items: more than one old group
    marks = local_reference(records, tmp_path)
    (marks / "mapped").unlink()
    loaded, saved = [], []

    def load(c):
        loaded.append(c)
        assert len(loaded) - len(saved) <= 4, (loaded, saved)  # 2 actors x 2 chunks
        return records[c]
    save = ray_engine.save_columns
    monkeypatch.setattr(ray_engine, "save_columns", lambda path, *a: (
        saved.append(int(path.stem)), save(path, *a)))
    map_chunks_ray(RecordingStep(marks, hold=True), LazyChunks({c: 30_000 for c in records}, load),
                   lambda c: tmp_path / "ray" / f"{c}.npz", tmp_path, workers=2,
                   progress=False)
    received = marked(marks, "received")
    assert len(received) == 2 and len(set(received)) == 2  # once per actor, two actors
    assert sorted(saved) == list(range(8)) and saved[0] != 0  # chunk 0 came back later
    for c in range(8):
        assert ((tmp_path / "ray" / f"{c}.npz").read_bytes() ==
                (tmp_path / "local" / f"{c}.npz").read_bytes())


@pytest.mark.slow
def test_a_ray_run_stopped_midway_resumes_with_the_chunks_it_had_not_saved(tmp_path, real_ray,
                                                                          monkeypatch):
    """Stopped (Ctrl-C, a kill) after saving two chunks: the actors are stopped and the run
    again maps only the chunks without columns; its files are the local engine's."""
    import cliplab.curate.ray_engine as ray_engine

    records = plain_pool([10] * 6)
    marks = local_reference(records, tmp_path)
    save = ray_engine.save_columns

    def stopped_at_the_third(path, *a):
        if len(list((tmp_path / "ray").glob("*.npz"))) == 2:
            raise KeyboardInterrupt
        save(path, *a)
    monkeypatch.setattr(ray_engine, "save_columns", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        map_chunks_ray(RecordingStep(marks), records, lambda c: tmp_path / "ray" / f"{c}.npz",
                       tmp_path, workers=2, progress=False)
    done = sorted(int(p.stem) for p in (tmp_path / "ray").glob("*.npz"))
    assert len(done) == 2
    # marks of their own: ray.kill is not waited for, a killed actor may still mark its chunk
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    monkeypatch.setattr(ray_engine, "save_columns", save)
    map_chunks_ray(RecordingStep(resumed), records, lambda c: tmp_path / "ray" / f"{c}.npz",
                   tmp_path, workers=2, progress=False)
    assert sorted(map(int, marked(resumed, "mapped"))) == [c for c in range(6) if c not in done]
    for c in range(6):
        assert ((tmp_path / "ray" / f"{c}.npz").read_bytes() ==
                (tmp_path / "local" / f"{c}.npz").read_bytes())


@pytest.mark.slow
def test_an_image_gone_is_raised_on_the_driver_as_itself_from_a_real_actor(tmp_path, real_ray):
    """As with the stand-in: the actor hands the `SourceChanged` back and the driver raises it,
    one line, not Ray's page of traceback."""
    from cliplab.curate.pool import SourceChanged

    chunks = pool(tmp_path, [2, 2])
    (tmp_path / "1-1.png").unlink()
    (tmp_path / "cols").mkdir()
    with pytest.raises(SourceChanged) as gone:
        map_chunks_ray(MeanStep(), chunks, lambda c: tmp_path / "cols" / f"{c}.npz", tmp_path,
                       workers=2, desc="mean", progress=False)
    assert str(gone.value).startswith(f"item 1-1: its image at {tmp_path / '1-1.png'} can no "
                                      "longer be read (No such file or directory): the "
                                      "source changed")
    assert not (tmp_path / "cols" / "1.npz").exists()


@pytest.mark.slow
@pytest.mark.timeout(120, method="thread")  # Ray's wait holds off SIGALRM
def test_a_step_finishes_on_the_actors_ray_can_place(tmp_path, real_ray):
    """More ``--workers`` than free CPUs (3 actors of a CPU each on a 2-CPU Ray): the actor
    Ray could not place never started, the chunks queued on it were never mapped and the
    step waited for ever. It finishes on the two that started; the third is killed."""
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "cols").mkdir()
    map_chunks_ray(RecordingStep(marks), plain_pool([5] * 8),
                   lambda c: tmp_path / "cols" / f"{c}.npz", tmp_path, workers=3,
                   progress=False)
    assert sorted(int(p.stem) for p in (tmp_path / "cols").glob("*.npz")) == list(range(8))
    assert sorted(map(int, marked(marks, "mapped"))) == list(range(8))


class ExitingStep(RecordingStep):
    """A `RecordingStep` whose map ends its own process on chunk 1 (as the OOM killer or a
    native crash would), each time it is tried."""

    def map(self, batch):
        if batch.keys[0].startswith("1-"):
            os._exit(1)
        return super().map(batch)


@pytest.mark.slow
@pytest.mark.timeout(180, method="thread")  # Ray's wait holds off SIGALRM
def test_a_chunk_that_kills_its_real_actor_each_time_ends_the_step_in_one_line(tmp_path,
                                                                             real_ray):
    """On real Ray: the chunk was retried on a restarted actor for ever; now `RAY_RETRIES`
    times, then the one-line `WorkerDied` naming the step and the chunk (chunk 0, queued on
    the same actor, may be the one named: its answer is lost with the actor each time)."""
    from cliplab.curate.engine import WorkerDied

    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "cols").mkdir()
    with pytest.raises(WorkerDied, match=r"^step exit chunk [01]: the Ray actor mapping it "
                       r"\(or a chunk queued with it\) died 4 times"):
        map_chunks_ray(ExitingStep(marks), plain_pool([5] * 3),
                       lambda c: tmp_path / "cols" / f"{c}.npz", tmp_path, workers=1,
                       desc="exit", progress=False)
    assert not (tmp_path / "cols" / "1.npz").exists()
    assert len(marked(marks, "received")) == 4  # built once, restarted 3 times
