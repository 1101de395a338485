"""Compositional negatives on shapes, and the bag-of-words result they are built to expose."""

import random

import pytest
import torch
import torch.nn.functional as F

from cliplab.data.shapes import Scene, ShapeObject, captions, load_shapes_with_scenes
from cliplab.evaluate.compositional import compositional, preference_accuracy, relation_negatives
from cliplab.evaluate.features import encode_images


def test_negatives_are_exact_for_a_hand_built_scene():
    scene = Scene([ShapeObject("circle", "red", "small", 12, 32),
                   ShapeObject("square", "orange", "large", 50, 32)], "relation", 64)
    true, negs = relation_negatives(scene, random.Random(0))
    assert true == "a red circle left of an orange square" == captions(scene)[0]
    assert negs["attribute_swap"] == "an orange circle left of a red square"
    assert negs["relation_swap"] == "an orange square left of a red circle"
    assert sorted(negs["word_shuffle"].split()) == sorted(true.split())
    assert negs["word_shuffle"] != true


def test_preference_accuracy_counts_ties_as_half():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    true = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    neg = torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    assert preference_accuracy(img, true, neg) == 0.5  # win, tie, loss


class BagOfWordsModel:
    """A text encoder that sums word vectors (no order) and an image encoder that knows the
    true caption: what the bag-of-words papers say contrastive models often become."""

    def __init__(self, true_captions):
        self.vocab = {}
        self.true = true_captions

    def _vec(self, word):
        if word not in self.vocab:
            g = torch.Generator().manual_seed(len(self.vocab) + 1)
            self.vocab[word] = torch.randn(32, generator=g)
        return self.vocab[word]

    def encode_texts(self, texts):
        # summed in sorted order, so the same words give bit-identical vectors
        return F.normalize(torch.stack([sum(self._vec(w) for w in sorted(t.split()))
                                        for t in texts]), dim=-1)


def test_bag_of_words_model_is_at_chance_on_swaps_and_shuffles():
    pairs, scenes = load_shapes_with_scenes(n=60, seed=3, kinds=("relation",), image_size=32)
    rng = random.Random(0)
    trues = [relation_negatives(s, rng)[0] for s in scenes]
    model = BagOfWordsModel(trues)
    image_emb = model.encode_texts(trues)  # images embedded exactly at their true caption
    out = compositional(model, pairs.images, scenes, image_emb=image_emb)
    # the same words in another order give the same embedding: exactly chance
    assert out["attribute_swap_acc"] == 0.5
    assert out["relation_swap_acc"] == 0.5
    assert out["word_shuffle_acc"] == 0.5
    assert out["n"] == 60


class OrderAwareModel(BagOfWordsModel):
    """Word vectors weighted by position (word i counts i + 1 times): captions with the same
    words in another order embed elsewhere, so images embedded at their true caption prefer
    it over every negative."""

    def encode_texts(self, texts):
        return F.normalize(torch.stack([sum((i + 1) * self._vec(w)
                                            for i, w in enumerate(t.split()))
                                        for t in texts]), dim=-1)


def test_an_order_aware_model_prefers_the_true_caption_over_every_negative():
    """Images embedded at their true caption, an order-aware text encoder: every kind of
    negative embeds away from the caption, so each accuracy is exactly 1 (a negative scored as
    the caption itself would tie, 0.5)."""
    pairs, scenes = load_shapes_with_scenes(n=60, seed=3, kinds=("relation",), image_size=32)
    rng = random.Random(0)
    trues = [relation_negatives(s, rng)[0] for s in scenes]
    model = OrderAwareModel(trues)
    out = compositional(model, pairs.images, scenes, image_emb=model.encode_texts(trues))
    assert out == {"attribute_swap_acc": 1.0, "relation_swap_acc": 1.0, "word_shuffle_acc": 1.0,
                   "n": 60}


class LookupModel:
    """A text encoder mapping each of a few known captions to its own basis vector (any other
    text is an error)."""

    def __init__(self, texts):
        self.index = {t: i for i, t in enumerate(texts)}

    def encode_texts(self, texts):
        return torch.eye(len(self.index))[[self.index[t] for t in texts]]


def test_each_negative_kind_is_scored_against_its_own_negative():
    """On one hand-built scene the caption and its three negatives (the word shuffle drawn
    with the task's seed) embed on four axes; the image scores caption 1, attribute swap 2,
    relation swap 0, word shuffle 1, so the accuracies are 0 / 1 / 0.5: a kind scored with
    another kind's negative (or with the caption itself) gives other numbers."""
    scene = Scene([ShapeObject("circle", "red", "small", 12, 32),
                   ShapeObject("square", "orange", "large", 50, 32)], "relation", 64)
    for seed in (0, 7):
        true, negs = relation_negatives(scene, random.Random(seed))
        model = LookupModel([true, negs["attribute_swap"], negs["relation_swap"],
                             negs["word_shuffle"]])
        image_emb = torch.tensor([[1.0, 2.0, 0.0, 1.0]])
        out = compositional(model, torch.zeros(1, 8, 8, 3, dtype=torch.uint8), [scene],
                            seed=seed, image_emb=image_emb)
        assert out == {"attribute_swap_acc": 0.0, "relation_swap_acc": 1.0,
                       "word_shuffle_acc": 0.5, "n": 1}


