"""Manifests: small datasets as a table of image paths plus a caption or a label per row.

A manifest is a CSV, JSONL (``.jsonl`` / ``.json-lines``) or Parquet file, chosen by suffix.
Relative image paths resolve against the manifest's folder. Malformed manifests raise
``DataError``; bad samples (missing or corrupt image, empty caption, bad label) are skipped and
recorded in a ``SkipReport`` under keys like ``"manifest.csv:line 4: images/x.png"``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import PositiveInt
from torch.utils.data import Dataset
from tqdm import tqdm

from cliplab.data.images import ImageStack, UnreadableImage, decode_image
from cliplab.data.manifest_table import image_data, image_data_error, iter_table
from cliplab.data.prompt_files import DEFAULT_TEMPLATES
from cliplab.data.types import ImageTextPairs, LabelledImages, SkipReport
from cliplab.errors import DataError, warn

IMAGE_COLUMNS = ("image", "path", "filepath", "image_path")
CAPTION_COLUMNS = ("caption", "text")
LABEL_COLUMNS = ("label", "class")


def _listed(rows: Iterator[tuple[dict, str]], columns: dict[str, None]
            ) -> tuple[list[dict], list[str], list[str]]:
    """A streamed table (`iter_table`) whole: its rows, their locations and columns."""
    listed = list(rows)
    return [row for row, _ in listed], [where for _, where in listed], list(columns)


def _read_table(path: Path) -> tuple[list[dict], list[str], list[str]]:
    """Rows, their locations (``"line 4"`` / ``"row 3"``) and the column names of a manifest."""
    columns: dict[str, None] = {}
    return _listed(iter_table(path, columns), columns)


def refuse_image_data(rows: list[dict], image_key: str, path: Path) -> None:
    """A one-line `DataError` if the image column holds the images themselves (bytes, or a
    Hugging Face export's ``{bytes, path}`` structs) rather than file paths: each was read as a
    path named by its bytes."""
    what = next((w for row in rows if (w := image_data(row.get(image_key))) is not None), None)
    if what is not None:
        raise image_data_error(path, image_key, what)


def read_manifest_rows(path: str | os.PathLike) -> list[dict]:
    """Parse a CSV, JSONL or Parquet manifest into one dict per row; raise ``DataError`` if malformed."""
    return _read_table(Path(path))[0]


def manifest_captions(path: str | os.PathLike, caption_col: str | None = None) -> list[str]:
    """The caption column of a manifest, read without decoding any image."""
    rows, _, columns = _read_table(Path(path))
    col = caption_col or next((c for c in CAPTION_COLUMNS if c in columns), None)
    if col is None or col not in columns:
        raise DataError(f"{path}: no caption column (looked for "
                        f"{caption_col or ', '.join(CAPTION_COLUMNS)}; found: "
                        f"{', '.join(columns) or 'none'}); pass caption_col")
    return ["" if r.get(col) is None else str(r[col]) for r in rows]


def _column(columns: list[str], given: str | None, names: Sequence[str], flag: str, where: str,
            required: bool = True) -> str | None:
    """The column named ``given``, else the first of ``names`` present; ``DataError`` if required."""
    found = ", ".join(columns) or "none"
    if given is not None:
        if given in columns:
            return given
        raise DataError(f"{where}: no column {given!r} (found: {found}); fix the data spec's "
                        f"{flag} or the header")
    for name in names:
        if name in columns:
            return name
    if required:
        raise DataError(f"{where}: no {names[0]} column (looked for {', '.join(names)}; found: {found}); "
                        f"rename a column or {spec_option_hint(flag)}")
    return None


def spec_option_hint(*options: str) -> str:
    """How to name a manifest's column: the data spec's option, as a config and a command
    line (where --data sets the spec ``data``) write it."""
    named = " or ".join(options)
    return f"set the data spec's {named} (data.{options[0]}=NAME with --data)"


MAX_INDEX_CLASSES = 100_000  # integer labels without class names: classes 0..top must fit


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:  # "3.0": an integer column written as floats (pandas does so when a value is missing)
            number = float(value)
        except ValueError:
            return None
        return int(number) if number.is_integer() else None
    return None


def _warn_index_names(path: Path, classnames: list[str], targets: list[int | None]) -> None:
    """Integer labels without ``classnames``: the classes are named by their digits (zero-shot
    prompts read "a photo of a 3"), and an index no row uses is still a class; say so."""
    unused = sorted(set(range(len(classnames))) - set(targets))
    gaps = (f"; {len(unused)} of them ({', '.join(map(str, unused[:5]))}"
            f"{', ...' if len(unused) > 5 else ''}) label no row") if unused else ""
    warn(f"{path}: integer labels without classnames: make {len(classnames)} classes "
         f"named '0'..'{len(classnames) - 1}' (zero-shot prompts read 'a photo of a "
         f"0'){gaps}; give classnames: [name of 0, name of 1, ...]", stacklevel=3)


def _labels(values: list[Any], classnames: Sequence[str] | None,
            where: Sequence[str]) -> tuple[list[str], list[int | None]]:
    """Class names and per-row label indices (None for a missing or unknown label); ``where``
    names each row for errors."""
    names = ["" if v is None else str(v).strip() for v in values]
    if classnames is None:
        present = [i for i, n in enumerate(names) if n]
        numeric = [i for i in present if _as_int(values[i]) is not None]
        if numeric and len(numeric) < len(present):
            # one typo would otherwise turn an integer column into names sorted as text
            # ('10' < '2'), renumbering every class without a word
            word = next(i for i in present if _as_int(values[i]) is None)
            raise DataError(f"{where[word]}: label {names[word]!r} is not an integer, but "
                            f"{where[numeric[0]]} has label {names[numeric[0]]}; fix the row, "
                            "or give classnames= to read every label as a name")
        if len(numeric) == len(present):  # integer labels
            ints = [_as_int(v) if n else None for v, n in zip(values, names)]
            ints = [i if i is not None and i >= 0 else None for i in ints]
            top = max((i for i in ints if i is not None), default=-1)
            if top >= MAX_INDEX_CLASSES:  # an id column, not class indices: no list of 1e9 names
                row = next(i for i in present if ints[i] == top)
                raise DataError(f"{where[row]}: label {top} is past {MAX_INDEX_CLASSES:,} "
                                "classes (integer labels are class indices 0..C-1); give "
                                "classnames= (index -> name), or use class names as labels")
            return [str(i) for i in range(top + 1)], ints
        classnames = sorted({n for n in names if n})
    index = {name: i for i, name in enumerate(classnames)}
    labels: list[int | None] = []
    for value, name in zip(values, names):
        i = index.get(name, _as_int(value)) if name else None
        labels.append(i if i is not None and 0 <= i < len(classnames) else None)
    return list(classnames), labels


class ManifestDataset(Dataset):
    """A manifest as a lazy dataset of ``(uint8 [H, W, 3], caption or label index)`` samples.

    ``kind="auto"`` picks pairs when a caption column is given or found (and no ``label_col`` is
    given), else labelled images. Rows are checked when built; images decode on access.
    """

    def __init__(self, path: str | os.PathLike, kind: str = "auto", image_size: int | None = None,
                 image_col: str | None = None, caption_col: str | None = None,
                 label_col: str | None = None, classnames: Sequence[str] | None = None,
                 templates: Sequence[str] | None = None, caption_flag: str = "caption_col"
                 ) -> None:
        # caption_flag: the option errors tell to fix (a multi-label manifest's is label_col)
        self.path = Path(path)
        if kind not in ("auto", "pairs", "labelled"):
            raise DataError(f"unknown manifest kind {kind!r}; use auto, pairs or labelled")
        if image_size is not None and image_size < 1:
            raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
        rows, locations, columns = _read_table(self.path)
        self.rows = rows
        if not rows:
            raise DataError(f"{self.path}: manifest has no rows; add one row per image")
        where = str(self.path) if self.path.suffix.lower() == ".parquet" else f"{self.path}:line 1"
        image_key = _column(columns, image_col, IMAGE_COLUMNS, "image_col", where)
        if kind == "auto":
            text_key = None if label_col is not None else _column(columns, caption_col, CAPTION_COLUMNS,
                                                                 "caption_col", where, required=False)
            if text_key is None and label_col is None and not set(LABEL_COLUMNS) & set(columns):
                raise DataError(f"{where}: no caption or label column (looked for "
                                f"{', '.join(CAPTION_COLUMNS + LABEL_COLUMNS)}; found: "
                                f"{', '.join(columns)}); rename a column or "
                                f"{spec_option_hint('caption_col', 'label_col')}")
            kind = "pairs" if text_key else "labelled"
        if kind == "pairs":
            text_key = _column(columns, caption_col, CAPTION_COLUMNS, caption_flag, where)
        else:
            text_key = _column(columns, label_col, LABEL_COLUMNS, "label_col", where)
        self.kind, self.image_size = kind, image_size
        refuse_image_data(rows, image_key, self.path)
        raw = ["" if r.get(image_key) is None else str(r[image_key]).strip() for r in rows]
        self.keys = [f"{self.path.name}:{loc}: {name}" for loc, name in zip(locations, raw)]
        self.paths = [self.path.parent / Path(name).expanduser() if name else None for name in raw]
        self.classnames: list[str] = []
        self.templates: list[str] = []
        self._bad_rows: set[int] = set()  # captions that are no text (a list, an object)
        if kind == "pairs":
            values = [r.get(text_key) for r in rows]
            self._bad_rows = {i for i, v in enumerate(values) if isinstance(v, (list, dict))}
            texts = ["" if v is None or i in self._bad_rows else str(v).strip()
                     for i, v in enumerate(values)]
            self.targets: list[str | int | None] = [t or None for t in texts]
            self._bad = "empty_caption"
        else:
            self.classnames, self.targets = _labels(
                [r.get(text_key) for r in rows], classnames,
                [f"{self.path}:{loc}" for loc in locations])
            if classnames is None and self.classnames == [str(i) for i in
                                                          range(len(self.classnames))]:
                _warn_index_names(self.path, self.classnames, self.targets)
            self.templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
            self._bad = "bad_label"

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        """Sample ``i``'s image as uint8 ``[H, W, 3]`` (resized to ``image_size`` if set), or
        None and why not."""
        if self.targets[i] is None:
            return None, self.unusable(i)
        return self.read_image(i)

    def unusable(self, i: int) -> str | None:
        """Why row ``i`` is no sample, as far as is known without decoding its image (its
        caption or label, a missing file), or None."""
        if self.targets[i] is None:
            return "bad_caption" if i in self._bad_rows else self._bad
        return "missing_file" if self._missing(i) else None

    def _missing(self, i: int) -> bool:
        path = self.paths[i]
        try:
            return path is None or not path.is_file()
        except OSError:  # a name longer than the file system allows, say: no such file
            return True

    def read_image(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        """Row ``i``'s image whatever its caption or label (None and why if it has none)."""
        path = self.paths[i]
        if self._missing(i):
            return None, "missing_file"
        try:
            return decode_image(path, self.image_size), None
        except UnreadableImage:
            return None, "unreadable_image"

    def try_load(self, i: int, report: SkipReport | None = None) -> tuple[torch.Tensor, str | int] | None:
        """Sample ``i`` as ``(uint8 [H, W, 3], target)``, or None (recorded in ``report``) if unusable."""
        image, reason = self.load_image(i)
        if image is None:
            if report is not None:
                report.add(reason, self.keys[i])
            return None
        return image, self.targets[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str | int]:
        image, reason = self.load_image(i)
        if image is None:
            raise DataError(f"{self.keys[i]}: unusable sample ({reason}); use try_load() to skip bad samples")
        return image, self.targets[i]


def load_manifest(path: str | os.PathLike, kind: str = "auto",
                  image_size: PositiveInt | None = None,
                  image_col: str | None = None, caption_col: str | None = None,
                  label_col: str | None = None, classnames: Sequence[str] | None = None,
                  templates: Sequence[str] | None = None,
                  progress: bool = True) -> ImageTextPairs | LabelledImages:
    """Decode a whole manifest into memory, skipping (and reporting) bad samples.

    Images are resized (bilinear) to ``image_size`` square if given; without it, images of
    different sizes become centre squares (`stack_images`). Raises ``DataError`` if the
    manifest is malformed or no sample is usable.
    Each sample keeps its row's key (``manifest.csv:line 4: images/x.png``) in ``.keys``.
    """
    data = ManifestDataset(path, kind, image_size, image_col, caption_col, label_col, classnames, templates)
    report = SkipReport()
    images, targets, keys = ImageStack(len(data)), [], []
    for i in tqdm(range(len(data)), desc=f"decoding {data.path.name}", unit="img", disable=not progress):
        reason = data.unusable(i)
        if reason is None:
            try:
                images.add_file(data.keys[i], functools.partial(decode_image, data.paths[i],
                                                                data.image_size),
                                path=data.paths[i])
            except UnreadableImage:
                reason = "unreadable_image"
        if reason is not None:
            report.add(reason, data.keys[i])
            continue
        targets.append(data.targets[i])
        keys.append(data.keys[i])
    if not images:
        raise DataError(f"{data.path}: no usable sample in {len(data)} rows ({report.summary()}); "
                        f"check the image paths (relative to {data.path.parent}) and the caption/label column")
    stacked, name = images.stacked(str(data.path)), data.path.stem
    if data.kind == "pairs":
        return ImageTextPairs(stacked, [[t] for t in targets], name=name, skipped=report,
                              keys=keys)
    return LabelledImages(stacked, torch.tensor(targets, dtype=torch.int64), data.classnames,
                          data.templates, name=name, skipped=report, keys=keys)
