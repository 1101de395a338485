"""`cliplab pretrain` streaming WebDataset shards: training runs from `{source: shards,
stream: true}`, corrupt samples are skipped and counted, a resumed run ends bit-identical to
the uninterrupted one, and two torchrun ranks each stream their own shards."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from cliplab.data.shapes import load_shapes
from cliplab.data.shards import write_shards
from cliplab.data.sources import load_source
from cliplab.errors import ConfigError, DataError
from cliplab.models.preprocess import PreprocessConfig
from cliplab.train.pretrain import run_pretrain
from cliplab.train.stream_batches import StreamBatches, caption_key
from tests.tar_files import png_bytes, write_tar
from tests.torchrun_launch import torchrun

MODEL = {"name": "tiny-clip", "options": {"image_size": 16, "patch_size": 8, "width": 32,
                                            "layers": 1, "heads": 2, "embed_dim": 16,
                                            "context_length": 48}}



def _png(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Four shards of 24 `shapes` pairs plus a fifth holding 2 good and 2 corrupt samples."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(load_shapes(n=96, seed=0, kinds=("single",), image_size=32), out,
                 samples_per_shard=24, image_format="png", progress=False)
    (out / "index.json").unlink()  # the folder is then read as its sorted *.tar files
    write_tar(out / "00004.tar", [
        ("good0", {"png": _png(0), "txt": b"a red circle"}),
        ("broken", {"png": b"\x89PNG not an image", "txt": b"a red square"}),
        ("good1", {"png": _png(1), "txt": b"a blue circle"}),
        ("silent", {"png": _png(2), "txt": b"   "})])
    return out


def recipe(out: Path, shards: Path, **train) -> dict:
    return {"model": MODEL,
            "data": {"train": {"source": "shards", "path": str(shards), "stream": True,
                               "image_size": 32, "shuffle_buffer": 16}},
            "train": {"steps": 6, "batch_size": 16, "lr": 3e-3, "warmup": 1, "log_every": 1,
                      "augment": True, "progress": False, **train},
            "out": str(out)}


def test_caption_keys_are_stable_and_above_group_ids():
    assert caption_key("a red circle") == caption_key("a red circle")
    assert caption_key("a red circle") != caption_key("a red square")
    assert caption_key("x") >= 1 << 62
    batch = {"group": torch.tensor([3, -1, 3]), "caption": ["a", "b", "c"]}
    assert StreamBatches.keys(batch, True).tolist() == [3, caption_key("b"), 3]
    assert StreamBatches.keys(batch, False).tolist() == [caption_key(c) for c in "abc"]


def test_streamed_run_counts_corrupt_samples_and_resumes_bit_identical(shards, tmp_path):
    full = run_pretrain(recipe(tmp_path / "full", shards, save_every=2), progress=False)
    # 98 good samples in batches of 16: 6 steps per epoch; the corrupt pair is counted
    assert full["skipped"]["counts"] == {"unreadable_image": 1, "empty_caption": 1}
    assert full["skipped"]["keys"]["unreadable_image"] == ["00004.tar:broken"]
    state = torch.load(tmp_path / "full" / "checkpoints" / "step-2" / "trainer_state.pt",
                       weights_only=True)
    assert len(state["batches"]["ranks"]) == 1 and state["batches"]["ranks"][0]["in_epoch"] == 2

    resumed = recipe(tmp_path / "resumed", shards)
    run_pretrain(resumed, resume=str(tmp_path / "full" / "checkpoints" / "step-2"),
                 progress=False)
    a = load_file(tmp_path / "full" / "checkpoints" / "step-6" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-6" / "model" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def logged(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["epoch"]) for r in map(json.loads, lines) if "loss" in r]

    assert logged("resumed") == [r for r in logged("full") if r[0] > 2]  # the epoch counter too


def test_streamed_run_crosses_epochs(shards, tmp_path):
    results = run_pretrain(recipe(tmp_path / "run", shards, steps=None, epochs=2),
                           progress=False)
    assert results["train"]["step"] == 12 and results["train"]["epoch"] == 1
    assert results["skipped"]["total"] == 2  # a corrupt sample read in two epochs is one


def test_streaming_needs_shards_and_known_options(shards, tmp_path):
    cfg = recipe(tmp_path / "a", shards)
    cfg["data"]["train"] = {"source": "shapes", "stream": True}
    with pytest.raises(ConfigError, match="streams WebDataset shards"):
        run_pretrain(cfg, progress=False)
    cfg = recipe(tmp_path / "b", shards)
    cfg["data"]["train"]["shufle_buffer"] = 3
    with pytest.raises(ConfigError, match="shufle_buffer"):
        run_pretrain(cfg, progress=False)


def _torchrun_pretrain(cfg: Path, *args: str, module: str = "cliplab") -> None:
    done = torchrun("-m", module, "pretrain", "--config", str(cfg), "--no-progress", *args,
                    log_dir=cfg.parent / "torchrun-logs")
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_torchrun_ranks_stream_their_own_shards(shards, tmp_path):
    """...and a resumed two-rank run ends bit-identical to the uninterrupted one: each rank
    gets its own sample and augmentation generators back (they differ between ranks)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(recipe(tmp_path / "run", shards, save_every=3)))
    _torchrun_pretrain(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["step"] == 6
    # the corrupt shard belongs to one rank; the report gathers every rank's skips
    assert results["skipped"]["total"] == 2
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-3" / "trainer_state.pt",
                       weights_only=True)
    ranks = state["batches"]["ranks"]
    assert [r["stream"]["rank"] for r in ranks] == [0, 1]
    resumed = tmp_path / "resumed.yaml"
    resumed.write_text(yaml.safe_dump(recipe(tmp_path / "resumed", shards)))
    _torchrun_pretrain(resumed, "--resume", str(tmp_path / "run" / "checkpoints" / "step-3"))
    a = load_file(tmp_path / "run" / "checkpoints" / "step-6" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-6" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("n_shards", [1, 3, 4])
def test_shards_split_over_ranks_are_checked(n_shards, tmp_path, monkeypatch):
    """Ranks stop after the smallest rank's batches: 3 shards over 2 ranks leave one rank a
    shard where the other has two, so a third of the epoch goes unseen (warned); 1 shard leaves
    a rank nothing (refused: it said 'lower train.batch_size'); 4 split evenly (silent)."""
    from cliplab.data.shards import ShardLoader, ShardStream
    from cliplab.errors import DataError
    from cliplab.train.stream_batches import check_rank_split

    write_shards(load_shapes(n=24 * n_shards, seed=0, kinds=("single",), image_size=32),
                 tmp_path, samples_per_shard=24, image_format="png", progress=False)
    monkeypatch.setattr("cliplab.train.distributed.rank", lambda: 0)
    loader = ShardLoader(ShardStream(tmp_path, seed=0, rank=0, world_size=2), 8, 0,
                         drop_last=True)
    if n_shards == 1:
        with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}: 1 shard\(s\) for "
                           r"2 ranks leave rank\(s\) 1 without samples; write more, smaller "
                           r"shards"):
            check_rank_split(loader)
    elif n_shards == 3:
        with pytest.warns(UserWarning, match=r"3 shards split unevenly over 2 ranks "
                          r"\((48, 24|24, 48) samples\): every rank stops after the smallest "
                          r"rank's 3 batches, so 24 of 72 samples go unseen in an epoch"):
            check_rank_split(loader)
    else:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_rank_split(loader)


