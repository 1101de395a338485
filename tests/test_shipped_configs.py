"""Every recipe in configs/ validates against the schema of the command it is written for (the
keys a command's own options supply, such as --model, filled in), so a shipped recipe never
starts with a config error; so do the overrides its header suggests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cliplab.config import load_config

CONFIGS = (Path(__file__).resolve().parents[1] / "configs").resolve()  # src/cliplab/configs
# what the command line adds to each kind of recipe, under the recipe's own keys
COMMAND_LINE = {"adapt": {"model": "tiny-clip"}, "index": {"model": "tiny-clip", "data": "shapes",
                                                            "out": "idx"},
                "merge": {"out": "merged", "models": ["a", "b"]}, "curate": {"out": "curated"}}


def _schema(kind: str):
    from cliplab.adapt.config import AdaptConfig
    from cliplab.curate.config import CurateConfig
    from cliplab.data.shards.job import ShardConfig
    from cliplab.evaluate.suite import SuiteSpec
    from cliplab.merge.config import MergeConfig
    from cliplab.quickstart import QuickstartConfig
    from cliplab.serve.settings import IndexConfig
    from cliplab.train.pretrain import PretrainConfig

    return {"adapt": AdaptConfig, "curate": CurateConfig, "data": ShardConfig,
            "eval": SuiteSpec, "merge": MergeConfig, "quickstart.yaml": QuickstartConfig,
            "index": IndexConfig, "pretrain": PretrainConfig}[kind]


RECIPES = sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.yaml"))


def test_every_kind_of_recipe_is_checked():
    assert {r.parts[0] for r in RECIPES} == {"adapt", "curate", "data", "eval", "index", "merge",
                                             "pretrain", "quickstart.yaml"}


def _validated(recipe: str | Path, overrides: list[str] = ()):
    """The recipe with ``overrides`` checked as its command checks it: an adapt recipe's
    options by its method's own schema too."""
    kind = Path(recipe).parts[0]
    cfg = load_config(_schema(kind), CONFIGS / recipe, overrides,
                      extra=COMMAND_LINE.get(kind, {}))
    if kind == "adapt":
        from cliplab.adapt.run import checked_config

        checked_config(cfg, str(recipe))
    return cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_recipe_validates(recipe):
    assert _validated(recipe) is not None


# the key=value overrides a recipe's header comment (or README's line for it) suggests; FOLDER
# is a model folder (the fine-tune wise-ft is given)
SUGGESTED = [("adapt/wise-ft.yaml", ["options.finetuned=FOLDER"]),
             ("adapt/wise-ft.yaml", ["options.train.lr=1e-3", "options.train_head=false"]),
             ("adapt/lora.yaml", ["options.rank=4", "options.merge=true"]),
             ("adapt/fashion-mnist.yaml", ["shots=16", "seed=1"]),
             ("adapt/fashion-mnist.yaml", ["method=cocoop", "options.init=''",
                                           "options.n_ctx=8", "options.class_specific=true"]),
             ("data/shard-fashion-mnist.yaml", ["data.split=test",
                                                "out=shards/fashion-mnist-test"]),
             ("merge/greedy-soup.yaml", ["metric=mean_per_class_recall"])]


@pytest.mark.parametrize("recipe,overrides", SUGGESTED, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else v)
def test_the_overrides_a_recipe_suggests_are_accepted(recipe, overrides, tiny_model_dir):
    """The shipped wise-ft recipe set the fine-tune's train settings, which are refused beside
    options.finetuned: the override its header and README suggest could never run."""
    overrides = [o.replace("FOLDER", str(tiny_model_dir)) for o in overrides]
    assert _validated(recipe, overrides) is not None


def test_a_recipe_of_every_key_lists_every_key():
    """configs/index/collection.yaml says it holds every key of `cliplab index` at its default
    (the command line's model, data and out aside); `device` was missing."""
    recipe = yaml.safe_load((CONFIGS / "index" / "collection.yaml").read_text())
    fields = set(_schema("index").model_fields) - set(COMMAND_LINE["index"])
    assert set(recipe) == fields
    defaults = {name: f.default for name, f in _schema("index").model_fields.items()}
    assert {key: value for key, value in recipe.items() if value != defaults[key]} == {}


def test_a_configs_path_missing_here_reads_the_shipped_config(tmp_path, monkeypatch):
    """After a pip install there is no configs/ folder where the user runs cliplab: README's
    `--config configs/...` reads the copy the package ships; a file of that name here wins."""
    from cliplab.config import load_yaml, shipped_config
    from cliplab.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    name = "configs/pretrain/tiny-shapes.yaml"
    assert shipped_config(name) == CONFIGS / "pretrain" / "tiny-shapes.yaml"
    assert load_yaml(name) == yaml.safe_load((CONFIGS / "pretrain" / "tiny-shapes.yaml")
                                             .read_text(encoding="utf-8"))
    (tmp_path / "configs" / "pretrain").mkdir(parents=True)
    (tmp_path / name).write_text("model: mine\n", encoding="utf-8")
    assert load_yaml(name) == {"model": "mine"}
    with pytest.raises(ConfigError, match="config file configs/pretrain/nope.yaml does not exist"):
        load_yaml("configs/pretrain/nope.yaml")
    # only the shipped configs: a path climbing out of them is left as given
    assert shipped_config("configs/../../cliplab/config.py") == \
        Path("configs/../../cliplab/config.py")


def test_the_package_data_ships_every_config():
    """The wheel holds what pyproject's package-data globs match: every shipped config."""
    import fnmatch
    import tomllib

    pyproject = tomllib.loads((CONFIGS.parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["cliplab"]
    package = CONFIGS.parent
    files = [p.relative_to(package).as_posix() for p in CONFIGS.rglob("*") if p.is_file()]
    assert files and all(any(fnmatch.fnmatchcase(f, g) and f.count("/") == g.count("/")
                             for g in globs) for f in files), files
