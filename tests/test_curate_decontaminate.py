"""The decontaminate step on a Fashion-MNIST pool with planted copies of evaluation images."""

import contextlib

import numpy as np
import pytest
from PIL import Image

from cliplab.curate.steps import decontaminate
from cliplab.curate.steps.base import PoolBatch, PoolItems, StepContext
from cliplab.curate.steps.decontaminate import Decontaminate, Spec, eval_set_specs
from cliplab.curate.steps.registry import make_step, step_spec
from cliplab.data.sources import load_source
from cliplab.errors import ConfigError

EVAL = {"source": "fashion-mnist", "split": "test", "limit": 100}
EXACT = [3, 17, 42, 60, 99]  # evaluation images planted as they are
EDITED = [5, 20, 33, 71, 88]  # ... and resized to 40 px with Gaussian noise (sigma 8)


def _pil(image) -> Image.Image:
    return Image.fromarray(image.numpy()[..., 0]).convert("RGB")


def _edited(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    array = np.asarray(image.resize((40, 40), Image.BILINEAR), dtype=float)
    return Image.fromarray(np.clip(array + rng.normal(0, 8, array.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pool() -> tuple[PoolBatch, dict[str, str]]:
    """300 Fashion-MNIST training images with the 10 planted copies spread through them;
    ``planted`` maps each planted key to the evaluation image it copies."""
    rng = np.random.default_rng(0)
    evals = [_pil(im) for im in load_source(EVAL).images]
    others = [_pil(im) for im in load_source({"source": "fashion-mnist", "limit": 300}).images]
    images, keys, planted = list(others), [f"train#{i}" for i in range(300)], {}
    for j, i in enumerate(EXACT + EDITED):
        copy = evals[i] if i in EXACT else _edited(evals[i], rng)
        at = 30 * j + 7
        images.insert(at, copy)
        keys.insert(at, f"planted-{i}")
        planted[f"planted-{i}"] = f"eval_sets[0]:fashion-mnist#{i}"
    return PoolBatch(keys, [f"caption {k}" for k in keys], images), planted


def pixel_embeddings(model, images, batch_size=64, progress=False):
    """A stand-in for a trained model: the mean-centred 8x8 grey thumbnail, unit length
    (copies score >= 0.9993 against their original, other pool images <= 0.9981)."""
    x = np.stack([np.asarray(im.convert("L").resize((8, 8), Image.BILINEAR), np.float32).ravel()
                  for im in images])
    x -= x.mean(1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run(spec: Spec, batch: PoolBatch, work, chunks: int = 3):
    step = make_step(spec)
    step.prepare(StepContext(work=work))
    parts = [step.map(PoolBatch(batch.keys[s], batch.captions[s], batch.images[s]))
             for s in (slice(i, None, chunks) for i in range(chunks))]
    order = np.concatenate([np.arange(len(batch))[i::chunks] for i in range(chunks)])
    inverse = np.argsort(order)
    columns = {k: np.concatenate([p[k] for p in parts])[inverse] for k in parts[0]}
    return step.decide(PoolItems(batch.keys, batch.captions), columns)


def dropped(decision, batch):
    return {k for k, kept in zip(batch.keys, decision.keep) if not kept}


def test_hamming_distances_by_hand_and_numpy_1s_byte_table_equals_bitwise_count():
    """The distances of packed 64-bit hashes; the byte-table path (NumPy 1.x, no
    ``bitwise_count``) gives the same numbers."""
    a = np.array([0, 2**64 - 1], dtype=np.uint64)
    b = np.array([0, 5, 2**63, 2**64 - 1], dtype=np.uint64)
    want = np.array([[0, 2, 1, 64], [64, 62, 63, 0]])
    assert np.array_equal(decontaminate.hamming(a, b), want)
    assert np.array_equal(decontaminate.bit_counts(a[:, None] ^ b[None, :]), want)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**63, (50, 70), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    by_python = [[bin(int(v)).count("1") for v in row] for row in x]  # NumPy 1.x has no
    assert np.array_equal(decontaminate.bit_counts(x), np.array(by_python))  # bitwise_count


def test_perceptual_hash_alone_finds_the_exact_and_most_edited_copies_and_nothing_else(
        pool, tmp_path):
    """Measured on this pool: exact copies are at hash distance 0, the edited ones at 0, 2, 4,
    4 and 8 (pHash of a 28 px image upscaled and noised), every other image at >= 6; so at
    ``hash_distance: 4`` the hash alone misses the one edited copy at 8 (the embedding finds it,
    see the next tests) and drops nothing else."""
    batch, planted = pool
    spec = step_spec({"step": "decontaminate", "eval_sets": [EVAL], "threshold": None,
                      "hash_distance": 4}, "test")
    decision = run(spec, batch, tmp_path)
    assert dropped(decision, batch) == set(planted) - {"planted-71"}
    matches = {m["key"]: m for m in decision.report["matches"]}
    assert {k: m["match"] for k, m in matches.items()} == {
        k: v for k, v in planted.items() if k != "planted-71"}
    for i in EXACT:
        assert matches[f"planted-{i}"]["hash_distance"] == 0
        assert matches[f"planted-{i}"]["similarity"] is None  # no model, no cosine
    thumb = Image.open(matches["planted-42"]["match_image"])
    assert np.array_equal(np.asarray(thumb.convert("RGB")),
                          np.asarray(_pil(load_source(EVAL).images[42])))
    reason = decision.reasons[batch.keys.index("planted-42")]
    assert reason == ("near duplicate of evaluation image eval_sets[0]:fashion-mnist#42 "
                      "(hash distance 0 <= 4)")


def test_an_exact_copy_of_a_non_square_evaluation_image_is_found_whatever_the_sets_sizes(
        tmp_path):
    """An evaluation folder of mixed sizes is held as centre squares; the pool's copy of its
    40x30 image was hashed whole, a quarter off, and kept even at hash distance 0. Both sides
    are hashed in the centre-square frame: the copy is at 0, another image is not matched, in
    a set of mixed sizes and in one of a single (non-square) size."""
    rng = np.random.default_rng(0)

    def noise(height, width):
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    land, other = noise(30, 40), noise(30, 40)
    for name, sizes in (("mixed", [(30, 40), (40, 30), (50, 50)]), ("one_size", [(30, 40)])):
        folder = tmp_path / name / "a"
        folder.mkdir(parents=True)
        land.save(folder / "land.png")
        for i, (height, width) in enumerate(sizes[1:]):
            noise(height, width).save(folder / f"x{i}.png")
        spec = step_spec({"step": "decontaminate", "threshold": None, "hash_distance": 0,
                          "eval_sets": [{"source": "image-folder", "path": str(tmp_path / name)}]},
                         "test")
        batch = PoolBatch(["copy", "other"], ["c", "o"], [land.copy(), other])
        with pytest.warns(UserWarning) if len(sizes) > 1 else contextlib.nullcontext():
            decision = run(spec, batch, tmp_path / f"work_{name}", chunks=1)
        assert decision.keep.tolist() == [False, True], name
        assert decision.report["matches"][0]["hash_distance"] == 0


def _mixed_sizes_folder(root, rng) -> list:
    """An image folder of five noise images whose shorter sides (48, 40, 64, 30, 40) differ
    from their median (40) but for two; the file paths, in class order."""
    sizes = [(48, 48), (40, 40), (64, 64), (30, 96), (56, 40)]
    paths = []
    for i, (height, width) in enumerate(sizes):
        path = root / ("a" if i % 2 else "b") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("source", ["image-folder", "manifest"])
def test_exact_copies_of_an_evaluation_set_of_mixed_sizes_are_at_hash_distance_0(
        tmp_path, source):
    """A set of mixed sizes is held as squares of its median shorter side; its 48 and 64 px
    files were resized to 40 px before hashing while the pool's copies were hashed at their own
    size, so they were at distance 2-4 and kept at ``hash_distance: 0``. The pool is hashed at
    the set's side too: every exact copy is at 0, an unrelated image is kept."""
    rng = np.random.default_rng(1)
    paths = _mixed_sizes_folder(tmp_path / "evals", rng)
    data = {"source": "image-folder", "path": str(tmp_path / "evals")}
    if source == "manifest":
        manifest = tmp_path / "evals.csv"
        manifest.write_text("image,caption\n" + "".join(f"{p},photo {i}\n"
                                                        for i, p in enumerate(paths)),
                            encoding="utf-8")
        data = {"source": "manifest", "path": str(manifest)}
    spec = step_spec({"step": "decontaminate", "threshold": None, "hash_distance": 0,
                      "eval_sets": [data]}, "test")
    copies = [Image.open(p).convert("RGB") for p in paths]
    other = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    keys = [f"copy-{i}" for i in range(len(paths))] + ["other"]
    batch = PoolBatch(keys, keys, copies + [other])
    with pytest.warns(UserWarning, match="are made 40x40 squares"):
        decision = run(spec, batch, tmp_path / "work", chunks=2)
    assert decision.keep.tolist() == [False] * len(paths) + [True]
    assert [m["hash_distance"] for m in decision.report["matches"]] == [0] * len(paths)


def test_exact_copies_of_an_evaluation_set_given_image_size_are_at_hash_distance_0(tmp_path):
    """A set given ``image_size: N`` is held as N x N images (its files squashed); the pool's
    copies were hashed as centre squares, exact copies of non-square files at distance 18-24."""
    rng = np.random.default_rng(2)
    paths = _mixed_sizes_folder(tmp_path / "evals", rng)
    spec = step_spec({"step": "decontaminate", "threshold": None, "hash_distance": 0,
                      "eval_sets": [{"source": "image-folder", "path": str(tmp_path / "evals"),
                                     "image_size": 24}]}, "test")
    copies = [Image.open(p).convert("RGB") for p in paths]
    batch = PoolBatch([f"copy-{i}" for i in range(len(paths))],
                      [f"copy-{i}" for i in range(len(paths))], copies)
    decision = run(spec, batch, tmp_path / "work", chunks=2)
    assert [m["hash_distance"] for m in decision.report["matches"]] == [0] * len(paths)
    assert not decision.keep.any()


def test_embedding_alone_finds_every_planted_copy_and_nothing_else(pool, tmp_path, monkeypatch):
    monkeypatch.setattr(decontaminate, "embed_images", pixel_embeddings)
    batch, planted = pool
    spec = Spec(step="decontaminate", model="tiny-clip", eval_sets=[EVAL], threshold=0.999,
                hash_distance=None)
    decision = run(spec, batch, tmp_path)
    assert dropped(decision, batch) == set(planted)
    assert decision.threshold == 0.999 and decision.scores.shape == (len(batch),)
    for m in decision.report["matches"]:
        assert m["similarity"] >= 0.999 and m["match"] == planted[m["key"]]
    assert "cosine 1.000 >= 0.999" in decision.reasons[batch.keys.index("planted-3")]


def test_either_signal_drops_an_item(pool, tmp_path, monkeypatch):
    """OR: with both signals every copy goes; each reason names the signals that fired (the
    edited copy at hash distance 8 falls to the cosine alone)."""
    monkeypatch.setattr(decontaminate, "embed_images", pixel_embeddings)
    batch, planted = pool
    spec = Spec(step="decontaminate", model="tiny-clip", eval_sets=[EVAL], threshold=0.999,
                hash_distance=4)
    decision = run(spec, batch, tmp_path)
    assert dropped(decision, batch) == set(planted)
    exact = decision.reasons[batch.keys.index("planted-17")]
    assert "cosine 1.000 >= 0.999" in exact and "hash distance 0 <= 4" in exact
    edited = decision.reasons[batch.keys.index("planted-71")]
    assert "cosine" in edited and "hash distance" not in edited
    match = next(m for m in decision.report["matches"] if m["key"] == "planted-71")
    assert match["hash_distance"] == 8 and match["similarity"] >= 0.999


def test_a_cosine_equal_to_the_threshold_is_a_match(tmp_path, monkeypatch):
    """decide on hand-made columns: cosine 0.5 reaches threshold 0.5 (dropped), 0.25 does
    not (kept); both exactly representable, so no rounding decides."""
    step = Decontaminate(Spec(step="decontaminate", model="tiny-clip", eval_sets=[EVAL],
                              threshold=0.5, hash_distance=None))
    step.labels = ["eval_sets[0]:fashion-mnist#0"]
    monkeypatch.setattr(step, "_thumbnail", lambda index: tmp_path / f"{index}.png")
    columns = {"cosine": np.array([0.5, 0.25], np.float32), "cosine_match": np.zeros(2, int),
               "cosine_match_hash_distance": np.array([30, 30]),
               "hash_distance": np.array([30, 30])}
    decision = step.decide(PoolItems(["a", "b"], ["", ""]), columns)
    assert decision.keep.tolist() == [False, True]
    assert decision.reasons[0] == ("near duplicate of evaluation image "
                                   "eval_sets[0]:fashion-mnist#0 (cosine 0.500 >= 0.500)")


def test_a_cosine_just_over_the_threshold_reads_over_it_in_the_reason(tmp_path, monkeypatch):
    """Cosine 0.9504 against threshold 0.95 read "cosine 0.950 >= 0.95" (three decimals)."""
    step = Decontaminate(Spec(step="decontaminate", model="tiny-clip", eval_sets=[EVAL],
                              threshold=0.95, hash_distance=None))
    step.labels = ["eval_sets[0]:fashion-mnist#0"]
    monkeypatch.setattr(step, "_thumbnail", lambda index: tmp_path / f"{index}.png")
    columns = {"cosine": np.array([0.9504], np.float32), "cosine_match": np.zeros(1, int),
               "cosine_match_hash_distance": np.array([30]), "hash_distance": np.array([30])}
    decision = step.decide(PoolItems(["a"], [""]), columns)
    assert decision.reasons[0].endswith("(cosine 0.9504 >= 0.9500)")


def test_the_eval_sets_of_a_suite_are_used_once_each(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n"
                     "  - {name: zs, task: zeroshot, data: {source: digits, split: test}}\n"
                     "  - {name: zs2, task: zeroshot, data: {source: digits, split: test}}\n"
                     "  - {name: probe, task: linear_probe, train: {source: digits, split: train},"
                     " test: {source: digits, split: test}}\n")
    spec = Spec(step="decontaminate", suite=str(suite), threshold=None)
    assert eval_set_specs(spec) == [("suite:zs:digits", {"source": "digits", "split": "test"}),
                                    ("suite:probe:digits", {"source": "digits", "split": "train"})]
    step = Decontaminate(spec)
    step.prepare(StepContext(work=tmp_path))
    assert len(step.labels) == 1797  # every digit once (the train and test splits)


@pytest.mark.parametrize("data, message", [
    ({"step": "decontaminate", "threshold": None}, "give eval_sets"),
    ({"step": "decontaminate", "eval_sets": [EVAL]}, "threshold (embedding similarity) needs a model"),
    ({"step": "decontaminate", "eval_sets": [{"split": "test"}], "threshold": None},
     "eval_sets[0] needs 'source: NAME'"),
    ({"step": "decontaminate", "eval_sets": [EVAL], "threshold": None, "hash_distance": None},
     "nothing to match by"),
    ({"step": "decontaminate", "eval_sets": [EVAL], "threshold": None, "hash_distnce": 3},
     "hash_distnce"),
    # an evaluation set's own options, before the steps before this one run (after them)
    ({"step": "decontaminate", "eval_sets": [{"source": "digits", "splt": "test"}],
      "threshold": None}, "steps[0]: eval_sets[0]: unknown option 'splt' for digits"),
    ({"step": "decontaminate", "eval_sets": [EVAL, {"source": "shapes", "n": "many"}],
      "threshold": None}, "eval_sets[1]"),
])
def test_bad_specs_are_one_line_config_errors(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        step_spec(data, "curate.yaml", "steps[0]")


@pytest.mark.parametrize("extra, named", [
    ({"model": "tiny-clip"}, "model has"),
    ({"batch_size": 8}, "batch_size has"),
    ({"model": "tiny-clip", "batch_size": 8}, "model and batch_size have"),
])
def test_model_settings_without_the_cosine_signal_are_refused(extra, named):
    """With threshold: null the model is neither loaded nor run (hash matching only)."""
    with pytest.raises(ConfigError, match=rf"steps\[0\]: {named} no effect with threshold: "
                       r"null \(only the cosine signal embeds images\); drop (it|them)$"):
        step_spec({"step": "decontaminate", "eval_sets": [EVAL], "threshold": None, **extra},
                  "curate.yaml", "steps[0]")
    spec = Spec(step="decontaminate", eval_sets=[EVAL], threshold=None, batch_size=64)
    assert Spec.model_validate(spec.to_dict()) == spec


def test_evaluation_images_that_cannot_be_read_are_told(tmp_path, capsys):
    """An evaluation image the step could not read is not checked against the pool: said on
    stderr with the set and the count (it was dropped without a word before)."""
    for name, colour in (("a/1.png", "red"), ("a/2.png", "blue"), ("b/1.png", "green")):
        (tmp_path / "evals" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), colour).save(tmp_path / "evals" / name)
    (tmp_path / "evals" / "b" / "bad.png").write_bytes(b"not a png")
    spec = step_spec({"step": "decontaminate", "threshold": None, "hash_distance": 4,
                      "eval_sets": [{"source": "image-folder", "path": str(tmp_path / "evals")}]},
                     "test")
    step = make_step(spec)
    step.prepare(StepContext(work=tmp_path / "work", progress=False))
    assert len(step.labels) == 3
    err = capsys.readouterr().err
    assert "curate: decontaminate: eval_sets[0]:image-folder: skipped 1 sample: " \
           "unreadable_image=1; those evaluation images are not checked against the pool" in err
    assert "read evals" not in err  # no progress bar when progress is off
