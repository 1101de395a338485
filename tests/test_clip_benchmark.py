"""CLIP_benchmark's WebDataset layout read from a local folder; `cliplab eval` on it."""

import json

import numpy as np
import pytest
import torch

from cliplab.cli import main
from cliplab.data.clip_benchmark import load_clip_benchmark
from cliplab.data.types import source_keys
from cliplab.errors import DataError
from cliplab.evaluate.features import encode_images
from tests.tar_files import png_bytes, write_tar
from tests.warned import warned




@pytest.fixture()
def classification_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "wds_toy"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("cat\ndog\ncar\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}.\n")
    arrays = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(9)]
    good = [(f"s{i:07d}", {"png": png_bytes(a), "cls": str(i % 3).encode()})
            for i, a in enumerate(arrays)]
    write_tar(root / "test" / "0.tar", good[:5])
    write_tar(root / "test" / "1.tar", good[5:] + [
        ("s0000100", {"png": b"not an image", "cls": b"1"}),
        ("s0000101", {"png": png_bytes(arrays[0]), "cls": b"7"}),
        ("s0000102", {"cls": b"0"})])
    return root, arrays


def test_reads_classification_shards_and_skips_bad_samples(classification_folder):
    root, arrays = classification_folder
    data = load_clip_benchmark(root, progress=False)
    assert data.classnames == ["cat", "dog", "car"] and data.name == "wds_toy-test"
    assert data.templates == ["a photo of a {}.", "a {}."]
    assert len(data) == 9 and data.labels.tolist() == [i % 3 for i in range(9)]
    assert np.array_equal(data.images[4].numpy(), arrays[4])
    assert data.skipped.counts == {"unreadable_image": 1, "bad_label": 1, "missing_image": 1}
    assert "1.tar:s0000100" in data.skipped.keys["unreadable_image"]
    # each image names its sample in the source (written shards carry it as source_key)
    assert source_keys(data) == [f"{i // 5}.tar:s{i:07d}" for i in range(9)]


def test_reads_retrieval_shards(tmp_path):
    root = tmp_path / "wds_pairs"
    (root / "test").mkdir(parents=True)
    img = np.zeros((8, 8, 3), np.uint8)
    write_tar(root / "test" / "0.tar", [
        ("b", {"jpg": png_bytes(img), "txt": b"  \n"}),
        ("a", {"jpg": png_bytes(img), "txt": b"a cat\na small cat\n"})])
    pairs = load_clip_benchmark(root, progress=False)
    assert pairs.captions == [["a cat", "a small cat"]] and pairs.name == "wds_pairs-test"
    assert pairs.skipped.counts == {"empty_caption": 1}
    assert source_keys(pairs) == ["0.tar:a"]  # not its position after the skip


def test_missing_shards_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no .tar shards"):
        load_clip_benchmark(tmp_path)


def test_cliplab_eval_on_the_folder_equals_hand_computation(classification_folder, tmp_path,
                                                            tiny_model):
    root, _ = classification_folder
    tiny_model.save(tmp_path / "model")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"tasks:\n  - {{name: toy, task: zeroshot, data: "
                     f"{{source: clip-benchmark, root: '{root}', progress: false}}}}\n")
    out = tmp_path / "out" / "results.json"
    assert main(["eval", "--model", str(tmp_path / "model"), "--suite", str(suite),
                 "--out", str(out.parent), "--no-progress"]) == 0
    got = json.loads(out.read_text())["results"]["toy"]["acc1"]

    data = load_clip_benchmark(root, progress=False)
    emb = encode_images(tiny_model, data.images, progress=False).embeddings
    prompts = [[t.format(c) for t in data.templates] for c in data.classnames]
    head = torch.nn.functional.normalize(torch.stack(
        [torch.nn.functional.normalize(tiny_model.encode_texts(p), dim=-1).mean(0)
         for p in prompts]), dim=-1)
    expected = ((emb @ head.T).argmax(1) == data.labels).float().mean().item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_a_broken_shard_is_counted_not_fatal(classification_folder):
    root, arrays = classification_folder
    (root / "test" / "2.tar").write_bytes(b"not a tar archive at all" * 40)
    data = load_clip_benchmark(root, progress=False)
    assert len(data) == 9 and np.array_equal(data.images[8].numpy(), arrays[8])
    assert data.skipped.counts["unreadable_shard"] == 1
    assert data.skipped.keys["unreadable_shard"][0].startswith("2.tar:after 0 samples")


def test_class_labels_without_classnames_say_so(classification_folder, capsys):
    """Without classnames.txt a folder is read as captions: its .cls samples were all
    'missing_caption', and eval then said it 'needs labelled images'."""
    root, _ = classification_folder
    (root / "classnames.txt").unlink()
    with pytest.raises(DataError, match=f"^{root / 'test'}: samples carry class labels \\(.cls\\) "
                       f"but {root / 'classnames.txt'} is missing; add it"):
        load_clip_benchmark(root, progress=False)


def test_default_templates_are_told(classification_folder, recwarn):
    """CLIP_benchmark prompts a set without a template file with its own per-dataset
    templates; cliplab's default gives other numbers, so it says which it used."""
    root, _ = classification_folder
    load_clip_benchmark(root, progress=False)
    assert warned(recwarn) == ""
    (root / "zeroshot_classification_templates.txt").unlink()
    assert load_clip_benchmark(root, progress=False).templates == ["a photo of a {}."]
    assert warned(recwarn) == (
        f"clip-benchmark {root}: no zeroshot_classification_templates.txt; zero-shot "
        "prompts use the default template 'a photo of a {}.'\n")


def test_a_class_index_equal_to_the_class_count_is_a_bad_label(tmp_path):
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("cat\ndog\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    img = np.zeros((8, 8, 3), np.uint8)
    write_tar(root / "test" / "0.tar", [("a", {"png": png_bytes(img), "cls": b"1"}),
                                          ("b", {"png": png_bytes(img), "cls": b"2"})])
    data = load_clip_benchmark(root, progress=False)
    assert data.labels.tolist() == [1]
    assert data.skipped.keys == {"bad_label": ["0.tar:b"]}


def test_shards_are_read_in_name_order_whatever_the_listing_order(tmp_path, monkeypatch):
    import pathlib

    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    first = np.full((8, 8, 3), 1, np.uint8)
    second = np.full((8, 8, 3), 2, np.uint8)
    write_tar(root / "test" / "b.tar", [("y", {"png": png_bytes(second), "txt": b"from b"})])
    write_tar(root / "test" / "a.tar", [("x", {"png": png_bytes(first), "txt": b"from a"})])
    glob = pathlib.Path.glob
    # a file system may list files in any order: make it the reverse of the names'
    monkeypatch.setattr(pathlib.Path, "glob",
                        lambda self, pattern, *a, **k: iter(sorted(glob(self, pattern, *a, **k),
                                                                   reverse=True)))
    pairs = load_clip_benchmark(root, progress=False)
    assert pairs.captions == [["from a"], ["from b"]]
    assert np.array_equal(pairs.images[0].numpy(), first)
