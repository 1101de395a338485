"""Hard-negative images: counterfactual twins of `shapes` relation scenes, the partners they
carry through the data layer, and the batches that put each image beside its hard negative
(`train.hard_negatives.images`)."""

import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from cliplab.data.caption_negatives import attribute_swap, relation_swap
from cliplab.data.pairs import concat_pairs
from cliplab.data.shards.read import resolve_partners
from cliplab.data.shapes import (Scene, ShapeObject, colour_twin, load_shapes,
                                 load_shapes_with_scenes, position_twin)
from cliplab.data.sources import load_source
from cliplab.data.types import ImageTextPairs
from cliplab.errors import ConfigError, DataError
from cliplab.train.batches import PartnerBatches, ReplayBatches
from cliplab.train.config import TrainConfig
from cliplab.train.hard_negatives import HardNegatives, nearest_neighbours, \
    negative_image_candidates
from cliplab.train.step_inputs import MemoryInputs
from tests.tiny_models import small_model


@pytest.fixture(scope="module")
def twins():
    return load_shapes_with_scenes(n=40, seed=3, kinds=("relation",), image_size=32,
                                   counterfactuals=True)


def _colour_counts(image: torch.Tensor) -> dict:
    colours, counts = image.reshape(-1, 3).unique(dim=0, return_counts=True)
    return {tuple(c.tolist()): int(n) for c, n in zip(colours, counts)}


def test_each_relation_scene_is_followed_by_its_counterfactual_twin(twins):
    pairs, scenes = twins
    assert len(pairs) == 80
    assert pairs.partners.tolist() == [i ^ 1 for i in range(80)]  # mutual, side by side
    kinds = {"position": 0, "colour": 0}
    for i in range(0, 80, 2):
        original, twin = pairs.captions[i][0], set(pairs.captions[i + 1])
        a, b = scenes[i].objects
        a2, b2 = scenes[i + 1].objects
        if (a2.x, a2.y) == (b.x, b.y):  # positions exchanged: the caption's relation swap
            kinds["position"] += 1
            assert relation_swap(original) in twin
            assert (a2.color, b2.color) == (a.color, b.color)
            assert _colour_counts(pairs.images[i]) == _colour_counts(pairs.images[i + 1])
        else:  # colours exchanged, in place: the caption's attribute swap
            kinds["colour"] += 1
            assert attribute_swap(original) in twin
            assert (a2.color, b2.color, a2.x, b2.y) == (b.color, a.color, a.x, b.y)
            drawn = pairs.images[i].sum(-1) > 0
            assert torch.equal(drawn, pairs.images[i + 1].sum(-1) > 0)
        assert pairs.groups[i] != pairs.groups[i + 1]  # never each other's positives
    assert kinds["position"] >= 10 and kinds["colour"] >= 10, kinds


def test_a_position_twin_that_would_leave_the_canvas_is_a_colour_twin():
    # a large square at the left edge swapped with a small circle's centre at x = 3:
    # the square (radius 5) would stick out, so the twin exchanges colours instead
    scene = Scene([ShapeObject("circle", "red", "small", 3, 16),
                   ShapeObject("square", "blue", "large", 20, 16)], "relation", 32)
    assert position_twin(scene) is None
    twin = colour_twin(scene)
    assert [(o.color, o.x) for o in twin.objects] == [("blue", 3), ("red", 20)]
    assert [o.color for o in scene.objects] == ["red", "blue"]  # the original is untouched


def test_scenes_without_a_relation_have_no_twin():
    pairs = load_shapes(n=9, seed=0, kinds=("single", "relation", "count"), image_size=32,
                        counterfactuals=True)
    assert len(pairs) == 12  # three relation scenes, each with a twin
    assert (pairs.partners >= 0).sum() == 6
    with pytest.raises(DataError, match="counterfactuals"):
        load_source({"source": "shapes", "attribute": "color", "n": 4,
                     "counterfactuals": True})
    # kinds was dropped unchecked with attribute (a typo passed, recorded as run)
    with pytest.raises(DataError, match=r"^shapes: kinds has no effect with attribute"):
        load_source({"source": "shapes", "attribute": "color", "n": 4, "kinds": ["bogus"]})


