"""The `basic` step: each DataComp rule on a hand-built batch with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cliplab.curate.steps.base import PoolBatch, PoolItems, StepContext
from cliplab.curate.steps.basic import Basic, Spec, blocklist_pattern


def run(tmp_path, captions, sizes=None, **options):
    sizes = sizes or [(32, 32)] * len(captions)
    step = Basic(Spec(step="basic", **options))
    step.prepare(StepContext(work=tmp_path))
    keys = [f"k{i}" for i in range(len(captions))]
    batch = PoolBatch(keys, captions, [Image.new("RGB", s) for s in sizes])
    return step.decide(PoolItems(keys, captions), step.map(batch))


def test_no_rule_configured_keeps_everything(tmp_path):
    d = run(tmp_path, ["", "x", "a very long caption " * 50], sizes=[(1, 1), (1, 100), (5, 5)])
    assert d.keep.all() and d.reasons == [None, None, None]


def test_caption_length_rules_name_the_evidence(tmp_path):
    d = run(tmp_path, ["a dog", "a dog on grass", "a dog on the green grass today", "ab cd"],
            min_words=3, max_words=5, min_chars=6)
    assert d.keep.tolist() == [False, True, False, False]
    assert d.reasons[0] == "caption has 2 words, fewer than min_words 3"
    assert d.reasons[2] == "caption has 7 words, more than max_words 5"
    assert d.reasons[3] == "caption has 2 words, fewer than min_words 3"  # the first rule wins
    d = run(tmp_path, ["ab cd", "abcdefgh"], min_chars=6, max_chars=7)
    assert d.reasons == ["caption has 5 characters, fewer than min_chars 6",
                         "caption has 8 characters, more than max_chars 7"]


def test_image_side_and_aspect_ratio(tmp_path):
    d = run(tmp_path, ["a b c"] * 4, sizes=[(64, 64), (10, 64), (64, 200), (64, 191)],
            min_image_side=16, max_aspect_ratio=3.0)
    assert d.keep.tolist() == [True, False, False, True]
    assert d.reasons[1] == "image 10x64: shorter side 10 below min_image_side 16"
    assert d.reasons[2] == "image 64x200: aspect ratio 3.12 above max_aspect_ratio 3.0"


def test_blocklist_matches_whole_words_case_insensitively(tmp_path):
    d = run(tmp_path, ["NSFW pic of a cat", "an unsfwx word", "a Stock   Photo of a car",
                       "stockphoto", "nsfw."], blocklist=["nsfw", "stock photo"])
    assert d.keep.tolist() == [False, True, False, True, False]
    assert d.reasons[0] == "caption contains blocklisted 'nsfw'"
    assert d.reasons[2] == "caption contains blocklisted 'stock   photo'"
    assert blocklist_pattern([" ", ""]) is None


def test_language_rule_uses_the_offline_detector(tmp_path):
    pytest.importorskip("langid")
    d = run(tmp_path, ["a photo of a dog playing on the beach with a red ball",
                       "ein Hund spielt am Strand mit einem roten Ball",
                       "un chien joue sur la plage avec une balle rouge"], languages=["en"])
    assert d.keep.tolist() == [True, False, False]
    assert d.reasons[1].startswith("caption language de (p=") and "not in ['en']" in d.reasons[1]
    assert d.reasons[2].startswith("caption language fr (p=")
    d = run(tmp_path, ["ein Hund spielt am Strand mit einem roten Ball"], languages=["en", "de"],
            min_language_confidence=0.5)
    assert d.keep.tolist() == [True]


def test_map_columns_are_one_row_per_item(tmp_path):
    step = Basic(Spec(step="basic"))
    step.prepare(StepContext(work=tmp_path))
    cols = step.map(PoolBatch(["a", "b"], ["one two", " x "], [Image.new("RGB", (3, 5))] * 2))
    assert cols["words"].tolist() == [2, 1] and cols["chars"].tolist() == [7, 1]
    assert cols["width"].tolist() == [3, 3] and cols["height"].tolist() == [5, 5]
    assert all(len(c) == 2 and c.dtype != object for c in cols.values())
    assert np.isnan(cols["language_prob"]).all()
