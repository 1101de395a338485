"""Writing a benchmark's results file when only some of its entries were re-run."""

from __future__ import annotations

import json
from pathlib import Path


def write_merged(out: Path, entries: list[dict], order: list[str]) -> list[dict]:
    """Write ``entries`` (each with a ``claim_id``) into ``out``, keeping the entries of ``out``
    this run did not redo (a run with ``--claims X`` replaces X only), in ``order``; entries of
    ``out`` without a ``claim_id`` are kept after them. Returns what was written."""
    old = json.loads(out.read_text()) if out.is_file() else []
    by_id = {e["claim_id"]: e for e in old if "claim_id" in e}
    by_id.update((e["claim_id"], e) for e in entries)
    merged = [by_id[n] for n in order if n in by_id] + [e for e in old if "claim_id" not in e]
    out.write_text(json.dumps(merged, indent=2) + "\n")
    return merged
