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
