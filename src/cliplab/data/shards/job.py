"""`cliplab data shard`: resolve a source spec and writer settings, then write the shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cliplab.config import OutFolder, Section, refuse_unused
from cliplab.data.folder_files import with_folder_captions
from cliplab.data.shards.from_files import streams, write_source
from cliplab.data.shards.write import check_out_folder, write_shards
from cliplab.data.sources import (DataSpecField, load_source, refuse_multilabel,
                                  with_paths_resolved)
from cliplab.output_folder import same_folder, spec_paths
from cliplab.errors import ConfigError


class ShardConfig(Section):
    """`cliplab data shard`'s config: ``data`` (a source spec, or ``--source``), ``out`` (the
    shard folder, or ``--out``) and the writer's settings."""

    renamed = {"source": "data.source (the source spec goes under data:)"}
    data: DataSpecField
    out: OutFolder
    samples_per_shard: int = Field(1000, ge=1)
    image_format: Literal["jpg", "png"] = "jpg"
    quality: int = Field(95, ge=1, le=100)
    overwrite: bool = False

    @field_validator("data", mode="before")  # before the spec's own check
    @classmethod
    def _names_a_source(cls, value: Any) -> Any:
        if isinstance(value, dict) and "source" not in value:
            raise ValueError("say what to shard: data.source (or --source NAME: a built-in "
                             "source such as fashion-mnist, a manifest path, a shard folder "
                             "or an image folder)")
        return value

    @model_validator(mode="after")
    def _quality_for_jpg(self) -> "ShardConfig":
        if self.image_format != "jpg":  # PNG is lossless: no quality setting
            refuse_unused(self, ["quality"], "unless image_format is jpg")
        return self


def run_shard(config: ShardConfig, progress: bool = True) -> dict:
    """Write ``config.data`` as shards; return the index. A source read from files (an image
    folder, a manifest, a shard folder) is read and written one image at a time, each image at
    its own size (`cliplab.data.shards.from_files`); an in-memory source is loaded whole."""
    out = Path(config.out).expanduser()
    spec = config.data
    for key in ("path", "root"):
        if key in spec and same_folder(Path(str(spec[key])).resolve(), out.resolve()):
            raise ConfigError(f"--out {out} is the source's own folder; write the shards elsewhere")
    overwrite = config.overwrite
    check_out_folder(out, overwrite, spec_paths(spec))  # before the possibly long load
    spec = with_folder_captions(spec)
    if streams(spec):  # a source read from files: image by image, each at its own size
        return write_source(spec, out, samples_per_shard=config.samples_per_shard,
                            image_format=config.image_format, quality=config.quality,
                            overwrite=overwrite, progress=progress, where="data")
    data = load_source(spec, progress, "data")  # an in-memory source (shapes, digits, ...)
    refuse_multilabel(data, "data")
    return write_shards(data, out, samples_per_shard=config.samples_per_shard,
                        image_format=config.image_format, quality=config.quality,
                        overwrite=overwrite, source=with_paths_resolved(spec),
                        progress=progress)

