"""A run folder: config.yaml, metrics.jsonl, checkpoints/step-N/ written atomically."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import yaml

CHECKPOINTS = "checkpoints"


def default_run_dir(kind: str) -> Path:
    """``runs/<kind>-<YYYYmmdd-HHMMSS>`` under the current directory."""
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    """The folder one run writes everything into."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_file = self.path / "metrics.jsonl"

    def write_config(self, config: dict) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def log(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl."""
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_json(self, name: str, data: dict) -> Path:
        path = self.path / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
        return path

    def checkpoint_dir(self, step: int) -> Path:
        return self.path / CHECKPOINTS / f"step-{step}"

    def atomic_checkpoint(self, step: int, write) -> Path:
        """Call ``write(tmp_folder)`` then rename the folder to ``checkpoints/step-N``, so a run
        killed mid-write never leaves a half checkpoint under the final name."""
        final = self.checkpoint_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def latest_checkpoint(self) -> Path | None:
        """The complete checkpoint with the highest step, if any."""
        folder = self.path / CHECKPOINTS
        steps = [(int(p.name.split("-")[1]), p) for p in folder.glob("step-*")
                 if p.is_dir() and not p.name.endswith(".tmp")] if folder.is_dir() else []
        return max(steps)[1] if steps else None
