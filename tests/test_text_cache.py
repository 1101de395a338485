"""The text-feature cache: distinct texts encoded once, same embeddings as without it, and a
new key whenever the text tower changes."""

import torch

from cliplab.data.types import ImageTextPairs
from cliplab.evaluate import text_cache as tc
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.retrieval import retrieval, retrieval_metrics
from cliplab.evaluate.tasks import TaskContext
from cliplab.evaluate.suite import run_suite
from cliplab.evaluate.text_cache import TextFeatureCache
from cliplab.evaluate.zeroshot import zeroshot_classifier
from cliplab.models import build_model

TEXTS = ["a cat", "a very small dog on a red mat", "a cat", "one car", "a bus in the rain today"]


def _model(seed=0):
    return build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                       embed_dim=16, context_length=32, seed=seed)


def spy_encodes(monkeypatch):
    calls = []
    real = tc.encode_texts_sorted

    def spy(model, texts, *args, **kwargs):
        calls.append(list(texts))
        return real(model, texts, *args, **kwargs)

    monkeypatch.setattr(tc, "encode_texts_sorted", spy)
    return calls


def test_distinct_texts_are_encoded_once_and_reused(monkeypatch):
    calls = spy_encodes(monkeypatch)
    cache, model = TextFeatureCache(), _model()
    first = cache.embeddings(model, TEXTS)
    assert calls == [["a cat", "a very small dog on a red mat", "one car",
                      "a bus in the rain today"]]
    assert (cache.misses, cache.hits) == (4, 0)
    again = cache.embeddings(model, ["one car", "a new text", "a cat"])
    assert calls[1] == ["a new text"] and (cache.misses, cache.hits) == (5, 2)
    assert torch.equal(again[0], first[3]) and torch.equal(again[2], first[0])
    assert first.shape == (5, 16) and torch.equal(first[0], first[2])


def test_cached_embeddings_equal_plain_encoding():
    model = _model()
    plain = model.encode_texts(TEXTS).float()
    cached = TextFeatureCache(batch_size=2).embeddings(model, TEXTS)  # sorted, 2 per batch
    torch.testing.assert_close(cached, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(cached.norm(dim=1), torch.ones(5))


def test_text_tower_change_invalidates_and_image_tower_change_does_not(monkeypatch):
    calls = spy_encodes(monkeypatch)
    cache, model = TextFeatureCache(), _model()
    before = cache.embeddings(model, ["a cat"])
    with torch.no_grad():
        model.model.vision_model.embeddings.patch_embedding.weight.add_(1.0)
    cache.embeddings(model, ["a cat"])
    assert len(calls) == 1  # image weights are no part of a text's key
    with torch.no_grad():
        model.model.text_projection.weight.mul_(-1.0)
    after = cache.embeddings(model, ["a cat"])
    assert len(calls) == 2 and torch.allclose(after, -before, atol=1e-6)
    with torch.no_grad():
        model.model.text_model.final_layer_norm.bias.add_(0.5)
    cache.embeddings(model, ["a cat"])
    assert len(calls) == 3
    cache.embeddings(_model(seed=1), ["a cat"])  # another model altogether
    assert len(calls) == 4
    # the same weights, texts cut or pooled otherwise
    model.context_length -= 1
    cache.embeddings(model, ["a cat"])
    model.text_pooling = "mean"
    cache.embeddings(model, ["a cat"])
    assert len(calls) == 6


def test_the_same_weights_under_other_text_settings_are_another_key(tmp_path):
    """Two folders of the same weights whose text config differs (a norm epsilon) embed
    otherwise: one cache gives each its own embeddings."""
    import json

    from cliplab.models.dual_encoder import DualEncoder

    _model().save(tmp_path / "a")
    _model().save(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["text_config"]["layer_norm_eps"] = 0.5
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    a, b = DualEncoder.load(tmp_path / "a"), DualEncoder.load(tmp_path / "b")
    cache = TextFeatureCache()
    first, second = cache.embeddings(a, TEXTS), cache.embeddings(b, TEXTS)
    assert cache.hits == 0
    assert torch.equal(second, TextFeatureCache().embeddings(b, TEXTS))
    assert not torch.allclose(first, second, atol=1e-3)


def test_a_tokenizer_that_cuts_texts_otherwise_is_another_key(tmp_path):
    """The same weights and vocabulary with the tokenizer's lowercasing removed (its
    normalizer in tokenizer.json) give other token ids: another key, the tokenizer's own
    embeddings."""
    import json

    from cliplab.models.dual_encoder import DualEncoder

    _model().save(tmp_path / "a")
    _model().save(tmp_path / "b")
    pipeline = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    steps = pipeline["normalizer"]["normalizers"]  # whitespace as clean_text, then lowercase
    assert steps[-1] == {"type": "Lowercase"}
    pipeline["normalizer"]["normalizers"] = steps[:-1]
    (tmp_path / "b" / "tokenizer.json").write_text(json.dumps(pipeline))
    a, b = DualEncoder.load(tmp_path / "a"), DualEncoder.load(tmp_path / "b")
    texts = ["A Cat", "One CAR"]
    assert a.tokenize(texts)["input_ids"].tolist() != b.tokenize(texts)["input_ids"].tolist()
    cache = TextFeatureCache()
    first, second = cache.embeddings(a, texts), cache.embeddings(b, texts)
    assert cache.hits == 0 and torch.equal(second, TextFeatureCache().embeddings(b, texts))
    assert not torch.allclose(first, second, atol=1e-3)


def test_bf16_is_its_own_key_and_close_to_fp32(monkeypatch):
    calls = spy_encodes(monkeypatch)
    cache, model = TextFeatureCache(), _model()
    fp32 = cache.embeddings(model, TEXTS)
    bf16 = cache.embeddings(model, TEXTS, precision="bf16")
    assert len(calls) == 2
    assert (fp32 - bf16).abs().max() < 0.05


def test_zeroshot_classifier_with_cache_matches_and_reuses_prompts(monkeypatch):
    calls = spy_encodes(monkeypatch)
    model, cache = _model(), TextFeatureCache()
    names, templates = ["cat", "dog", "car"], ["a photo of {}.", "a {}"]
    plain = zeroshot_classifier(model, names, templates)
    cached = zeroshot_classifier(model, names, templates, cache)
    torch.testing.assert_close(cached, plain, atol=1e-6, rtol=0)
    zeroshot_classifier(model, names[:2], templates, cache)  # a subset: nothing new to encode
    assert len(calls) == 1 and cache.hits == 4


def test_retrieval_with_duplicate_captions_equals_the_full_similarity_matrix(monkeypatch):
    calls = spy_encodes(monkeypatch)
    model = _model()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 16, 16, 3), generator=g, dtype=torch.uint8)
    captions = [["a cat", "one cat"], ["a dog", "a cat"], ["a car"], ["a dog"], ["a cat"],
                ["a cup", "one cat"]]
    got = retrieval(model, ImageTextPairs(images, captions), ks=(1, 2, 5), progress=False)
    assert sorted(calls[0]) == ["a car", "a cat", "a cup", "a dog", "one cat"]
    # the reference: every caption on its own row of the full matrix, no deduplication. One
    # text is one embedding: a caption repeated in one batch can come out a few ulps apart by
    # its row (vectorised kernels treat the last rows of a batch apart), which breaks the
    # exact ties of repeated captions either way; each repeat takes its first row's embedding.
    from cliplab.evaluate.features import encode_images
    flat = [c for cs in captions for c in cs]
    owner = torch.tensor([i for i, cs in enumerate(captions) for _ in cs])
    first = [flat.index(c) for c in flat]
    texts = model.encode_texts(flat).float()[first]
    ref = retrieval_metrics(encode_images(model, images, progress=False).embeddings,
                            texts, owner, ks=(1, 2, 5))
    assert got == ref


