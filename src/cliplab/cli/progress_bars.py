"""The command line's progress bars at an end: closed before a message, so it starts a line."""

from __future__ import annotations

import sys


def end_progress_bars() -> None:
    """Close the progress bars an error left open (a bar's line ends in ``\\r`` until it
    closes), so the ``cliplab: error: ...`` line after them starts a line of its own."""
    tqdm = sys.modules.get("tqdm")  # no bar was made unless some module imported tqdm
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()
