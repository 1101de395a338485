"""``train.multi_positive``: the keys of a batch of pairs (which pairs are positives of each
other) come from the data's groups, or from the captions drawn, and the contrastive objective
trains the multi-positive InfoNCE loss of those keys."""

import pytest
import torch
import torch.nn.functional as F

from cliplab.data.shapes import load_shapes
from cliplab.train.config import TrainConfig
from cliplab.train.embed import Embedder
from cliplab.train.objectives import ContrastiveObjective
from cliplab.train.step_inputs import MemoryInputs
from tests.tiny_models import small_model


@pytest.fixture(scope="module")
def pairs():
    """16 count scenes of one colour and two shapes: many images share their captions (and
    so their group), e.g. three of "three red squares"."""
    data = load_shapes(n=16, seed=0, kinds=("count",), image_size=32, colors=("red",),
                       shapes=("circle", "square"))
    assert len(data.groups.unique()) < len(data) / 2
    return data


def config(**kw) -> TrainConfig:
    return TrainConfig.from_dict({"steps": 1, "batch_size": 8, "progress": False,
                                  "augment": False, **kw})


def _first_batch(pairs, model, cfg):
    """The first StepBatch of MemoryInputs over ``pairs`` and the data indices it was drawn
    from (recorded from the batch sampler), plus the inputs."""
    embed = Embedder(model, torch.device("cpu"), "fp32", augment=False)
    inputs = MemoryInputs(pairs, cfg, model, embed.pixels, 0, 1, torch.device("cpu"))
    drawn, sample = [], inputs.batches.next

    def recording_sample():
        drawn.append(sample())
        return drawn[-1]

    inputs.batches.next = recording_sample
    batch = inputs.next(torch.Generator().manual_seed(0))
    return batch, drawn[0], inputs


def test_multi_positive_keys_are_the_groups_of_the_batch(pairs):
    """multi_positive=true (the default): a batch's keys are ``data.groups`` at its indices,
    so images with the same captions are positives of each other, whichever caption each
    drew; the batch does hold such duplicates."""
    assert config().multi_positive is True
    batch, idx, _ = _first_batch(pairs, small_model(), config())
    assert torch.equal(batch.keys, pairs.groups[idx])
    assert len(batch.keys.unique()) < len(batch.keys)  # duplicate groups in this batch


def test_without_multi_positive_keys_are_the_ids_of_the_captions_drawn(pairs):
    """multi_positive=false: the keys are the ids of the caption each image drew (a row of
    the table of unique captions): equal keys exactly when the drawn strings are equal,
    so same-group images that drew different captions are negatives."""
    batch, idx, inputs = _first_batch(pairs, small_model(), config(multi_positive=False))
    assert torch.equal(batch.keys, batch.captions)
    drawn = [inputs.table.texts[k] for k in batch.keys.tolist()]
    for i, text in zip(idx.tolist(), drawn):
        assert text in pairs.captions[i]
    for a in range(len(drawn)):
        for b in range(len(drawn)):
            assert (batch.keys[a] == batch.keys[b]).item() == (drawn[a] == drawn[b])
    groups = pairs.groups[idx]
    assert not torch.equal(batch.keys.unique(return_inverse=True)[1],
                           groups.unique(return_inverse=True)[1])  # not the groups' partition


def test_objective_loss_is_the_multi_positive_infonce_of_the_groups(pairs):
    """The objective's loss of a grouped batch is the symmetric InfoNCE whose target is
    uniform over each row's same-group pairs (computed here by hand), not the one-positive
    loss: duplicates are not pushed apart."""
    model = small_model()
    with torch.no_grad():
        model.logit_scale.fill_(4.6052)  # sharp logits (CLIP's maximum): the losses differ more
    batch, idx, _ = _first_batch(pairs, model, config())
    loss = ContrastiveObjective(Embedder(model, torch.device("cpu"), "fp32", augment=False),
                                "clip").backward(batch)

    with torch.no_grad():
        img = F.normalize(model.encode_image(batch.images, normalize=False), dim=-1)
        ids, mask = (batch.texts[k][batch.captions] for k in ("input_ids", "attention_mask"))
        txt = F.normalize(model.encode_text(ids, mask, normalize=False), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        groups = pairs.groups[idx]
        positive = (groups[:, None] == groups[None, :]).float()
        target = positive / positive.sum(1, keepdim=True)  # symmetric: rows = columns
        i2t = -(target * logits.log_softmax(1)).sum(1).mean()
        t2i = -(target * logits.t().log_softmax(1)).sum(1).mean()
        expected = (i2t + t2i) / 2
        one_positive = (F.cross_entropy(logits, torch.arange(8))
                        + F.cross_entropy(logits.t(), torch.arange(8))) / 2
    torch.testing.assert_close(loss, expected)
    assert abs(loss.item() - one_positive.item()) > 0.05