def test_chunked_retrieval_metrics_equal_unchunked():
    g = torch.Generator().manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(7, 4, generator=g), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(11, 4, generator=g), dim=1)
    owner = torch.randint(0, 7, (11,), generator=g)
    assert retrieval_metrics(images, texts, owner, ks=(1, 3), chunk=2) == \
        retrieval_metrics(images, texts, owner, ks=(1, 3))


def test_suite_shares_text_embeddings_between_zeroshot_and_retrieval(tiny_model, monkeypatch):
    calls = spy_encodes(monkeypatch)
    cache = FeatureCache()
    data = {"source": "digits", "split": "test"}
    run_suite(tiny_model, {"tasks": [{"name": "zs", "task": "zeroshot", "data": data},
                                     {"name": "ret", "task": "retrieval", "data": data,
                                      "ks": [1]}]}, TaskContext(cache, progress=False))
    # retrieval's captions of a labelled set are its prompts: all already embedded
    assert len(calls) == 1 and cache.texts.misses == len(calls[0])


def test_zeroshot_text_head_shows_a_bar_only_with_progress(capsys):
    model, names = _model(), [f"class {i}" for i in range(6)]
    zeroshot_classifier(model, names, ["a {}", "a photo of {}."], TextFeatureCache(batch_size=4),
                        progress=True)
    assert "text head" in capsys.readouterr().err
    zeroshot_classifier(model, names, ["a {}", "one {}"], TextFeatureCache(batch_size=4),
                        progress=False)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


def test_zeroshot_task_passes_the_suite_progress_to_the_text_head(tiny_model, capsys):
    for progress in (True, False):
        cache = FeatureCache()
        cache.texts.batch_size = 4  # the digits' 10 prompts fill three batches
        run_suite(tiny_model, {"tasks": [{"name": "zs", "task": "zeroshot",
                                          "data": {"source": "digits", "split": "test"}}]},
                  TaskContext(cache, progress=progress))
        assert ("text head" in capsys.readouterr().err) is progress


def test_zeroshot_head_warns_once_of_prompts_cut_at_the_context_length():
    """Two long names differing only at the end: cut to the same tokens, the same head row.
    One warning per head says how many prompts were cut, the first class, the limit and
    which classes the cut made the same; prompts that fit keep their numbers and no word."""
    import warnings

    from cliplab.errors import CliplabWarning

    model = _model()  # context_length 32
    names = ["cat", "x" * 60 + " alpha", "x" * 60 + " beta"]
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        head = zeroshot_classifier(model, names, ["a photo of {}.", "{}"])
        fits = zeroshot_classifier(model, ["cat", "dog"], ["a photo of {}."])
    said = [str(w.message) for w in got if issubclass(w.category, CliplabWarning)]
    assert len(said) == 1, said
    assert said[0].startswith(f"zero-shot: 4 of 6 prompts are longer than the text tower's 32 "
                              f"tokens and were cut (first: class {names[1]!r}); 1 class(es) "
                              f"get the same prompts as another once cut ({names[1]!r} and "
                              f"{names[2]!r})")
    assert torch.dot(head[1], head[2]) > 0.9999  # what the warning is about
    plain = tc.encode_texts_sorted(model, ["a photo of cat.", "a photo of dog."])
    torch.testing.assert_close(fits, torch.nn.functional.normalize(plain, dim=-1))
