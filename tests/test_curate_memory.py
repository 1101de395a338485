"""`cliplab curate` holds per item only its key, caption and source key, not the pool's
records (~2.9 KB an item: 37 GB for DataComp's 12.8M pool): a chunk's records are loaded from
the run's cache when a step maps it, the report shows it or the kept pool is written. What it
writes is the same however the pool is chunked and wherever a run was stopped."""

from __future__ import annotations

import json
import math
import re
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cliplab.curate.pipeline import run_curation
from cliplab.curate.steps import registry
from tests.test_curate_pipeline import Bright, config, dropped_rows


@pytest.fixture(autouse=True)
def bright_step(monkeypatch):
    monkeypatch.setitem(registry.STEPS, "bright", "tests.test_curate_pipeline:Bright")
    Bright.calls.clear()
    Bright.failed.clear()


def caption_pool(root, n, images=4):
    """A manifest of ``n`` rows naming ``images`` flat-colour PNGs (brightness by row), with
    captions repeating (exact duplicates, a head concept for balance)."""
    root.mkdir()
    for i in range(images):
        Image.new("RGB", (8, 8), (60 * i + 20,) * 3).save(root / f"im{i}.png")
    words = ["cat", "dog", "red", "fox", "owl", "tree", "house", "sky", "river", "a", "the"]
    lines = ["image,caption"]
    for i in range(n):
        caption = "a photo of a cat" if i % 5 == 0 else \
            " ".join(words[(i * k) % len(words)] for k in range(1, 4 + i % 6)) + f" {i % 97}"
        lines.append(f"im{i % images}.png,{caption}")
    (root / "pool.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "pool.csv"


STEPS = [{"step": "basic", "min_words": 3}, {"step": "bright", "threshold": 50},
         {"step": "exact_dedup", "match": "caption"}, {"step": "balance", "t": 4}]


def _written(out):
    """What a run wrote: kept shards' bytes, dropped rows, summary and report (minus seconds,
    provenance and the output's own path)."""
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    for key in ("cliplab", "created"):
        summary.pop(key, None)
    for step in summary["steps"]:
        step.pop("seconds")
    report = (out / "report.md").read_text(encoding="utf-8").replace(str(out), "OUT")
    report = re.sub(r"\| [0-9.]+ \|\n", "| S |\n", report)
    return {"shards": {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))},
            "dropped": dropped_rows(out), "summary": summary, "report": report}


def test_outputs_are_the_same_however_the_pool_is_chunked_and_where_a_run_stopped(tmp_path):
    """One chunk vs chunks of 7 (a chunk's records loaded back by offset) vs a run killed in
    its second step and resumed: the same kept samples in pool order, the same dropped rows,
    summary and report; every item is kept or dropped once."""
    manifest = caption_pool(tmp_path / "pool", 120)
    run_curation(config(str(manifest), STEPS, chunk_size=1000, examples=3), tmp_path / "one",
                 progress=False)
    run_curation(config(str(manifest), STEPS, chunk_size=7, examples=3), tmp_path / "seven",
                 progress=False)
    stopped = [dict(s, fail_on_chunk=5) if s["step"] == "bright" else s for s in STEPS]
    Bright.calls.clear()  # it fails on its sixth map call
    with pytest.raises(RuntimeError, match="killed"):
        run_curation(config(str(manifest), stopped, chunk_size=7, examples=3),
                     tmp_path / "resumed", progress=False)
    run_curation(config(str(manifest), stopped, chunk_size=7, examples=3), tmp_path / "resumed",
                 progress=False)
    one = _written(tmp_path / "one")
    assert _written(tmp_path / "seven") == one
    assert _written(tmp_path / "resumed") == one
    summary = one["summary"]
    assert [s["dropped"] for s in summary["steps"]][1:] != [0, 0, 0, 0]  # every step dropped
    assert all(s["dropped"] for s in summary["steps"][2:])
    # each item once, kept ones in pool order
    from cliplab.data.collection import iter_items

    kept = [json.loads(_json_member(item))["source_key"] for item in iter_items(
        {"source": "shards", "path": str(tmp_path / "one" / "shards")}, progress=False)]
    dropped = [row["key"] for row in one["dropped"]]
    pool = [item.key for item in iter_items({"source": "manifest", "path": str(manifest)},
                                            progress=False)]
    assert sorted(kept + dropped) == sorted(pool) and len(set(kept + dropped)) == len(pool)
    assert kept == [key for key in pool if key in set(kept)]
    by_step = [row["step"] for row in one["dropped"]]
    assert by_step == sorted(by_step, key=["read", *(s["step"] for s in STEPS)].index)
    assert pq.read_table(tmp_path / "one" / "dropped.parquet").num_rows == summary["dropped"]


