"""The config of `cliplab index` (one `Section` schema, like every stage)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cliplab.config import OutFolder, Section
from cliplab.data.collection import source_spec_field
from cliplab.models.device import Device
from cliplab.models.spec import ModelField


DEFAULT_RECALL = 0.95


class IndexConfig(Section):
    """What to index with which model, where, and how to search it."""

    model: ModelField
    data: str | dict[str, Any]   # a source name or path, or a spec: read as `source_spec`
    out: OutFolder
    add: bool = False                   # append to an existing index instead of refusing it
    overwrite: bool = False             # replace an existing index (only one) instead
    # backend, uri, collection and index_type: None is the default, resolved by `build_index`
    # (a new index: faiss, auto, a fresh collection; --add: the index's own backend, uri and
    # index type, and a fresh collection)
    backend: Literal["faiss", "milvus"] | None = None
    uri: str | None = None              # milvus: ./file.db (Milvus Lite) or http://host:19530
    collection: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
    index_type: str | None = None       # auto | flat | hnsw | ivf-flat | ivf-pq | FAISS factory
    # recall@10 target the search breadth is tuned to (0.95; an --add's: the index's own)
    recall: float | None = Field(None, gt=0, le=1)
    max_memory_gb: float | None = Field(None, gt=0)  # budget for auto (default: half the RAM)
    batch_size: int = Field(64, ge=1, le=4096)
    chunk: int = Field(1024, ge=1)      # items embedded between two progress records
    device: Device = "auto"             # where the model embeds (not part of the request)

    @field_validator("data", mode="before")
    @classmethod
    def _a_source(cls, value: Any) -> dict:
        return source_spec_field(value)

    @model_validator(mode="after")
    def _add_or_overwrite(self) -> "IndexConfig":
        if self.add and self.overwrite:
            raise ValueError("add appends to the index at --out and overwrite replaces it; "
                             "give one of them")
        return self