def test_partners_are_validated_and_survive_concatenation(twins):
    pairs = twins[0]
    with pytest.raises(ValueError, match="partners"):
        ImageTextPairs(pairs.images[:2], pairs.captions[:2], partners=torch.tensor([0, 1]))
    plain = load_shapes(n=3, seed=1, kinds=("relation",), image_size=32)
    both = concat_pairs(plain, pairs)
    assert both.partners[:3].tolist() == [-1, -1, -1]
    assert both.partners[3:].tolist() == (pairs.partners + 3).tolist()
    assert concat_pairs(plain, plain).partners is None


def test_shards_keep_each_samples_partner(tmp_path, twins):
    from cliplab.data.shards.write import write_shards

    write_shards(twins[0], tmp_path / "s", samples_per_shard=100, progress=False)
    with tarfile.open(next((tmp_path / "s").glob("*.tar"))) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers()
                 if m.name.endswith(".json")]
    partner = {m["key"]: m["partner_key"] for m in metas}
    assert partner["000000000"] == "000000001" and partner["000000001"] == "000000000"
    # read back, each sample has its partner again: training with `images: partners` can
    # start from shards as from the generator
    back = load_source({"source": "shards", "path": str(tmp_path / "s"), "progress": False})
    assert torch.equal(back.partners, twins[0].partners)
    assert back.captions == twins[0].captions


def test_partner_keys_that_name_no_single_other_sample_are_dropped_with_a_warning():
    keys = ["000", "001", "002", "002", "003", "004"]
    with pytest.warns(UserWarning, match="3 of 5 partner_key"):
        partners = resolve_partners(keys, ["001", "000", "002", "999", "003", None], "here")
    # "002" is not unique, "999" names no sample and "003" is the sample's own key
    assert partners.tolist() == [1, 0, -1, -1, -1, -1]
    assert resolve_partners(keys, [None] * 5, "here") is None


def test_partner_batches_keep_pairs_together_and_cover_each_image_once():
    partners = torch.tensor([i ^ 1 for i in range(40)])[:, None]
    batches = PartnerBatches(partners, batch_size=8, seed=0)
    for _ in range(2):  # two epochs
        seen = []
        for _ in range(batches.per_epoch):
            idx = batches.next().tolist()
            assert all(i ^ 1 in idx for i in idx)
            seen += idx
        assert sorted(seen) == list(range(40))
    # one-way candidates (mined neighbours): still once each per epoch, and most paired
    candidates = torch.tensor([[(i + 1) % 30, (i + 2) % 30] for i in range(30)])
    batches = PartnerBatches(candidates, batch_size=10, seed=1)
    seen = torch.cat([batches.next() for _ in range(3)]).tolist()
    assert sorted(seen) == list(range(30))
    beside = sum(seen[k + 1] in candidates[seen[k]].tolist() for k in range(29))
    assert beside >= 10  # a random order would put ~2 of 29 neighbours side by side


def test_partner_batches_resume_where_they_stopped():
    partners = torch.tensor([i ^ 1 for i in range(24)])[:, None]
    one = ReplayBatches(24, 0, 6, 0.0, seed=4, partners=partners)
    straight = [one.next().tolist() for _ in range(7)]
    two = ReplayBatches(24, 0, 6, 0.0, seed=4, partners=partners)
    for _ in range(5):
        two.next()
    three = ReplayBatches(24, 0, 6, 0.0, seed=4, partners=partners)
    three.load_state_dict(two.state_dict())
    assert [three.next().tolist() for _ in range(2)] == straight[5:]


