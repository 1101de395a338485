"""A curate step for process-pool tests (importable by spawned workers): no images; each map
call sleeps a little and leaves a file named by its first record's key in ``folder``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


class SlowStep:
    needs_images = False

    def __init__(self, folder: str, seconds: float = 0.3):
        self.folder, self.seconds = folder, seconds

    def map(self, batch) -> dict[str, np.ndarray]:
        time.sleep(self.seconds)
        Path(self.folder, f"mapped-{batch.keys[0]}").touch()
        return {"n": np.zeros(len(batch.keys))}
