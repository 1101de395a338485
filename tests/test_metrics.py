"""Classification metrics and zero-shot classification against hand-computed values."""

import pytest
import torch
import torch.nn.functional as F

from cliplab.evaluate.metrics import classification_metrics, mean_per_class_recall, topk_accuracy
from cliplab.evaluate.zeroshot import zeroshot_classifier, zeroshot_metrics


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3], [0.5, 0.1, 0.4]])
    labels = torch.tensor([0, 1, 1, 2])
    # top-1 predictions 0, 2, 1, 0 -> correct rows 0 and 2
    assert topk_accuracy(logits, labels, 1) == 0.5
    # top-2 sets {0,1},{2,1},{1,0 or 2},{0,2} -> all four contain the label
    assert topk_accuracy(logits, labels, 2) == 1.0
    assert topk_accuracy(logits, labels, 5) == 1.0  # k capped at the number of classes


def test_mean_per_class_recall_with_unbalanced_classes():
    # class 0: 8 samples, 8 right; class 1: 2 samples, 0 right
    labels = torch.tensor([0] * 8 + [1] * 2)
    pred = torch.tensor([0] * 8 + [0] * 2)
    assert mean_per_class_recall(pred, labels) == 0.5
    logits = F.one_hot(pred, 2).float()
    m = classification_metrics(logits, labels)
    assert abs(m["acc1"] - 0.8) < 1e-6 and m["mean_per_class_recall"] == 0.5


class ToyTextModel:
    """A 'model' whose text embedding is a fixed vector per class word (prompts ensemble)."""

    vectors = {"cat": torch.tensor([1.0, 0.0, 0.0]), "dog": torch.tensor([0.0, 1.0, 0.0]),
               "car": torch.tensor([0.0, 0.0, 1.0])}

    def encode_texts(self, prompts):
        out = []
        for p in prompts:
            word = next(w for w in self.vectors if w in p)
            # the template adds a shared direction that ensembling must not confuse
            v = self.vectors[word] + (0.5 if p.startswith("a photo") else -0.5)
            out.append(F.normalize(v, dim=0))
        return torch.stack(out)


def test_zeroshot_of_a_known_toy_model():
    model = ToyTextModel()
    head = zeroshot_classifier(model, ["cat", "dog", "car"], ["a photo of a {}.", "the {}."])
    # the +0.5 and -0.5 template offsets cancel in the ensemble: head ~ identity
    assert torch.allclose(head, torch.eye(3), atol=0.2)
    assert (head.argmax(1) == torch.arange(3)).all()
    images = F.normalize(torch.tensor([[1.0, 0.1, 0], [0.9, 0, 0.2], [0, 1, 0.3], [0.1, 0, 1],
                                       [0.8, 0.9, 0], [0, 0.2, 1]]), dim=-1)
    labels = torch.tensor([0, 0, 1, 2, 1, 1])
    m = zeroshot_metrics(images, labels, head)
    # predictions 0, 0, 1, 2, 1 (0.9 > 0.8), 2 -> 5 of 6 right; class 1 recall 2/3
    assert abs(m["acc1"] - 5 / 6) < 1e-6
    assert abs(m["mean_per_class_recall"] - (1 + 2 / 3 + 1) / 3) < 1e-6
    # only classes {1, 2} compete, on images 2..5: dog, car, dog right; image 5 (a dog near
    # the car direction) wrong -> 3/4
    sub = zeroshot_metrics(images, labels, head, classes=[1, 2])
    assert sub["acc1"] == 0.75


def test_acc5_by_hand_with_eight_classes():
    """With 8 classes, top-5 is a real cut: a label ranked 1st, 5th, 6th and 8th counts for
    acc5 in the first two rows only (and acc1 in the first)."""
    ranks = [1, 5, 6, 8]  # where each row's label ranks
    labels = torch.tensor([3, 0, 7, 5])
    logits = torch.empty(4, 8)
    for row, (label, rank) in enumerate(zip(labels.tolist(), ranks)):
        others = [c for c in range(8) if c != label]
        order = others[:rank - 1] + [label] + others[rank - 1:]  # classes, best first
        logits[row, order] = torch.linspace(1.0, 0.3, 8)
    assert [int((logits[r] >= logits[r, labels[r]]).sum()) for r in range(4)] == ranks
    m = classification_metrics(logits, labels)
    assert m["acc1"] == 0.25
    assert m["acc5"] == 0.5
    assert topk_accuracy(logits, labels, 6) == 0.75
    assert topk_accuracy(logits, labels, 7) == 0.75
    assert topk_accuracy(logits, labels, 8) == 1.0


def test_tied_logits_rank_the_lower_class_first_in_every_metric():
    """torch's topk picks among ties by its own rule (index 8 of 10 tied values, 0 of 100):
    acc1 said 10% where per-class recall said class 0's 90 images were all right."""
    from cliplab.evaluate.metrics import per_class_accuracy

    labels = torch.tensor([0] * 90 + [8] * 10)
    logits = torch.zeros(100, 10)
    metrics = classification_metrics(logits, labels)
    assert metrics["acc1"] == pytest.approx(0.9) and metrics["mean_per_class_recall"] == 0.5
    assert per_class_accuracy(logits, labels, [str(i) for i in range(10)]) == {"0": 1.0,
                                                                               "8": 0.0}
    # top-5 of ten tied logits: classes 0-4, so class 8 is outside it
    assert metrics["acc5"] == pytest.approx(0.9)
    assert topk_accuracy(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), torch.tensor([2]), 1) == 0.0
