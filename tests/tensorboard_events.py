"""Reading back the TensorBoard events a run folder holds, as TensorBoard shows them."""

from __future__ import annotations

from pathlib import Path


def scalar_events(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event per tag, as ``(step, value)`` in file order, after TensorBoard's own
    purge of the events a restarted writer declared stale (so a value logged twice for one
    step shows twice)."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}
