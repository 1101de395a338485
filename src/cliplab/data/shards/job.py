"""`cliplab data shard`: resolve a source spec and writer settings, then write the shards."""

from __future__ import annotations

import inspect
from pathlib import Path

from cliplab.config import apply_overrides, check_keys
from cliplab.data.manifest import FORMATS as MANIFEST_FORMATS
from cliplab.data.shards.write import check_out_folder, write_shards
from cliplab.data.sources import SOURCES, load_source, source_loader
from cliplab.errors import ConfigError

WRITER_KEYS = {"out", "samples_per_shard", "image_format", "quality", "overwrite"}


def source_spec(name: str) -> dict:
    """``{source: NAME}`` for a built-in source; a manifest file or shard folder by its path."""
    if name in SOURCES:
        return {"source": name}
    path = Path(name)
    if path.suffix.lower() in MANIFEST_FORMATS:
        return {"source": "manifest", "path": name}
    if path.is_dir():
        return {"source": "shards", "path": name}
    raise ConfigError(f"unknown data source {name!r}: not one of {', '.join(SOURCES)}, "
                      "a manifest (.csv/.jsonl/.parquet) or a shard folder")


def shard_config(config: dict, source: str | None, overrides: list[str]) -> dict:
    """The job config: ``{data: SPEC, out, samples_per_shard, ...}``. A YAML holding a bare spec
    (``source:`` at the top) is the ``data`` section; overrides of keys other than the writer's
    go to ``data`` (``split=test`` means ``data.split=test``)."""
    if "source" in config and "data" not in config:
        config = {"data": {k: v for k, v in config.items() if k not in WRITER_KEYS},
                  **{k: v for k, v in config.items() if k in WRITER_KEYS}}
    if source is not None:
        config = {**config, "data": {**(config.get("data") or {}), **source_spec(source)}}
    routed = [item if item.split("=", 1)[0].split(".", 1)[0] in WRITER_KEYS | {"data"}
              else f"data.{item}" for item in overrides]
    config = apply_overrides(config, routed)
    check_keys(config, WRITER_KEYS | {"data"}, "the shard config")
    if not isinstance(config.get("data"), dict) or "source" not in config["data"]:
        raise ConfigError("say what to shard: --source NAME (e.g. fashion-mnist, a manifest "
                          "path) or a --config with data: {source: ...}")
    if not config.get("out"):
        raise ConfigError("say where to write the shards: --out DIR")
    return config


def run_shard(config: dict, progress: bool = True) -> dict:
    """Load ``config['data']`` and write it as shards; return the index."""
    out = Path(config["out"])
    spec = config["data"]
    for key in ("path", "root"):
        if key in spec and Path(str(spec[key])).resolve() == out.resolve():
            raise ConfigError(f"--out {out} is the source's own folder; write the shards elsewhere")
    overwrite = bool(config.get("overwrite", False))
    check_out_folder(out, overwrite)  # before the possibly long load
    reader = source_loader(spec["source"])
    quiet = {"progress": progress} if "progress" in inspect.signature(reader).parameters \
        and "progress" not in spec else {}
    data = load_source({**spec, **quiet})
    return write_shards(data, out, samples_per_shard=int(config.get("samples_per_shard", 1000)),
                        image_format=str(config.get("image_format", "jpg")),
                        quality=int(config.get("quality", 95)),
                        overwrite=overwrite, source=spec,
                        progress=progress)
