"""What every curation step shares: the spec base class, the batch of pool items a step maps
over, the context it is prepared in, and the decision it returns.

A step is a module in ``curate/steps/`` with a ``Spec`` (a `StepSpecBase` subclass declaring
``step: Literal["<name>"]`` and its own keys) and a class implementing `Step`:

1. ``prepare(context)`` runs once, on the driver (load a model, embed the evaluation sets,
   train a filtering network);
2. ``map(batch)`` turns one chunk of pool items into per-item columns (scores, hashes,
   embeddings). The batch holds decoded images only if the step's ``needs_images`` (an
   attribute or property, given its config; a step without one is given images) is true,
   else ``batch.images`` is None: decoding is most of a pass over a pool of photos. It must
   be deterministic and depend only on the batch and what ``prepare``
   built, because the engine runs it per chunk, caches its output for resumption, and may run
   it on other processes or Ray workers;
3. ``decide(items, columns)`` sees the columns of every item that reached the step (in pool
   order) and returns which to keep and why each other one is dropped: the global part
   (thresholds over the whole pool, duplicate clusters, balancing counts).

Items reach a step in pool order and only if every earlier step kept them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from cliplab.config import Section


def told_apart(a: float, b: float, least: int = 3) -> tuple[str, str]:
    """``a`` and ``b`` as a drop reason prints them: with the fewest decimals (``least`` or
    more) that tell them apart when they differ, so 0.2499 under a cut of 0.25 reads ``0.2499``
    and ``0.2500``, not ``0.250`` twice."""
    for digits in range(least, 18):
        shown = f"{a:.{digits}f}", f"{b:.{digits}f}"
        if shown[0] != shown[1] or a == b:
            return shown
    return repr(a), repr(b)  # apart below 1e-17: their shortest round-trip forms differ


class StepSpecBase(Section):
    """Keys every step takes: ``step`` (its registry name, narrowed by each subclass to a
    Literal) and an optional ``name`` for the report (default: the step name)."""

    step: str
    name: str | None = None

    def packages(self) -> dict[str, str]:
        """The modules (of the curate extra) this step imports as configured, each with what
        needs it: checked before a run does any work."""
        return {}

    def input_paths(self) -> list[str]:
        """The files and folders this step reads besides the pool and its model: stamped when
        the step starts, and a resumed run refused when one changed since."""
        return []


@dataclass
class PoolBatch:
    """A chunk of pool items: ``keys`` unique and stable (a path, ``shard.tar:key``,
    ``source#i``), the caption of each, the decoded RGB image at its stored size (None when
    the step mapping the batch does not need images; rows naming one image file may share one
    object, which steps only read), and any other columns the source had (``meta``)."""

    keys: list[str]
    captions: list[str]
    images: list[Image.Image] | None
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class PoolItems:
    """What ``decide`` sees of the items that reached the step: keys and captions in pool order
    (images are not held in memory; whatever ``decide`` needs of them ``map`` put in a column);
    sequences of ``str``, not necessarily lists (a run gives views of the pool's columns)."""

    keys: Sequence[str]
    captions: Sequence[str]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class StepContext:
    """Where a step is prepared: ``work`` is the step's own folder for artefacts it builds
    (a trained filtering network, a count table), kept across a resumed run; ``device`` is
    where a step that loads a model runs it."""

    work: Path
    seed: int = 0
    progress: bool = True
    device: str = "cpu"  # where a step's model runs: a device name (auto, cpu, cuda, ...)


@dataclass
class Decision:
    """A step's verdict on the items it saw (arrays aligned with `PoolItems`).

    ``reasons[i]`` says why item ``i`` is dropped (a short sentence naming the evidence, e.g.
    ``"clip score 0.12 below threshold 0.25"``, ``"exact duplicate of a/b.jpg"``) and is ``None``
    for kept items. ``scores`` (optional) is the per-item value the step thresholded, drawn as
    the report's histogram with ``threshold``. ``report`` holds step-specific material for the
    report, under these keys when present:

    - ``"clusters"``: list of lists of keys (duplicate groups; the first key is the one kept),
    - ``"matches"``: list of dicts ``{"key", "match", "similarity", "match_image", ...}``
      (pool item vs the evaluation image it matches; ``match`` is a key/reference the report
      can show, ``match_image`` a picture of it the step wrote),
    - ``"histogram_before"`` / ``"histogram_after"``: ``{concept: count}`` (balancing),
    - ``"files"``: ``{label: path}`` of artefacts the step wrote (count tables, models),
    - anything else JSON-serialisable, listed as-is.

    Paths the step wrote under its work folder are saved relative to the run folder.
    """

    keep: np.ndarray  # bool [n]
    reasons: list[str | None]
    scores: np.ndarray | None = None
    threshold: float | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keep = np.asarray(self.keep, dtype=bool)
        if len(self.reasons) != len(self.keep):
            raise ValueError(f"{len(self.reasons)} reasons for {len(self.keep)} items")
        for i, (kept, reason) in enumerate(zip(self.keep, self.reasons)):
            if kept == (reason is not None):
                raise ValueError(f"item {i}: a dropped item needs a reason, a kept one none")


class Step(Protocol):
    """The interface of a curation step (see the module docstring)."""

    needs_images: bool  # whether ``map`` looks at ``batch.images`` (given the spec)

    def __init__(self, spec: StepSpecBase) -> None: ...

    def prepare(self, context: StepContext) -> None: ...

    def map(self, batch: PoolBatch) -> dict[str, np.ndarray]: ...

    def decide(self, items: PoolItems, columns: dict[str, np.ndarray]) -> Decision: ...