def test_precomputed_features_of_mixed_kinds_are_read_at_the_relation_rows():
    """Guards precomputed ``image_emb`` (the eval suite's path) being indexed by the relation
    scenes' rows: on a set of single and relation scenes, only the relation rows hold their
    true caption's embedding (the single rows are zero), so reading them gives exactly 1 for
    every kind; reading the first rows instead would pair images with other captions."""
    pairs, scenes = load_shapes_with_scenes(n=20, seed=3, kinds=("single", "relation"),
                                            image_size=32)
    keep = [i for i, s in enumerate(scenes) if s.kind == "relation"]
    assert 0 < len(keep) < len(scenes) and keep != list(range(len(keep)))
    rng = random.Random(0)
    trues = [relation_negatives(scenes[i], rng)[0] for i in keep]
    model = OrderAwareModel(trues)
    image_emb = torch.zeros(len(scenes), 32)
    image_emb[keep] = model.encode_texts(trues)
    out = compositional(model, pairs.images, scenes, image_emb=image_emb)
    assert out == {"attribute_swap_acc": 1.0, "relation_swap_acc": 1.0, "word_shuffle_acc": 1.0,
                   "n": len(keep)}


def test_precomputed_features_give_what_encoding_the_images_gives_on_mixed_kinds():
    """Guards the same bug on a real model: passing every image's embedding precomputed must
    score exactly as letting the task encode the relation images itself."""
    from cliplab.evaluate.features import encode_images
    from cliplab.models import build_model

    model = build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                        embed_dim=16)
    pairs, scenes = load_shapes_with_scenes(n=30, kinds=("single", "relation"))
    emb = encode_images(model, pairs.images, progress=False).embeddings
    encoded = compositional(model, pairs.images, scenes, progress=False)
    given = compositional(model, pairs.images, scenes, progress=False, image_emb=emb)
    assert given == pytest.approx(encoded, abs=1e-6)
    assert encoded["n"] == sum(s.kind == "relation" for s in scenes) < len(scenes)


def test_bf16_suites_encode_the_captions_in_bf16_as_the_images():
    """The task ran its images under the suite's bf16 autocast and its captions in fp32."""
    from cliplab.evaluate.suite import run_suite
    from cliplab.evaluate.tasks import TaskContext
    from cliplab.models import build_model

    model = build_model("tiny-clip", image_size=32, patch_size=8, width=32, layers=1, heads=2,
                        embed_dim=16)
    seen = []
    encode = model.encode_texts

    def recording(texts, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return encode(texts, *args, **kwargs)

    model.encode_texts = recording
    suite = {"precision": "bf16", "tasks": [{"task": "compositional", "name": "c", "data": {
        "source": "shapes", "n": 20, "seed": 1, "image_size": 32}}]}
    result = run_suite(model, suite, TaskContext(progress=False))
    assert seen and all(seen) and result["c"]["n"] > 0


def test_the_task_encodes_each_distinct_caption_once_through_the_text_cache(
        tiny_model, monkeypatch):
    """An attribute or relation swap of one scene is often another's caption: each distinct
    text goes through the text tower once (the suite's text cache, shared with its other
    tasks), and the accuracies are those of encoding the 4·n captions one by one."""
    from cliplab.evaluate.suite import run_suite
    from cliplab.evaluate.tasks import TaskContext

    data = {"source": "shapes", "n": 60, "seed": 3, "image_size": 32}
    pairs, scenes = load_shapes_with_scenes(n=60, seed=3, kinds=["relation"], image_size=32)
    rng = random.Random(0)
    texts = [t for true, negs in (relation_negatives(s, rng) for s in scenes)
             for t in (true, negs["attribute_swap"], negs["relation_swap"],
                       negs["word_shuffle"])]
    assert len(set(texts)) < len(texts) == 4 * 60  # duplicates to encode once
    encoded = []
    encode_text = type(tiny_model).encode_text

    def counting(self, *args, **kwargs):  # the texts of each batch through the text tower
        encoded.append(len(kwargs["input_ids"] if "input_ids" in kwargs else args[0]))
        return encode_text(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_model), "encode_text", counting)
    context = TaskContext(progress=False)
    suite = {"tasks": [{"name": "c", "task": "compositional", "data": data}]}
    got = run_suite(tiny_model, suite, context)
    assert sum(encoded) == len(set(texts))
    assert context.texts.misses == len(set(texts))
    encoded.clear()
    assert run_suite(tiny_model, suite, context) == got and sum(encoded) == 0  # all cached
    monkeypatch.undo()
    image_emb = encode_images(tiny_model, pairs.images, progress=False).embeddings
    assert got["c"] == compositional(tiny_model, pairs.images, scenes, image_emb=image_emb)
