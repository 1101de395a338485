"""Small image folders of class sub-folders for tests, with an unreadable file among them."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def pets_folder(root: Path, per_class: int, broken_in: str) -> Path:
    """``root/cat`` (red) and ``root/dog`` (blue) squares, ``per_class`` each, and an
    unreadable ``bad.png`` in class ``broken_in``; returns ``root``."""
    for name, colour in (("cat", "red"), ("dog", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), colour).save(root / name / f"{i}.png")
    (root / broken_in / "bad.png").write_bytes(b"not a png")
    return root