def _json_member(item):
    import tarfile

    with tarfile.open(item.location["tar"]) as tar:
        return tar.extractfile(item.location["name"].rsplit(".", 1)[0] + ".json").read()


# bytes of Python memory per pool item a caption-only run may peak at, above a warmed-up
# process: 20k items measured ~1.7 KB with the pool's records held, ~745 B without, ~420 B with
# keys/captions as UTF-8 buffers, decision.json streamed, exact_dedup by a sort, not a dict
PEAK_BYTES_PER_ITEM = 580


def test_a_run_holds_a_few_hundred_bytes_per_item_not_its_records(tmp_path):
    steps = [{"step": "basic", "min_words": 3}, {"step": "exact_dedup", "match": "caption"}]
    small = caption_pool(tmp_path / "small", 50)
    run_curation(config(str(small), steps), tmp_path / "warm", progress=False)  # imports
    n = 20_000
    manifest = caption_pool(tmp_path / "pool", n)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        run_curation(config(str(manifest), steps), tmp_path / "out", progress=False)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert peak / n < PEAK_BYTES_PER_ITEM, f"{peak / n:.0f} bytes per item"


def worded_pool(root, n):
    """A manifest of ``n`` rows of one image whose captions are 9 to 13 of 40 words: ~20
    unigram and bigram entries of the pool's own matched per caption."""
    root.mkdir()
    Image.new("RGB", (8, 8), (90,) * 3).save(root / "im.png")
    words = [f"w{j}" for j in range(40)]
    lines = ["image,caption"] + [
        "im.png," + " ".join(words[(i * k + k * k) % len(words)] for k in range(1, 10 + i % 5))
        for i in range(n)]
    (root / "pool.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "pool.csv"


# bytes per pool item a balance run (the pool's n-grams, ~20 matched per pair) may peak at:
# 20k pairs measured ~380 B with a list of entry ids per pair, ~280 with them flat (Matches)
BALANCE_PEAK_BYTES_PER_ITEM = 330


def test_a_balance_run_holds_its_matches_flat(tmp_path, monkeypatch):
    from cliplab.curate.steps import balance

    steps = [{"step": "balance", "t": 20}]
    run_curation(config(str(worded_pool(tmp_path / "small", 50)), steps), tmp_path / "warm",
                 progress=False)
    # the arrays of a block of pairs drawn or counted at once are a fixed cost (at 20k pairs a
    # block would be the whole pool): small blocks leave what is held per pair
    monkeypatch.setattr(balance, "SAMPLE_PAIRS", 1024)
    monkeypatch.setattr(balance, "COUNT_PAIRS", 1024)
    n = 20_000
    manifest = worded_pool(tmp_path / "pool", n)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        summary = run_curation(config(str(manifest), steps), tmp_path / "out", progress=False)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert 0 < summary["steps"][1]["dropped"] < n  # balanced: head entries sampled down
    assert peak / n < BALANCE_PEAK_BYTES_PER_ITEM, f"{peak / n:.0f} bytes per item"


# bytes per caption `pool_ngrams` may peak at on a long-tailed pool (4 distinct n-grams a
# caption, 83% in one caption only): 20k captions measured ~385 B with a Counter of every
# n-gram, ~150 counting by text only those whose hash enough captions hold
NGRAM_PEAK_BYTES_PER_CAPTION = 250


def test_the_default_entries_count_by_text_only_ngrams_enough_captions_may_hold(monkeypatch):
    import random

    from cliplab.curate.steps import balance

    rng = random.Random(0)  # each word a Pareto-distributed rank: a few frequent, a long tail
    captions = [" ".join(f"w{int(rng.paretovariate(0.3))}" for _ in range(rng.randint(6, 12)))
                for _ in range(20_000)]
    balance.pool_ngrams(captions[:50], 2)  # imports
    # the hashes gathered before they are counted are a fixed cost (at 20k captions a block
    # would hold them all): a small block leaves what is held per n-gram
    monkeypatch.setattr(balance, "NGRAM_HASHES", 4096)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        entries = balance.pool_ngrams(captions, 2)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert 10_000 < len(entries) < 20_000  # most n-grams are in one caption: not entries
    assert peak / len(captions) < NGRAM_PEAK_BYTES_PER_CAPTION, \
        f"{peak / len(captions):.0f} bytes per caption"


def test_the_local_engine_loads_a_few_chunks_per_worker_not_every_chunk(tmp_path, monkeypatch):
    """Every chunk's records were submitted to the process pool at once (each held, pickled,
    until a worker took it): now two per worker are under way and the next loaded as one
    finishes; every chunk is still mapped and saved once."""
    from cliplab.curate import engine
    from cliplab.curate.engine import LazyChunks, map_chunks
    from tests.curate_slow_step import SlowStep

    marks = tmp_path / "marks"
    marks.mkdir()
    loaded: list[int] = []
    saved: list[int] = []

    def load(c):
        loaded.append(c)
        assert len(loaded) - len(saved) <= 2 * 2 + 1, (loaded, saved)  # in flight, + this one
        return [{"key": f"k{c}", "caption": "x", "meta": {}, "location": {}}]

    save = engine.save_columns
    monkeypatch.setattr(engine, "save_columns", lambda path, *a: saved.append(path) or
                        save(path, *a))
    map_chunks(SlowStep(str(marks), 0.05), LazyChunks({c: 1 for c in range(12)}, load),
               lambda c: tmp_path / f"{c}.npz", tmp_path, workers=2, progress=False)
    assert sorted(loaded) == list(range(12)) and len(saved) == 12
    assert sorted(p.name for p in marks.iterdir()) == sorted(f"mapped-k{c}" for c in range(12))


def test_a_pool_cache_file_changed_or_removed_under_the_run_is_a_clear_error(tmp_path):
    """The run reads a chunk's records again from its cache file when it maps or writes it; a
    file that lost a record wrote other items to kept.parquet without a word (keys shifted),
    and a removed one ended on a raw FileNotFoundError."""
    from cliplab.curate.pool_index import PoolIndex, chunk_path
    from cliplab.errors import DataError

    folder = tmp_path / "run.partial" / "cache" / "pool"
    folder.mkdir(parents=True)
    chunks = [[{"key": f"k{c}{i}", "caption": "x", "meta": {}} for i in range(3)]
              for c in range(2)]
    pool = PoolIndex(folder, lambda meta: None)
    for c, records in enumerate(chunks):
        chunk_path(folder, c).write_text(json.dumps({"records": records}), encoding="utf-8")
        pool.add_chunk(records)
    assert pool.records(1) == chunks[1]
    chunk_path(folder, 1).write_text(json.dumps({"records": chunks[1][1:]}), encoding="utf-8")
    with pytest.raises(DataError, match=r"000001\.json: the run's cache of the pool changed "
                                        r"since it was read; delete .*run\.partial to start"):
        pool.records(1)
    chunk_path(folder, 0).unlink()
    with pytest.raises(DataError, match=r"000000\.json: the run's cache of the pool cannot be "
                                        r"read again \("):
        pool.records(0)


def test_the_pool_columns_give_back_each_string_as_it_was_read():
    """`Texts` holds the pool's keys, captions and source keys as one UTF-8 buffer: each value
    comes back equal (None, an empty string, a lone surrogate of an undecodable path byte),
    by position, negative position, slice and iteration, across several extends."""
    from cliplab.curate.pool_index import Picked, Texts

    values = ["a", None, "", "caf\u00e9 \U0001f408", "bad\udce9name", "last"]
    texts = Texts()
    texts.extend(values[:2])
    texts.extend([])
    texts.extend(values[2:])
    assert len(texts) == len(values) and list(texts) == values
    assert [texts[i] for i in range(len(values))] == values and texts[-1] == "last"
    assert texts[1:4] == values[1:4] and texts[4:] == values[4:]
    with pytest.raises(IndexError):
        texts[len(values)]
    picked = Picked(texts, np.array([5, 3, 0]))
    assert list(picked) == ["last", values[3], "a"] and picked[1:] == [values[3], "a"]


def test_a_decision_is_written_as_it_is_encoded_with_the_bytes_a_whole_string_had(tmp_path):
    """A step's decision.json is encoded into its file (the whole text and then its bytes held
    ~300 bytes an item); the same bytes as `json_text`: NaN as null, numpy values plain."""
    from cliplab.output_folder import json_text, write_json_streamed

    data = {"keep": [True, False], "reasons": [None, "caf\u00e9 \udce9"],
            "scores": [0.5, math.nan], "threshold": np.float32(0.25),
            "report": {"files": {"a": tmp_path}, "n": np.int64(3)}, "seconds": 1.5}
    write_json_streamed(tmp_path / "d.json", data)
    assert (tmp_path / "d.json").read_bytes() == json_text(data).encode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]


