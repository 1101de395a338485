"""The bounds of `cliplab serve`'s requests and the parsing of its form fields (labels, image
ids, a prompt template): each bad value is a 422 naming the field."""

from __future__ import annotations

import csv
import re

from fastapi import Query

from cliplab.data.sources import check_templates
from cliplab.errors import ConfigError
from cliplab.serve.image_files import fail

MAX_K, MAX_OFFSET, MAX_QUERY_CHARS = 100, 10_000, 1000
MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger id is a 422, not a 500
MAX_LABELS, MAX_LABEL_CHARS = 100, 200
DEFAULT_MAX_UPLOAD = 10 << 20
DEFAULT_TEMPLATE = "a photo of a {}."

K_QUERY = Query(10, ge=1, le=MAX_K, description=f"results per page (1..{MAX_K})")
OFFSET_QUERY = Query(0, ge=0, le=MAX_OFFSET, description="results to skip (paging)")


def parse_labels(fields: list[str]) -> list[str]:
    """The labels of the ``labels`` form fields: each field one or more, separated by commas
    or new lines (every field is split, repeated ones too: the page sends its text box as one
    field), a label in double quotes keeping its commas (as in CSV: ``"red, white and blue",
    green``); repeats dropped."""
    labels = [part.strip() for text in fields for line in text.splitlines()
              for part in _csv_fields(line)]
    labels = list(dict.fromkeys(label for label in labels if label))
    if len(labels) < 2:
        fail(422, "labels: give at least two different labels, separated by commas or new "
                   "lines, or as repeated labels fields")
    if len(labels) > MAX_LABELS or any(len(label) > MAX_LABEL_CHARS for label in labels):
        fail(422, f"labels: at most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters")
    return labels


def _csv_fields(line: str) -> list[str]:
    """The comma-separated labels of one line, a double-quoted one keeping its commas; a 422
    for a quote left open or followed by more than spaces, and for a line too long to hold
    the labels a request may give (it would be refused, and csv limits a field's length)."""
    if len(line) > MAX_LABELS * (MAX_LABEL_CHARS + 4):
        fail(422, f"labels: at most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters")
    try:
        return next(csv.reader([line], skipinitialspace=True, strict=True), [])
    except csv.Error as err:
        fail(422, f"labels: {err} in {line[:60]!r}; a label in double quotes keeps its commas "
                  '("red, white and blue"), a quote inside it doubled ("")')


def parse_ids(fields: list[str]) -> list[int]:
    """The image ids of the ``ids`` form fields (each one or more, separated by commas), in
    order, repeats dropped; at most ``MAX_K``."""
    parts = [part.strip() for text in fields for part in text.split(",") if part.strip()]
    bad = next((part for part in parts
                if not re.fullmatch(r"[0-9]{1,19}", part) or int(part) > MAX_ID), None)
    if bad is not None:
        fail(422, f"ids: {bad[:40]!r} is not an image id (a whole number from 0)")
    ids = list(dict.fromkeys(int(part) for part in parts))
    if not ids or len(ids) > MAX_K:
        fail(422, f"ids: give 1 to {MAX_K} image ids, separated by commas")
    return ids


def parse_template(text: str) -> str:
    """The prompt template with exactly one ``{}`` (or ``{c}``) where the label goes, that formats
    with a label in it; a 422 otherwise."""
    try:
        template = check_templates([text], "template")[0]
    except ConfigError:
        fail(422, f"template {text!r}: give a prompt with exactly one {{}} where the label "
              f"goes (other braces doubled), e.g. {DEFAULT_TEMPLATE!r}")
    return template
