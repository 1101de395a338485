"""Which command a config file is for: a curate recipe given to ``cliplab adapt`` is told as
such in one line, not as a list of every curate key adapt does not know."""

from __future__ import annotations

import importlib
from pathlib import Path

# each command's config schema (module, class), imported only when a config is refused
CONFIG_SCHEMAS: dict[str, tuple[str, str]] = {
    "quickstart": ("cliplab.quickstart", "QuickstartConfig"),
    "data shard": ("cliplab.data.shards.job", "ShardConfig"),
    "curate": ("cliplab.curate.config", "CurateConfig"),
    "pretrain": ("cliplab.train.pretrain", "PretrainConfig"),
    "adapt": ("cliplab.adapt.config", "AdaptConfig"),
    "merge": ("cliplab.merge.config", "MergeConfig"),
    "eval": ("cliplab.evaluate.suite", "SuiteSpec"),
    "report": ("cliplab.evaluate.report", "ReportConfig"),
    "index": ("cliplab.serve.settings", "IndexConfig"),
}


def _schema(command: str):
    module, name = CONFIG_SCHEMAS[command]
    return getattr(importlib.import_module(module), name)


def config_keys(command: str) -> set[str]:
    """The top-level keys ``command``'s config takes."""
    return set(_schema(command).model_fields)


def _takes(command: str, config: dict) -> bool:
    """Whether ``command``'s schema accepts ``config`` as it is."""
    from cliplab.config import validate
    from cliplab.errors import ConfigError

    try:
        validate(_schema(command), config)
    except ConfigError:
        return False
    return True


def other_command_hint(command: str, path: str | Path | None) -> str | None:
    """When the config file at ``path`` has top-level keys ``command`` does not take and every
    one of its keys is another command's: a line naming that command; else None."""
    from cliplab.config import load_yaml
    from cliplab.errors import ConfigError

    if command not in CONFIG_SCHEMAS or path is None:
        return None
    try:
        config = load_yaml(path)
    except ConfigError:
        return None
    foreign = sorted(set(config) - config_keys(command))
    if not foreign:
        return None
    # a file several schemas' keys could hold (pretrain's and quickstart's are the same) is
    # told by which of them accepts it whole; if none does (merge and index take required
    # keys from the command line), by its keys alone
    others = [c for c in CONFIG_SCHEMAS if c != command and set(config) <= config_keys(c)]
    owners = [c for c in others if _takes(c, config)] or others
    if not owners:
        return None
    named = " or ".join(f"`cliplab {other}`" for other in owners)
    keys = f"key {foreign[0]} is" if len(foreign) == 1 else f"keys {', '.join(foreign)} are"
    return (f"{path} is a config for {named}, not for `cliplab {command}` (its {keys} not "
            f"{command}'s); run `cliplab {owners[0]} --config {path}`")
