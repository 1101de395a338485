"""The Ray engine's driver side (`cliplab.curate.ray_engine`) against a stand-in `ray` module
that runs Ray Data's calls in process: how Ray is started, which chunks are mapped on a resumed
run, what is saved, and the errors. `test_curate_pipeline.py` runs the engine on a real local
Ray instance against the local engine (slow)."""

from __future__ import annotations

import socket
import sys
import types

import numpy as np
import pytest
from PIL import Image

from cliplab.curate.ray_engine import map_chunks_ray, start_ray
from cliplab.errors import CliplabError, ConfigError


class FakeRay(types.ModuleType):
    """`ray` as far as the engine uses it: ``init`` / ``is_initialized`` recorded, Ray Data's
    ``from_items(...).map_batches(...)`` run in this process, one batch per call."""

    def __init__(self, initialized: bool = False):
        super().__init__("ray")
        self.initialized, self.inits, self.calls = initialized, [], []
        context = types.SimpleNamespace(enable_progress_bars=True)
        self.data = types.SimpleNamespace(
            DataContext=types.SimpleNamespace(get_current=lambda: context),
            from_items=self._from_items,
            ActorPoolStrategy=lambda size: ("actors", size))

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **options) -> None:
        self.inits.append(options)

    def shutdown(self) -> None:
        self.shutdowns = getattr(self, "shutdowns", 0) + 1
        self.initialized = False

    def _from_items(self, items, override_num_blocks):
        self.calls.append(("from_items", [i["chunk"] for i in items], override_num_blocks))
        if not items:
            raise ValueError("parallelism must be -1 or > 0")  # as Ray Data does
        fake = self

        class Dataset:
            def map_batches(self, cls, fn_constructor_args, batch_size, compute):
                fake.calls.append(("map_batches", batch_size, compute))
                mapper = cls(*fn_constructor_args)

                class Mapped:
                    def iter_rows(self):
                        for item in items:
                            out = mapper({"chunk": np.array([item["chunk"]]),
                                          "records": np.array([item["records"]], dtype=object)})
                            yield {name: column[0] for name, column in out.items()}
                return Mapped()
        return Dataset()


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
    assert ray.data.DataContext.get_current().enable_progress_bars is False
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
    with pytest.raises(ConfigError, match=r"^engine: ray needs Ray Data: pip install "
                                          r"'cliplab\[ray\]'$"):
        start_ray(None, 1)


def test_a_resumed_run_maps_only_the_chunks_without_columns_and_saves_each(tmp_path, fake_ray):
    """Chunk 0's columns exist (a killed run saved them): only chunks 1 and 2 are sent to Ray, in
    one block each on min(workers, 2) actors, one chunk per batch; chunk 0's file is left as it
    was; each saved column is the step's value per item (the image's flat value)."""
    chunks = pool(tmp_path, [2, 3, 1])
    out = tmp_path / "cols"
    out.mkdir()
    (out / "0.npz").write_bytes(b"saved before the kill")
    step = MeanStep()
    map_chunks_ray(step, chunks, lambda c: out / f"{c}.npz", tmp_path, workers=4,
                   progress=False)
    assert fake_ray.calls == [("from_items", [1, 2], 2), ("map_batches", 1, ("actors", 2))]
    assert step.mapped == [["1-0", "1-1", "1-2"], ["2-0"]]
    assert (out / "0.npz").read_bytes() == b"saved before the kill"
    for c, expected in ((1, [10, 11, 12]), (2, [20])):
        with np.load(out / f"{c}.npz") as saved:
            assert saved["mean"].tolist() == expected
    # run again: everything is saved, so Ray is not asked for anything (an empty dataset is
    # an error in Ray Data)
    fake_ray.calls.clear()
    map_chunks_ray(step, chunks, lambda c: out / f"{c}.npz", tmp_path, workers=4,
                   progress=False)
    assert fake_ray.calls == []


def test_one_worker_maps_on_one_actor_and_no_progress_draws_no_bar(tmp_path, fake_ray, capsys):
    chunks = pool(tmp_path, [1, 1, 1])
    map_chunks_ray(MeanStep(), chunks, lambda c: tmp_path / f"{c}.npz", tmp_path, workers=1,
                   desc="mean", progress=False)
    assert fake_ray.calls[1] == ("map_batches", 1, ("actors", 1))
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
