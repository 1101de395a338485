"""`cliplab pretrain` config values checked at load, each a one-line error naming its key:
``train.augment`` overrides, streamed shard options, and true/false given for a number."""

import math

import pytest
import yaml

from cliplab.cli import main
from cliplab.config import validate
from cliplab.data.shapes import load_shapes
from cliplab.data.shards import write_shards
from cliplab.errors import ConfigError
from cliplab.train.config import TrainConfig
from cliplab.train.pretrain import PretrainConfig, run_pretrain

MODEL = {"name": "tiny-clip", "options": {"image_size": 16, "patch_size": 8, "width": 32,
                                            "layers": 1, "heads": 2, "embed_dim": 16,
                                            "context_length": 48}}


@pytest.mark.parametrize("augment, key, words", [
    ({"scale": [math.nan, 1]}, "scale.0", "finite number"),
    ({"translate": math.inf}, "translate", "finite number"),
    ({"rotate_deg": -math.inf}, "rotate_deg", "finite number"),
    ({"hflip": "maybe"}, "hflip", "valid boolean"),
    ({"hflip": 1}, "hflip", "valid boolean"),
    ({"scale": 0.9}, "scale", "[low, high]"),
    ({"scale": [0.9]}, "scale", "[low, high]"),
    ({"scale": [0.9, 1.0, 1.1]}, "scale", "[low, high]"),
    ({"scale": [1.1, 0.9]}, "scale", "low <= high"),
    ({"scale": [0, 1]}, "scale.0", "greater than 0"),
    ({"translate": -0.1}, "translate", "greater than or equal to 0"),
    ({"translate": True}, "translate", "expected a number"),
])
def test_bad_augment_values_name_their_key(augment, key, words):
    """They trained to NaN weights without a word (nan, inf) or failed with a traceback at
    the first step (the rest)."""
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"augment": augment})
    message = str(err.value)
    assert message.startswith(f"the config: train.augment.{key}: ") and words in message
    assert "\n" not in message


def test_good_augment_overrides_are_kept_as_numbers():
    """A number YAML reads as a string (``1e1``) is the number, as everywhere in a config;
    only the keys given are overrides; unknown keys keep their message."""
    assert TrainConfig.from_dict({"augment": {"rotate_deg": "1e1"}}).augment == \
        {"rotate_deg": 10.0}
    assert TrainConfig.from_dict({"augment": {"scale": [0.8, 1], "hflip": False}}).augment == \
        {"scale": [0.8, 1.0], "hflip": False}
    assert TrainConfig.from_dict({"augment": {}}).augment is True
    with pytest.raises(ConfigError, match=r"train\.augment: unknown augment option.*'flip'"):
        TrainConfig.from_dict({"augment": {"flip": False}})


def test_a_bad_augment_value_stops_the_command_before_any_work(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": MODEL, "data": {"train": {"source": "shapes"}}}))
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(recipe), "--out", str(out), "--no-progress",
                 "train.augment={scale: [.nan, 1]}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"cliplab: error: {recipe} + command line: train.augment.scale.0: expected a "
                   "finite number, got nan\n")
    assert not out.exists()


@pytest.mark.parametrize("key", ["lr", "epochs", "warmup", "weight_decay", "min_lr_ratio",
                                 "grad_clip", "dist_timeout_s"])
def test_true_or_false_is_no_number(key):
    """``train.lr=true`` trained at rate 1.0 and ``train.epochs=true`` for one epoch."""
    with pytest.raises(ConfigError, match=rf"train\.{key}: expected a number, got True"):
        TrainConfig.from_dict({key: True})


def test_numbers_stay_numbers_and_a_scale_is_no_boolean():
    with pytest.raises(ConfigError, match=r"train\.lr_scale\.proj: expected a number"):
        TrainConfig.from_dict({"lr_scale": {"proj": False}})
    cfg = TrainConfig.from_dict({"lr": "2e-3", "epochs": 2, "lr_scale": {"proj": 0}})
    assert (cfg.lr, cfg.epochs, cfg.lr_scale) == (0.002, 2.0, {"proj": 0.0})


def _pretrain_config(train: dict) -> PretrainConfig:
    return validate(PretrainConfig, {"model": MODEL, "data": {"train": train}}, "r.yaml")


