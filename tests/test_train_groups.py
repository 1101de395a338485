"""``train.multi_positive``: the keys of a batch of pairs (which pairs are positives of each
other) come from the data's groups, or from the captions drawn, or — where one caption describes
images of two groups — from the captions describing each image; the contrastive objective trains
the multi-positive InfoNCE loss of those keys."""

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


@pytest.fixture(scope="module")
def classes():
    """16 images of 4 classes, each class with two captions of its own (no caption in two
    classes), as a labelled set turned into pairs has them."""
    from cliplab.data.types import ImageTextPairs

    names = ("cat", "dog", "car", "cup")
    captions = [[f"a photo of a {c}", f"a picture of a {c}"] for c in names for _ in range(4)]
    images = torch.arange(16, dtype=torch.uint8)[:, None, None, None].expand(16, 32, 32, 3)
    return ImageTextPairs(images.clone(), captions, groups=torch.arange(4).repeat_interleave(4))


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


def test_multi_positive_keys_are_the_groups_of_the_batch(classes):
    """multi_positive=true (the default), no caption in two groups: a batch's keys are
    ``data.groups`` at its indices, so images with the same captions are positives of each
    other, whichever caption each drew; the batch does hold such duplicates."""
    assert config().multi_positive is True
    batch, idx, inputs = _first_batch(classes, small_model(), config())
    assert inputs.described is None  # one key per pair: such runs train exactly as before
    assert torch.equal(batch.keys, classes.groups[idx])
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


def test_captions_are_drawn_from_the_steps_generator(classes):
    """Each image's caption is drawn from the training generator (train.seed): the same
    batches under another generator draw other captions, under the same one the same."""
    cfg = config(multi_positive=False, batch_size=16)

    def drawn(seed):
        inputs = MemoryInputs(classes, cfg, small_model(), lambda x, g: x, 0, 1,
                              torch.device("cpu"))
        rng = torch.Generator().manual_seed(seed)
        return torch.stack([inputs.next(rng).captions for _ in range(3)])

    assert torch.equal(drawn(0), drawn(0))
    assert not torch.equal(drawn(0), drawn(1))


