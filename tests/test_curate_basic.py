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


@pytest.mark.parametrize("unit", ["words", "chars"])
def test_a_minimum_above_its_maximum_is_a_config_error(tmp_path, unit):
    from cliplab.config import load_config
    from cliplab.curate.config import CurateConfig
    from cliplab.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(f"data: shapes\nsteps:\n  - {{step: exact_dedup}}\n"
                    f"  - {{step: basic, min_{unit}: 50, max_{unit}: 40}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(CurateConfig, path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert f"steps[1]: min_{unit} 50 is above max_{unit} 40" in message
    equal = Spec(step="basic", **{f"min_{unit}": 4, f"max_{unit}": 4})  # a range of one
    assert getattr(equal, f"min_{unit}") == getattr(equal, f"max_{unit}") == 4


def test_languages_are_lower_case_codes(tmp_path):
    """[english] or [EN] validated, then matched no caption's language: 300 of 300 dropped."""
    from cliplab.config import load_config
    from cliplab.curate.config import CurateConfig
    from cliplab.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("data: shapes\nsteps:\n  - {step: basic, languages: [en]}\n",
                    encoding="utf-8")
    assert load_config(CurateConfig, path).steps[0].languages == ["en"]
    with pytest.raises(ConfigError, match=r"command line: steps\[0\].languages: 'english', "
                       r"'EN', 'eng' is no language langid detects: give lower-case ISO 639-1 "
                       r"codes \(en, de, fr, ...; 97 in all: af am "):
        load_config(CurateConfig, path, ["steps.0.languages=[english, EN, en, eng]"])


def test_the_language_codes_are_langids():
    from langid.langid import LanguageIdentifier, model

    from cliplab.curate.steps.basic import LANGID_CODES

    assert list(LANGID_CODES) == list(LanguageIdentifier.from_modelstring(model).nb_classes)


def test_a_prepared_step_pickles_and_detects_languages_after(tmp_path):
    """Worker processes get the step pickled after ``prepare``; they build the identifier."""
    import pickle

    pytest.importorskip("langid")
    step = Basic(Spec(step="basic", languages=["en"]))
    step.prepare(StepContext(work=tmp_path))
    copy = pickle.loads(pickle.dumps(step))
    batch = PoolBatch(["a", "b"], ["a dog runs on the beach", "ein Hund spielt am Strand"],
                      [Image.new("RGB", (8, 8))] * 2)
    assert copy.map(batch)["language"].tolist() == step.map(batch)["language"].tolist() == \
        ["en", "de"]


def test_caption_length_limits_are_inclusive(tmp_path):
    """A caption of exactly max_words words, or exactly min_chars characters, passes."""
    d = run(tmp_path, ["one two three four five", "one two three four five six"], max_words=5)
    assert d.keep.tolist() == [True, False]
    assert d.reasons[1] == "caption has 6 words, more than max_words 5"
    d = run(tmp_path, ["abcdef", " abcde "], min_chars=6)
    assert d.keep.tolist() == [True, False]
    assert d.reasons[1] == "caption has 5 characters, fewer than min_chars 6"


def test_language_confidence_below_the_minimum_drops_the_caption(tmp_path):
    """langid gives "a dog" English at p~0.17 (too short to tell) and a whole sentence at
    p~1.0: with min_language_confidence 0.5 only the sentence is kept."""
    pytest.importorskip("langid")
    captions = ["a photo of a dog playing on the beach with a red ball", "a dog"]
    d = run(tmp_path, captions, languages=["en"], min_language_confidence=0.5)
    assert d.keep.tolist() == [True, False]
    assert d.reasons[1] == "caption language en (p=0.17) not in ['en'] with p >= 0.5"
    assert run(tmp_path, captions, languages=["en"]).keep.tolist() == [True, True]


@pytest.mark.parametrize("languages", [None, []])
def test_min_language_confidence_without_languages_is_refused(languages):
    from cliplab.curate.steps.registry import step_spec
    from cliplab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"steps\[0\]: min_language_confidence has no effect "
                       r"unless languages is given; drop it$"):
        step_spec({"step": "basic", "languages": languages, "min_language_confidence": 0.5},
                  "curate.yaml", "steps[0]")
    Spec(step="basic", languages=languages, min_language_confidence=0.0)  # the default
    Spec(step="basic", languages=["en"], min_language_confidence=0.5)
