"""`cliplab curate`'s config: the pool (``data``), the steps in order, the output and the engine.

The whole config, every step's own keys included, is validated before any work: a bad key in
the third step is one line naming the file and ``steps[2].key``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from cliplab.config import OutFolder, Section, refuse_unused
from cliplab.curate.steps.base import StepSpecBase
from cliplab.curate.steps.registry import step_spec
from cliplab.data.collection import source_spec_field
from cliplab.errors import CliplabError
from cliplab.models.device import Device


class OutputSpec(Section):
    """How the kept pool is written: ``shards`` (WebDataset tars holding each image's original
    bytes; in-memory sources as PNG) or ``manifest`` (``kept.parquet``: key, image path,
    caption, location, metadata; images without a file of their own are copied to ``images/``)."""

    format: Literal["shards", "manifest"] = "shards"
    samples_per_shard: int = Field(1000, ge=1)

    @field_validator("samples_per_shard", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any) -> Any:
        # so that output.format=manifest can clear a recipe's shard size from the command line
        return cls.model_fields["samples_per_shard"].default if value is None else value

    @model_validator(mode="after")
    def _shard_size_for_shards(self) -> "OutputSpec":
        if self.format != "shards":
            refuse_unused(self, ["samples_per_shard"], "unless format is shards",
                          how="output.samples_per_shard=null clears a recipe's")
        return self


class CurateConfig(Section):
    """What to curate (``data``: a built-in source name, a manifest file, a shard folder, an
    image folder or a ``{source: ...}`` mapping), the ``steps`` in order, the ``output``,
    pool items per cached chunk (``chunk_size``), ``seed``, the ``engine`` (``local``: in this
    process, or ``workers`` processes; ``ray``: ``workers`` Ray actors per step, on the
    cluster at ``ray_address`` (else ``RAY_ADDRESS``'s) or a local instance), ``examples``
    (dropped pairs shown per step in the report) and ``device``, where the steps' models run
    (the local engine's; Ray's actors map on their CPUs)."""

    data: dict[str, Any]
    steps: list[SerializeAsAny[StepSpecBase]] = []
    output: OutputSpec = OutputSpec()
    chunk_size: int = Field(256, ge=1)
    seed: int = 0
    engine: Literal["local", "ray"] = "local"
    workers: int = Field(1, ge=1)
    ray_address: str | None = None
    examples: int = Field(8, ge=0)
    device: Device = "auto"
    out: OutFolder | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _a_source(cls, value: Any) -> dict:
        return source_spec_field(value)

    @model_validator(mode="before")
    @classmethod
    def _step_specs(cls, data: Any) -> Any:
        """Each step validated by its own ``Spec`` (errors name ``steps[i].key``)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("steps"), list):
            return data
        specs = []
        for i, raw in enumerate(data["steps"]):
            try:
                specs.append(step_spec(raw, "", prefix=f"steps[{i}]"))
            except CliplabError as err:
                message = str(err)
                raise ValueError(message if message.startswith(f"steps[{i}]")
                                 else f"steps[{i}]: {message}") from None
        names = [spec.name or spec.step for spec in specs]
        if "read" in names:
            raise ValueError(f"steps[{names.index('read')}]: 'read' is the name of reading the "
                             "pool (its drops are reported under it); choose another name")
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"steps: two steps are named {doubled[0]!r}; give one a `name:`")
        return {**data, "steps": specs}

    @model_validator(mode="after")
    def _ray_maps_on_cpus(self) -> "CurateConfig":
        if self.engine == "ray" and self.device not in ("auto", "cpu"):
            raise ValueError(f"device: {self.device} runs the steps' models with engine local "
                             "(one process, or workers sharing the GPU); engine ray maps on "
                             "its actors' CPUs")
        if self.engine != "ray":
            refuse_unused(self, ["ray_address"], "unless engine is ray")
        if not any(getattr(spec, "model", None) is not None for spec in self.steps):
            # as merge's device without heldout: a setting that changes nothing is refused
            refuse_unused(self, ["device"], "without a step that runs a model (clip_score, "
                          "semantic_dedup, dfn, decontaminate with a threshold)")
        return self

    def step_device(self) -> str:
        """Where the steps' models run: the device's name (the CPU for Ray's actors)."""
        return "cpu" if self.engine == "ray" else self.device



def step_name(spec: StepSpecBase) -> str:
    """The name a step is reported under (its ``name``, else its registry name)."""
    return spec.name or spec.step
