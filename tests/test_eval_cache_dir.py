"""`cliplab eval --cache-dir`: image features written on the first run are read back by the
next run of the same model and data, which then encodes no image and gives the same results."""

import json

import torch
from safetensors.torch import load_file

from cliplab.cli import main
from cliplab.data.digits import load_digits
from cliplab.evaluate import feature_cache as fc
from cliplab.evaluate.features import encode_images


def test_a_second_eval_with_the_same_cache_dir_encodes_no_image(tiny_model, tiny_model_dir,
                                                                 tmp_path, monkeypatch):
    """Run 1 encodes each dataset once and leaves one safetensors file per dataset in the
    folder, holding the model's embeddings of its images; run 2 (a fresh process state but
    the same folder) encodes nothing and writes identical results."""
    calls = []
    real = fc.encode_images
    monkeypatch.setattr(fc, "encode_images", lambda *a, **k: calls.append(len(a[1]))
                        or real(*a, **k))
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "tasks:\n"
        "  - {name: zs, task: zeroshot, data: {source: digits, split: test}}\n"
        "  - {name: ret, task: retrieval, data: {source: shapes, n: 12, image_size: 32}, "
        "ks: [1, 2]}\n")
    cache = tmp_path / "cache"
    results = []
    for run in ("first", "second"):
        assert main(["eval", "--model", str(tiny_model_dir), "--config", str(suite),
                     "--cache-dir", str(cache), "--out", str(tmp_path / run),
                     "--no-progress"]) == 0
        results.append(json.loads((tmp_path / run / "results.json").read_text())["results"])
        if run == "first":
            test = load_digits("test")
            assert sorted(calls) == [12, len(test.labels)]  # each dataset encoded once
            files = sorted(cache.glob("*.safetensors"))
            assert len(files) == 2 and not list(cache.glob("*.tmp"))
            want = encode_images(tiny_model.eval(), test.images, progress=False).embeddings
            stored = [load_file(f)["embeddings"] for f in files]
            assert any(s.shape == want.shape and torch.allclose(s, want, atol=1e-5)
                       for s in stored)
            calls.clear()
    assert calls == []  # the second run read every image feature from the folder
    assert results[1] == results[0]
    assert set(results[0]) == {"zs", "ret"}