def test_nearest_neighbours_match_brute_force_and_skip_self():
    features = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)),
                           dim=-1)
    sims = features @ features.t()
    sims.fill_diagonal_(-2)
    expected = sims.topk(3, dim=1).indices
    assert torch.equal(nearest_neighbours(features, 3, chunk=7), expected)
    assert nearest_neighbours(features[:2], 5).tolist() == [[1], [0]]


def test_inputs_pair_images_with_their_twins_and_say_when_data_has_none(twins):
    model = small_model()

    def inputs(data, images):
        cfg = TrainConfig.from_dict({"batch_size": 16, "augment": False, "progress": False,
                                     "hard_negatives": {"images": images}})
        return MemoryInputs(data, cfg, model, lambda x, g: x, 0, 1, torch.device("cpu"))

    idx = inputs(twins[0], "partners").batches.next().tolist()
    assert all(i ^ 1 in idx for i in idx)
    plain = load_shapes(n=20, seed=1, kinds=("relation",), image_size=32)
    with pytest.raises(ConfigError, match="counterfactuals: true"):
        inputs(plain, "partners")
    mined = negative_image_candidates(plain, HardNegatives(images="neighbours", neighbours=2),
                                      model)
    assert mined.shape == (20, 2) and not (mined == torch.arange(20)[:, None]).any()
    assert inputs(plain, "neighbours").batches.next().shape == (16,)
    with pytest.raises(ConfigError, match=r"train\.hard_negatives\.images"):
        TrainConfig.from_dict({"hard_negatives": {"images": "twins"}})
    with pytest.raises(ConfigError, match=r"train\.hard_negatives\.neighbours"):
        TrainConfig.from_dict({"hard_negatives": {"images": "neighbours", "neighbours": True}})
    # a neighbour count without mined images was silently ignored; the default (as a run's
    # config.yaml lists it) is fine
    with pytest.raises(ConfigError, match=r"train\.hard_negatives: neighbours: 5 is read only "
                       r"with images: neighbours \(images is 'partners'\)"):
        TrainConfig.from_dict({"hard_negatives": {"images": "partners", "neighbours": 5}})
    assert TrainConfig.from_dict({"hard_negatives": {"neighbours": 3}}).hard_negatives.images \
        == "none"


def test_the_shipped_hard_negatives_recipe_trains_and_scores_swaps(tmp_path):
    """configs/pretrain/hard-negatives-shapes.yaml, shortened and from a small model: the
    twins load, the partner batches and caption negatives train, the suite scores the swaps."""
    from cliplab.train.pretrain import run_pretrain

    recipe = Path(__file__).parents[1] / "configs" / "pretrain" / "hard-negatives-shapes.yaml"
    cfg = yaml.safe_load(recipe.read_text())
    assert cfg["train"]["hard_negatives"] == {"images": "partners"}
    assert cfg["data"]["train"]["counterfactuals"] is True
    cfg["model"] = {"name": "tiny-clip", "options": {"image_size": 32, "patch_size": 8,
                                                     "width": 32, "layers": 1, "heads": 2,
                                                     "embed_dim": 16}}
    cfg["data"]["train"]["n"] = 24
    cfg["train"].update(epochs=None, steps=3, batch_size=16)
    for task in cfg["eval"]["tasks"]:
        task["data"]["n"] = 40
    cfg["out"] = str(tmp_path / "run")
    results = run_pretrain(cfg, progress=False)
    assert results["train"]["step"] == 3
    assert 0 <= results["evals"]["compositional"]["relation_swap_acc"] <= 1


def test_concatenation_keeps_no_partner_and_shifts_the_second_sets_partners():
    images = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    first = ImageTextPairs(images, [["a"], ["b"]], partners=torch.tensor([1, 0]))
    second = ImageTextPairs(images, [["c"], ["d"]], partners=torch.tensor([-1, 0]))
    both = concat_pairs(first, second)
    assert both.partners.tolist() == [1, 0, -1, 2]
