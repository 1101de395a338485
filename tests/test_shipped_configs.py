"""Every recipe in configs/ validates against the schema of the command it is written for (the
keys a command's own options supply, such as --model, filled in), so a shipped recipe never
starts with a config error."""

from __future__ import annotations

from pathlib import Path

import pytest

from cliplab.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
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


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_recipe_validates(recipe):
    kind = recipe.parts[0]
    cfg = load_config(_schema(kind), CONFIGS / recipe, extra=COMMAND_LINE.get(kind, {}))
    assert cfg is not None
