"""Writing a benchmark's results file when only some of its entries were re-run."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_merged(out: Path, entries: list[dict], order: list[str]) -> list[dict]:
    """Write ``entries`` (each with a ``claim_id``) into ``out``, keeping the entries of ``out``
    this run did not redo (a run with ``--claims X`` replaces X only), in ``order``. An entry
    of ``out`` is redone when it has the ``claim_id`` of a new one or, written before entries
    had one, its ``claim``. Returns what was written."""
    old = json.loads(out.read_text()) if out.is_file() else []
    ids = {e["claim_id"] for e in entries}
    claims = {e.get("claim") for e in entries}
    kept = [e for e in old if e.get("claim_id", None) not in ids
            and ("claim_id" in e or e.get("claim") not in claims)]
    rank = {name: i for i, name in enumerate(order)}
    merged = sorted(kept + entries, key=lambda e: rank.get(e.get("claim_id"), len(order)))
    out.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


if __name__ == "__main__":
    sys.exit(f"{Path(__file__).name} is a helper module (write_merged) that benchmarks/papers.py "
             "and benchmarks/curate_claims.py import, not a script: run one of those")