@pytest.mark.parametrize("option, key, words", [
    ({"shuffle_buffer": "lots"}, "shuffle_buffer", "valid integer"),
    ({"shuffle_buffer": math.nan}, "shuffle_buffer", "finite number"),
    ({"shuffle_buffer": -5}, "shuffle_buffer", "greater than or equal to 0"),
    ({"image_size": 16.7}, "image_size", "fractional part"),
    ({"image_size": 0}, "image_size", "greater than 0"),
    ({"num_workers": True}, "num_workers", "expected an integer"),
    ({"num_workers": -1}, "num_workers", "greater than or equal to 0"),
    ({"channels": 2}, "channels", "expected 1 or 3"),
    ({"caption": "best"}, "caption", "'random' or 'first'"),
    ({"caption": "all"}, "caption", "one per image: use random or first"),
    ({"stream": "maybe"}, "stream", "valid boolean"),
])
def test_bad_stream_options_name_their_key(option, key, words):
    """They failed with a traceback (a ValueError, a TypeError inside the DataLoader, every
    caption where a step takes one) or were taken silently (a negative shuffle buffer turned
    shuffling off, ``true`` workers)."""
    spec = {"source": "shards", "path": "shards", "stream": True, **option}
    with pytest.raises(ConfigError) as err:
        _pretrain_config(spec)
    message = str(err.value)
    assert message.startswith(f"r.yaml: data.train.{key}: ") and words in message
    assert "\n" not in message


def test_stream_options_are_parsed_and_unknown_ones_listed():
    spec = {"source": "shards", "path": "shards", "stream": True, "shuffle_buffer": "16"}
    assert _pretrain_config(spec).data.train == {**spec, "shuffle_buffer": 16}
    with pytest.raises(ConfigError, match=r"^r\.yaml: data\.train: unknown option\(s\) "
                                          r"\['shufle_buffer'\] of a streamed shard source"):
        _pretrain_config({**spec, "shufle_buffer": 3})
    with pytest.raises(ConfigError, match=r"data\.train: stream: true streams WebDataset shards"):
        _pretrain_config({"source": "shapes", "stream": True})


def test_stream_false_reads_the_shards_whole(tmp_path):
    """``stream`` is a key of a shard source: false was refused as an unknown option."""
    shards = tmp_path / "shards"
    write_shards(load_shapes(n=32, seed=0, kinds=("single",), image_size=32), shards,
                 samples_per_shard=16, image_format="png", progress=False)
    cfg = {"model": MODEL,
           "data": {"train": {"source": "shards", "path": str(shards), "stream": False}},
           "train": {"steps": 1, "batch_size": 16, "augment": False, "progress": False},
           "out": str(tmp_path / "run")}
    results = run_pretrain(cfg, progress=False)
    assert results["train"]["step"] == 1
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["train"] == {"source": "shards", "path": str(shards)}


def test_a_replay_spec_without_ratio_says_it_needs_one():
    """data.replay without 'ratio' is a one-line ConfigError naming 'ratio' (was a KeyError)."""
    with pytest.raises(ConfigError) as err:
        validate(PretrainConfig, {"model": MODEL, "data": {"train": {"source": "shapes"},
                                                           "replay": {"source": "shapes"}}},
                 "r.yaml")
    assert str(err.value) == ("r.yaml: data.replay: needs 'ratio' (the fraction of each batch, "
                              "e.g. 0.2) and a source spec, e.g. {ratio: 0.2, source: shapes, "
                              "n: 4000}")


def test_a_replay_ratio_of_0_is_refused_not_recorded_as_replayed():
    """ratio 0 gave batches of the new data alone, bit for bit, while config.yaml recorded a
    replay source: refused in one line."""
    with pytest.raises(ConfigError) as err:
        validate(PretrainConfig, {"model": MODEL, "data": {
            "train": {"source": "shapes"}, "replay": {"ratio": 0, "source": "shapes"}}}, "r.yaml")
    assert str(err.value) == ("r.yaml: data.replay: ratio 0 replays nothing; give a fraction "
                              "above 0 (e.g. 0.2) or leave data.replay out")
