"""A curate step for process-pool tests (importable by spawned workers): no images; each map
call sleeps a little and leaves a file named by its first record's key in ``folder``; a key in
``die`` kills its worker (as the OOM killer does)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np


class SlowStep:
    needs_images = False

    def __init__(self, folder: str, seconds: float = 0.3, quick: tuple[str, ...] = (),
                 die: tuple[str, ...] = ()):
        self.folder, self.seconds, self.quick, self.die = folder, seconds, quick, die

    def map(self, batch) -> dict[str, np.ndarray]:
        if batch.keys[0] in self.die:
            os.kill(os.getpid(), signal.SIGKILL)
        if batch.keys[0] not in self.quick:  # keys in ``quick`` are mapped at once
            time.sleep(self.seconds)
        Path(self.folder, f"mapped-{batch.keys[0]}").touch()
        return {"n": np.zeros(len(batch.keys))}