def test_a_streamed_checkpoint_of_two_ranks_names_the_launch_that_resumes_it(shards):
    batches = StreamBatches.from_spec({"source": "shards", "path": str(shards), "stream": True,
                                       "image_size": 32}, 16, 0)
    with pytest.raises(ConfigError, match=r"^cannot resume a streamed run saved with 2 rank\(s\) "
                       r"on 1: its checkpoint holds each rank's place in its own shards; resume "
                       r"it on 2 rank\(s\) \(torchrun --nproc-per-node 2\)$"):
        batches.load_state_dict({"ranks": [{}, {}]})


def test_shards_without_a_readable_batch_are_one_error_naming_them(tmp_path):
    """Every sample of a rank's shards unreadable: a bare StopIteration traceback before."""
    out = tmp_path / "bad"
    out.mkdir()
    write_tar(out / "00000.tar", [(f"s{i}", {"png": b"\x89PNG not an image", "txt": b"a cat"})
                                  for i in range(20)])
    with pytest.raises(DataError, match=r"^the shards \(00000\.tar\) gave no batch of 16 "
                       r"readable samples in a whole epoch \(skipped 20 samples: "
                       r"unreadable_image=20\); check or replace them$"):
        run_pretrain(recipe(tmp_path / "run", out), progress=False)


