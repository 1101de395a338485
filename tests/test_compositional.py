"""Compositional negatives on shapes, and the bag-of-words result they are built to expose."""

import random

import torch
import torch.nn.functional as F

from cliplab.data.shapes import Scene, ShapeObject, captions, load_shapes_with_scenes
from cliplab.evaluate.compositional import compositional, preference_accuracy, relation_negatives


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