def test_objective_loss_is_the_multi_positive_infonce_of_the_groups(pairs):
    """The objective's loss of a grouped batch is the symmetric InfoNCE whose target is
    uniform over each row's positives — the texts describing its image, its group's or
    another group's that shares the caption (computed here by hand from the strings) — not the
    one-positive loss: duplicates are not pushed apart."""
    model = small_model()
    with torch.no_grad():
        model.logit_scale.fill_(4.6052)  # sharp logits (CLIP's maximum): the losses differ more
    batch, idx, inputs = _first_batch(pairs, model, config())
    loss = ContrastiveObjective(Embedder(model, torch.device("cpu"), "fp32", augment=False),
                                "clip").backward(batch)

    with torch.no_grad():
        img = F.normalize(model.encode_image(batch.images, normalize=False), dim=-1)
        ids, mask = (batch.texts[k][batch.captions] for k in ("input_ids", "attention_mask"))
        txt = F.normalize(model.encode_text(ids, mask, normalize=False), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        positive = _texts_describe(inputs, batch, idx, pairs).float()
        groups = pairs.groups[idx]
        assert not torch.equal(positive, (groups[:, None] == groups[None, :]).float())
        i2t = -(positive / positive.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        t2i = -(positive.t() / positive.t().sum(1, keepdim=True)
                * logits.t().log_softmax(1)).sum(1).mean()
        expected = (i2t + t2i) / 2
        one_positive = (F.cross_entropy(logits, torch.arange(8))
                        + F.cross_entropy(logits.t(), torch.arange(8))) / 2
    torch.testing.assert_close(loss, expected)
    assert abs(loss.item() - one_positive.item()) > 0.05


def _texts_describe(inputs, batch, idx, pairs) -> torch.Tensor:
    """By hand, from the strings: ``[i, j]`` is True when the caption pair ``j`` drew is one of
    image ``i``'s captions or of an image in its group."""
    from cliplab.models.tokenizer import clean_text

    drawn = [inputs.table.texts[k] for k in batch.captions.tolist()]
    groups = pairs.groups.tolist() if pairs.groups is not None else list(range(len(pairs)))
    described = {}
    for i, caps in enumerate(pairs.captions):
        described.setdefault(groups[i], set()).update(clean_text(c) for c in caps)
    return torch.tensor([[drawn[j] in described[groups[i]] for j in range(len(drawn))]
                         for i in idx.tolist()])


def test_a_caption_two_groups_share_is_a_positive_of_the_images_of_both():
    """A small and a large green circle (two groups: their caption lists differ) are both "a
    green circle": that text, drawn for either, is a positive of both images, while "a small
    green circle" stays a negative of the large one. One key per pair cannot say this."""
    from cliplab.data.types import ImageTextPairs
    from cliplab.train.losses import positive_mask

    images = torch.zeros(3, 32, 32, 3, dtype=torch.uint8)
    pairs = ImageTextPairs(images, [["a small green circle", "a green circle"],
                                    ["a large green circle", "a green circle"],
                                    ["a red square"]], groups=torch.tensor([0, 1, 2]))
    seen = set()
    for seed in range(12):
        cfg = config(batch_size=3, seed=seed)
        batch, idx, inputs = _first_batch(pairs, small_model(), cfg)
        mask = positive_mask(batch.keys, batch.keys)
        torch.testing.assert_close(mask, _texts_describe(inputs, batch, idx, pairs))
        seen.add(tuple(mask.flatten().tolist()))
    assert len(seen) > 1  # different draws gave different (asymmetric) masks


def test_shapes_batches_count_every_describing_caption_as_a_positive():
    """On `shapes` (captions shared across caption lists), every batch's positives are exactly
    the texts that describe each image; same-group pairs stay positives, and some pairs of
    different groups are positives too."""
    from cliplab.train.losses import positive_mask

    pairs = load_shapes(n=400, seed=0, image_size=32)
    model = small_model()
    cfg = config(batch_size=64)
    embed = Embedder(model, torch.device("cpu"), "fp32", augment=False)
    inputs = MemoryInputs(pairs, cfg, model, embed.pixels, 0, 1, torch.device("cpu"))
    across = 0
    for _ in range(4):
        idx = inputs.batches.next()
        inputs.batches.next = lambda idx=idx: idx
        batch = inputs.next(torch.Generator().manual_seed(len(idx) + across))
        del inputs.batches.next
        mask = positive_mask(batch.keys, batch.keys)
        torch.testing.assert_close(mask, _texts_describe(inputs, batch, idx, pairs))
        groups = pairs.groups[idx]
        same_group = groups[:, None] == groups[None, :]
        assert bool(mask[same_group].all())
        across += int(mask[~same_group].sum())
    assert across > 0



def test_a_class_caption_two_classes_share_is_a_positive_of_both_and_classes_stay_whole():
    """Groups whose images have different captions (a class turned into pairs with per-image
    captions) and one class caption that two classes share: same-class pairs stay positives
    whatever each drew, and the shared caption is a positive of the other class's images."""
    from cliplab.data.types import ImageTextPairs
    from cliplab.train.losses import positive_mask

    captions = [["a tabby cat", "a pet"], ["a black cat", "a cat"], ["a sheepdog", "a pet"],
                ["a puppy", "a dog"], ["a sports car", "a car"], ["a red car", "a car"]]
    pairs = ImageTextPairs(torch.zeros(6, 32, 32, 3, dtype=torch.uint8), captions,
                           groups=torch.tensor([7, 7, -2, -2, 40, 40]))  # any ids
    for seed in range(8):
        batch, idx, inputs = _first_batch(pairs, small_model(), config(batch_size=6, seed=seed))
        mask = positive_mask(batch.keys, batch.keys)
        torch.testing.assert_close(mask, _texts_describe(inputs, batch, idx, pairs))
        groups = pairs.groups[idx]
        assert bool(mask[groups[:, None] == groups[None, :]].all())


def test_malformed_key_rows_are_refused():
    """Key rows given by hand: the pair's caption missing from its image's, or an id listed
    twice (the plain and tiled losses would disagree), is one clear error."""
    from cliplab.train.contrastive import contrastive_loss

    image = F.normalize(torch.randn(2, 4), dim=-1)
    for keys, words in ((torch.tensor([[0, 1], [1, 1]]), "list its own caption"),
                        (torch.tensor([[0], [1]]), "list its own caption"),
                        (torch.tensor([[0, 0, 0], [1, 1, -1]]), "twice")):
        with pytest.raises(ValueError, match=words):
            contrastive_loss(image, image, torch.tensor(0.0), keys=keys)
    ok = torch.tensor([[0, 0, -1], [1, 1, 0]])
    assert torch.isfinite(contrastive_loss(image, image, torch.tensor(0.0), keys=ok))
