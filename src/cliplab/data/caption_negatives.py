"""Hard-negative captions made from a caption's own words (ARO / NegCLIP style), shared by the
compositional evaluation and hard-negative training so both use the same generators.

On `shapes` relation captions ("a red circle left of an orange square", optionally with sizes):
- ``attribute_swap``: the two objects' colours exchanged ("an orange circle left of a red
  square");
- ``relation_swap``: the two objects exchanged around the relation ("an orange square left of a
  red circle");
- ``word_shuffle`` (any caption): its words in a random order.
Each generator returns None where it does not apply (not a relation caption, same colours, a
caption whose words cannot be reordered), never the caption itself. "Itself" is judged as the
text towers read it (`same_text`: letter case and whitespace aside), so "A man watching a bird"
never gets "a man watching A bird", whose tokens are the caption's.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from cliplab.data.shapes import COLORS, RELATIONS, SHAPES, SIZES

NEGATIVE_TYPES = ("attribute_swap", "relation_swap", "word_shuffle")

_OBJECT = (rf"an? (?:({'|'.join(SIZES)}) )?({'|'.join(COLORS)}) ({'|'.join(SHAPES)})")
_RELATION_CAPTION = re.compile(rf"^{_OBJECT} ({'|'.join(RELATIONS)}) {_OBJECT}$")


@dataclass(frozen=True)
class _Object:
    size: str | None
    color: str
    shape: str

    def phrase(self) -> str:
        words = ([self.size] if self.size else []) + [self.color, self.shape]
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def parse_relation(caption: str) -> tuple[_Object, str, _Object] | None:
    """``(first object, relation, second object)`` of a `shapes` relation caption, else None."""
    m = _RELATION_CAPTION.match(caption.strip())
    if m is None:
        return None
    s1, c1, h1, rel, s2, c2, h2 = m.groups()
    return _Object(s1, c1, h1), rel, _Object(s2, c2, h2)


def attribute_swap(caption: str) -> str | None:
    """The relation caption with the two objects' colours exchanged (None: not a relation
    caption, or both objects share a colour)."""
    parsed = parse_relation(caption)
    if parsed is None or parsed[0].color == parsed[2].color:
        return None
    a, rel, b = parsed
    a2, b2 = _Object(a.size, b.color, a.shape), _Object(b.size, a.color, b.shape)
    return f"{a2.phrase()} {rel} {b2.phrase()}"


def relation_swap(caption: str) -> str | None:
    """The relation caption with its two objects exchanged around the relation (None: not a
    relation caption, or the two objects are described alike)."""
    parsed = parse_relation(caption)
    if parsed is None or parsed[0] == parsed[2]:
        return None
    a, rel, b = parsed
    return f"{b.phrase()} {rel} {a.phrase()}"


def same_text(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are one text up to letter case and whitespace (CLIP's tokenizer,
    like most text towers', lowercases: such a "negative" has the caption's own tokens)."""
    return " ".join(a.casefold().split()) == " ".join(b.casefold().split())


def shuffle_words(caption: str, rng: random.Random) -> str:
    """The caption's words in a random order that is not the caption up to letter case (when
    possible; else the caption)."""
    words = caption.split()
    text = " ".join(words)
    # one shuffle per try as before: lowercase captions (`shapes`') draw exactly what they did
    for _ in range(20):
        out = words[:]
        rng.shuffle(out)
        if not same_text(" ".join(out), text):
            return " ".join(out)
    return text


def caption_negatives(caption: str, rng: random.Random,
                      kinds: Sequence[str] = NEGATIVE_TYPES) -> dict[str, str]:
    """One negative of each of ``kinds`` that applies to ``caption`` (kind -> text)."""
    out: dict[str, str] = {}
    for kind in kinds:
        if kind == "attribute_swap":
            text = attribute_swap(caption)
        elif kind == "relation_swap":
            text = relation_swap(caption)
        elif kind == "word_shuffle":
            text = shuffle_words(caption, rng)
        else:
            raise ValueError(f"unknown negative kind {kind!r}; valid: {list(NEGATIVE_TYPES)}")
        if text is not None and not same_text(text, caption):
            out[kind] = text
    return out
