"""Text files beside a dataset: class names and prompt templates, one per line.

``classnames.txt`` names the classes; ``templates.txt`` or CLIP_benchmark's
``zeroshot_classification_templates.txt`` holds the prompt templates (``{}`` or ``{c}`` marking
the class name). Sets without a template file use ``DEFAULT_TEMPLATES``.
"""

from __future__ import annotations

from pathlib import Path

from cliplab.errors import DataError

DEFAULT_TEMPLATES = ["a photo of a {}."]
CLASSNAMES_FILE = "classnames.txt"
TEMPLATE_FILES = ("templates.txt", "zeroshot_classification_templates.txt")


def read_lines(path: Path) -> list[str]:
    """The non-empty stripped lines of a UTF-8 text file (a byte-order mark, as Windows
    Notepad writes, is not part of its first line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_templates(root: Path) -> list[str]:
    """Templates from the first template file in ``root``, ``{c}`` rewritten as ``{}``;
    ``DEFAULT_TEMPLATES`` if there is none."""
    for name in TEMPLATE_FILES:
        if (root / name).is_file():
            templates = [t.replace("{c}", "{}") for t in read_lines(root / name)]
            if not templates:
                raise DataError(f"{root / name}: no templates; write one per line, e.g. "
                                "'a photo of a {}.'")
            return templates
    return list(DEFAULT_TEMPLATES)