@pytest.mark.slow
def test_a_final_evaluation_longer_than_the_rank_timeout_finishes_a_streamed_run(shards,
                                                                                tmp_path,
                                                                                monkeypatch):
    """The ranks gathered their skip reports after the final evaluation: the others waited it
    out and the run failed past its timeout, with its results never written (in-memory runs
    finished). They are gathered before it now. Rank 0's evaluation sleeps past the timeout
    (an evaluation made long by its size was not longer on every machine, and the 1 s timeout
    that needed was outlasted by the ranks' start-up skew on a loaded one)."""
    cfg = recipe(tmp_path / "run", shards, steps=2, dist_timeout_s=8)
    cfg["eval"] = {"tasks": [{"name": "colour", "task": "zeroshot", "data": {
        "source": "shapes", "attribute": "color", "n": 200, "seed": 1, "image_size": 32}}]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("CLIPLAB_TEST_EVAL_SLEEP_S", "10")
    _torchrun_pretrain(path, module="tests.slow_eval_cliplab")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["step"] == 2 and results["evals"]["colour"]["n"] == 200


# images wider, taller, smaller and larger than a 16 px model's input, grey and colour
MIXED_SIZES = [(40, 40), (24, 24), (30, 96), (16, 16), (12, 20), (48, 32), (64, 64), (16, 16)]


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    """Two shards of 16 pairs whose images are of the sizes above (one in four grey)."""
    out = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for shard in range(2):
        samples = []
        for i in range(16):
            h, w = MIXED_SIZES[i % len(MIXED_SIZES)]
            shape = (h, w) if i % 4 == 3 else (h, w, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            samples.append((f"s{shard}_{i:02d}",
                            {"png": png_bytes(pixels), "txt": f"picture {shard} {i}".encode()}))
        write_tar(out / f"{shard:05d}.tar", samples)
    return out


def test_a_streamed_run_over_mixed_image_sizes_trains(mixed_shards, tmp_path):
    """Mixed sizes streamed without image_size stopped at the first batch that mixed them
    ("images of one batch differ in size"), while the same shards read whole trained."""
    cfg = recipe(tmp_path / "run", mixed_shards, steps=3, batch_size=8)
    del cfg["data"]["train"]["image_size"]
    results = run_pretrain(cfg, progress=False)
    assert results["train"]["step"] == 3


def test_streamed_and_whole_reads_give_a_model_the_same_pixels(mixed_shards):
    """Each image made the model's input by its preprocessing, as the whole read does."""
    model_input = PreprocessConfig(image_size=16)
    whole = load_source({"source": "shards", "path": str(mixed_shards)}, False, "data.train",
                        model_input)
    by_key = {key: whole.images[i].expand(-1, -1, 3) for i, key in enumerate(whole.keys)}
    batches = StreamBatches.from_spec({"source": "shards", "path": str(mixed_shards),
                                       "stream": True}, 8, 0, model_input)
    seen = 0
    for batch in batches.loader:
        for key, image in zip(batch["key"], batch["image"]):
            assert torch.equal(image, by_key[key]), key
            seen += 1
    assert seen == len(by_key) == 32


def test_a_model_that_pads_streams_images_as_stored(mixed_shards):
    """A model resizing 'longest' has no per-image input a whole read would match: its images
    come as stored (a set of one size streams; mixed sizes need image_size, told at the batch)."""
    model_input = PreprocessConfig(image_size=16, resize_mode="longest")
    batches = StreamBatches.from_spec({"source": "shards", "path": str(mixed_shards),
                                       "stream": True, "image_size": 12}, 8, 0, model_input)
    assert next(iter(batches.loader))["image"].shape == (8, 12, 12, 3)
    batches = StreamBatches.from_spec({"source": "shards", "path": str(mixed_shards),
                                       "stream": True}, 8, 0, model_input)
    with pytest.raises(DataError, match="images of one batch differ in size: .*give the "
                                        "stream image_size"):
        next(iter(batches.loader))
