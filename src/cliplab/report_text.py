"""What a user wrote, shown as written in cliplab's reports (`cliplab report`, the curation
report): Markdown escaping, matplotlib text without mathtext, legend labels that stay, and
names made unique (`unique_labels`)."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# what starts Markdown syntax inside a line: emphasis, links, HTML, code, table cells, entities
# (an underscore only at a word's edge, so paths such as img_00.png stay as they are)
_MARKDOWN_INLINE = re.compile(r"[\\`*\[\]<>|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|&(?=#?\w+;)")

# both HTML reports: laid out at the screen's width (a phone showed a 980 px page scaled down), and
# a wide table scrolls inside its box instead of the whole page scrolling sideways
HTML_VIEWPORT = '<meta name="viewport" content="width=device-width, initial-scale=1">'
HTML_CSS = ".scroll{overflow-x:auto;margin:.5em 0 1.5em}.scroll table{margin:0}" \
    "h1,h2,h3,p,li{overflow-wrap:anywhere}"
TABLE_OPEN, TABLE_CLOSE = '<div class="scroll"><table>', "</table></div>"


def printable(text: str) -> str:
    """``text`` as UTF-8 can hold it: a name's bytes that are not UTF-8 (lone surrogates, as
    Python reads them from the file system) written ``\\xe9``, any other surrogate escaped."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def md_text(text: Any) -> str:
    """``text`` for a Markdown line or table cell: shown as written when rendered."""
    return _MARKDOWN_INLINE.sub(lambda m: "\\" + m.group(0), str(text)).replace("\n", " ")


def md_code(text: str) -> str:
    """``text`` as a Markdown code span: fenced by more backticks than any run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text.replace(chr(10), ' ')}{pad}{fence}"


def literal_plot(draw: F) -> F:
    """Run a plotting function with matplotlib's mathtext off, so a ``$`` in a label, title or
    tick is drawn as written (``$x_$`` crashed the drawing, ``$\\alpha$`` came out as α); only
    inside the call: a program using cliplab keeps its own matplotlib settings."""
    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def legend_label(text: str) -> str:
    """``text`` as a legend entry: matplotlib leaves out labels starting with ``_``, so those
    get a zero-width space in front (drawn as nothing)."""
    return "\u200b" + text if text.startswith("_") else text


def unique_labels(labels: list[str], reserved: tuple[str, ...] = (),
                  keep_first: bool = False) -> list[str]:
    """``labels`` made unique: each the first free of name, name#2, name#3, … (``reserved``
    names count as taken); labels that are unique already stay as they are. A report's
    columns, and the keys of per-class results, whose class names may repeat. With
    ``keep_first``, every label's first occurrence keeps its name and no suffix takes one."""
    taken, out = set(reserved) | (set(labels) if keep_first else set()), []
    firsts = set()
    for name in labels:
        if keep_first and name not in firsts:
            firsts.add(name)
            out.append(name)
            continue
        label, number = name, 1
        while label in taken:
            number += 1
            label = f"{name}#{number}"
        taken.add(label)
        out.append(label)
    return out
