"""Replay's concatenated sets keep identical captions positives: a group of the replay set
whose captions are a group's of the new set shares its key (within one set, a group is the
images with the same captions), so the multi-positive loss never pushes them apart."""

import torch

from cliplab.data.pairs import concat_pairs
from cliplab.data.shapes import load_shapes
from cliplab.data.types import ImageTextPairs


def _pairs(captions: list[list[str]], groups: list[int]) -> ImageTextPairs:
    images = torch.zeros(len(captions), 8, 8, 3, dtype=torch.uint8)
    return ImageTextPairs(images, captions, groups=torch.tensor(groups))


def test_groups_of_the_same_captions_in_both_sets_share_a_key():
    new = _pairs([["a red circle"], ["a blue square"], ["a red circle"]], [0, 1, 0])
    old = _pairs([["a blue square"], ["a green cross"], ["a red circle"], ["a green cross"]],
                 [0, 1, 2, 1])
    both = concat_pairs(new, old)
    # old's blue square joins new's group 1, its red circle new's group 0; the green cross,
    # new to the first set, gets a key of its own (one for both of its images)
    assert both.groups.tolist() == [0, 1, 0, 1, 2, 0, 2]
    assert both.captions == new.captions + old.captions


def test_a_group_joins_on_its_whole_caption_set_in_any_order():
    """A group sharing only some captions stays apart (as a small and a large red circle do
    within one set); one with the same captions in another order joins."""
    new = _pairs([["a small red circle", "a red circle"]], [0])
    old = _pairs([["a large red circle", "a red circle"], ["a red circle", "a small red circle"]],
                 [5, 7])
    assert concat_pairs(new, old).groups.tolist() == [0, 1, 0]


def test_replayed_shapes_share_keys_with_the_new_ones():
    """shapes seed 0 + seed 5: 54 caption lists were under two keys each."""
    new = load_shapes(n=200, seed=0, kinds=("single",), image_size=32)
    old = load_shapes(n=200, seed=5, kinds=("single",), image_size=32)
    both = concat_pairs(new, old)
    keys: dict[tuple[str, ...], set[int]] = {}
    for group, captions in zip(both.groups.tolist(), both.captions):
        keys.setdefault(tuple(captions), set()).add(group)
    assert all(len(k) == 1 for k in keys.values())
    assert len({next(iter(k)) for k in keys.values()}) == len(keys)  # one key per caption list
    assert both.groups[:len(new)].tolist() == new.groups.tolist()  # the new set's unchanged


def test_a_group_whose_captions_two_first_groups_share_joins_the_lowest():
    """Within the first set two groups can hold one caption set (e.g. a replay set built from
    two sources): the joining group takes the lowest of their keys."""
    new = _pairs([["a red circle"], ["a blue square"], ["a red circle"]], [4, 1, 2])
    old = _pairs([["a red circle"]], [0])
    assert concat_pairs(new, old).groups.tolist() == [4, 1, 2, 2]
