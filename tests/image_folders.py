"""Small image folders of class sub-folders for tests, with an unreadable file among them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
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


def counting_decodes(monkeypatch) -> list[str]:
    """The files image folders decode from now on (each call's path, in order), decoded as
    before."""
    import cliplab.data.image_folder as image_folder
    from cliplab.data.images import decode_image

    calls: list[str] = []

    def counted(source, *args, **kwargs):
        calls.append(str(source))
        return decode_image(source, *args, **kwargs)

    monkeypatch.setattr(image_folder, "decode_image", counted)
    return calls


def digits_folder(root: Path, images: torch.Tensor, labels: torch.Tensor,
                  classes: Sequence[str], bad_at: str | None = None) -> Path:
    """PNGs of ``images`` (grey, ``[N, H, W, 1]``) in folders of their ``classes``, and, at
    ``bad_at`` (e.g. ``one/015_bad.png``, sorted among a class's images), a corrupt file;
    returns ``root``."""
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0].numpy()).save(folder / f"{i:03d}.png")
    if bad_at is not None:
        (root / bad_at).write_bytes(np.random.default_rng(0).bytes(200))
    return root