def test_the_dropped_table_holds_a_reason_many_rows_share_once(tmp_path):
    """A balanced pool drops most of its items for a few texts: dropped.parquet's steps and
    reasons are held dictionary-encoded (each row's copy of its reason held ~150 bytes until
    the run's end) and written as the plain strings a table made at once has, byte for byte."""
    import pyarrow as pa

    from cliplab.curate.outputs import DROPPED_SCHEMA, DroppedTable

    reason = ("not drawn for any of its entries 'w1' (9000 pairs), 'w2' (8000 pairs) and 12 "
              "more (each kept with probability t/count, t=20)")
    rows = [{"key": f"k{i}", "step": "read", "reason": "unreadable image caf\u00e9",
             "score": math.nan, "source_key": "s"} for i in range(3)]
    rows += [{"key": f"k{i}", "step": "balance", "reason": None if i == 7 else reason,
              "score": 0.5 * i if i % 2 else math.nan, "source_key": None}
             for i in range(3, 20_003)]
    table = DroppedTable()
    table.add_rows(rows[:3])
    table.add([], "empty", [], [], [])
    for at in range(3, len(rows), 10_000):
        part = rows[at:at + 10_000]
        table.add([r["key"] for r in part], "balance", [r["reason"] for r in part],
                  [r["score"] for r in part], [r["source_key"] for r in part])
    held = sum(part["reason"].nbytes + part["step"].nbytes for part in table.parts)
    assert held / len(rows) < 20, f"{held / len(rows):.0f} bytes a row"  # 139 as text
    table.write(tmp_path / "dropped.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=DROPPED_SCHEMA), tmp_path / "whole.parquet")
    assert (tmp_path / "dropped.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    assert table.count == len(rows)
    empty = DroppedTable()
    empty.write(tmp_path / "empty.parquet")
    assert pq.read_table(tmp_path / "empty.parquet").schema == DROPPED_SCHEMA


def test_the_dropped_table_holds_distinct_reasons_plainly(tmp_path):
    """A step whose every reason differs (a duplicate names its original) is held as plain
    strings (a dictionary of them costs more: its indices, and a second copy when written);
    a table of such parts beside dictionary-encoded ones is written as one made at once."""
    import pyarrow as pa

    from cliplab.curate.outputs import DROPPED_SCHEMA, DroppedTable

    rows = [{"key": f"k{i}", "step": "exact_dedup", "reason": f"exact duplicate of k{i + 1}",
             "score": math.nan, "source_key": None} for i in range(1000)]
    rows += [{"key": f"b{i}", "step": "balance", "reason": "not drawn", "score": math.nan,
              "source_key": None} for i in range(1000)]
    table = DroppedTable()
    for at in (0, 1000):
        part = rows[at:at + 1000]
        table.add([r["key"] for r in part], part[0]["step"], [r["reason"] for r in part],
                  [r["score"] for r in part], [r["source_key"] for r in part])
    distinct, shared = table.parts[1], table.parts[2]
    assert distinct["reason"].type == pa.string()
    assert pa.types.is_dictionary(distinct["step"].type)
    assert pa.types.is_dictionary(shared["reason"].type)
    table.write(tmp_path / "dropped.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=DROPPED_SCHEMA), tmp_path / "whole.parquet")
    assert (tmp_path / "dropped.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
