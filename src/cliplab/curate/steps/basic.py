"""``basic``: DataComp's basic filtering rules, each off unless configured.

- ``min_words`` / ``max_words``: caption length in whitespace-separated words;
- ``min_chars`` / ``max_chars``: caption length in characters (after stripping);
- ``min_image_side``: the shorter image side in pixels;
- ``max_aspect_ratio``: the longer side over the shorter one;
- ``blocklist``: words or phrases, matched case-insensitively as whole words (``"nsfw"`` drops
  "NSFW pic" but not "unsfwx");
- ``languages``: keep captions whose language (ISO 639-1, e.g. ``[en]``) is one of these, by
  langid.py's offline model (it ships inside the PyPI package; ``pip install cliplab[curate]``),
  with at least ``min_language_confidence`` (its normalised probability).

An item failing several rules is reported under the first, in the order listed above.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from cliplab.config import refuse_unused
from cliplab.curate.steps.base import Decision, PoolBatch, PoolItems, StepContext, StepSpecBase
from cliplab.errors import ConfigError


# the languages langid.py's model tells apart (its classes; loading the model to read them
# takes seconds, too long for checking a config)
LANGID_CODES = tuple(
    "af am an ar as az be bg bn br bs ca cs cy da de dz el en eo es et eu fa fi fo fr ga gl gu "
    "he hi hr ht hu hy id is it ja jv ka kk km kn ko ku ky la lb lo lt lv mg mk ml mn mr ms mt "
    "nb ne nl nn no oc or pa pl ps pt qu ro ru rw se si sk sl sq sr sv sw ta te th tl tr ug uk "
    "ur vi vo wa xh zh zu".split())


class Spec(StepSpecBase):
    step: Literal["basic"]
    min_words: int | None = Field(None, ge=0)
    max_words: int | None = Field(None, ge=1)
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=1)
    min_image_side: int | None = Field(None, ge=1)
    max_aspect_ratio: float | None = Field(None, ge=1)
    blocklist: list[str] = []
    languages: list[str] | None = None
    min_language_confidence: float = Field(0.0, ge=0, le=1)

    def packages(self) -> dict[str, str]:
        return {"langid": "the languages rule"} if self.languages else {}

    @field_validator("languages")
    @classmethod
    def _language_codes(cls, codes: list[str] | None) -> list[str] | None:
        """Codes langid detects ([en, de]): [english], [EN] or [eng] matched no caption's
        language, so every pair was dropped."""
        wrong = [code for code in codes or [] if code not in LANGID_CODES]
        if wrong:
            raise ValueError(f"{', '.join(map(repr, wrong))} is no language langid detects: "
                             "give lower-case ISO 639-1 codes (en, de, fr, ...; "
                             f"{len(LANGID_CODES)} in all: {' '.join(LANGID_CODES)})")
        return codes

    @model_validator(mode="after")
    def _ranges(self) -> "Spec":
        """``min_words <= max_words`` and ``min_chars <= max_chars`` (else nothing passes)."""
        for unit in ("words", "chars"):
            low, high = getattr(self, f"min_{unit}"), getattr(self, f"max_{unit}")
            if low is not None and high is not None and low > high:
                raise ValueError(f"min_{unit} {low} is above max_{unit} {high}, so no caption "
                                 f"can pass; lower min_{unit} or raise max_{unit}")
        if not self.languages:  # the languages rule is off: no language is detected
            refuse_unused(self, ["min_language_confidence"], "unless languages is given")
        return self


def blocklist_pattern(terms: list[str]) -> re.Pattern | None:
    """One case-insensitive regex matching any term as whole words (inner spaces flexible)."""
    terms = [t.strip() for t in terms if t.strip()]
    if not terms:
        return None
    alternatives = [r"\s+".join(re.escape(w) for w in t.split()) for t in terms]
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def language_identifier() -> Any:
    """langid.py's offline identifier with normalised probabilities."""
    try:
        from langid.langid import LanguageIdentifier, model
    except ImportError:
        raise ConfigError("basic: the languages rule needs langid "
                          "(pip install 'cliplab[curate]')") from None
    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


class Basic:
    """Per-item measurements in ``map`` (words, characters, size, blocklist hit, language);
    the rules applied in ``decide``."""

    Spec = Spec

    def __init__(self, spec: Spec):
        self.spec = spec
        self.identifier: Any = None

    @property
    def needs_images(self) -> bool:
        """Only the size rules look at the image (its width and height)."""
        return self.spec.min_image_side is not None or self.spec.max_aspect_ratio is not None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the language identifier (it holds local functions); a worker
        process builds its own on first use."""
        return {**self.__dict__, "identifier": None}

    def prepare(self, context: StepContext) -> None:
        if self.spec.languages:
            self.identifier = language_identifier()

    def _identifier(self) -> Any:
        """langid's identifier when the languages rule is on (built once per process)."""
        if self.spec.languages and self.identifier is None:
            self.identifier = language_identifier()
        return self.identifier

    def map(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        pattern = blocklist_pattern(self.spec.blocklist)
        blocked = []
        for caption in batch.captions:
            hit = pattern.search(caption) if pattern else None
            blocked.append(hit.group(0).lower() if hit else "")
        identifier = self._identifier()
        langs, probs = [], []
        for caption in batch.captions:
            if identifier is None:
                langs.append(""), probs.append(np.nan)
            else:
                lang, prob = identifier.classify(caption)
                langs.append(lang), probs.append(float(prob))
        # without images (no size rule is on, so no rule reads them) the sizes are 0
        sizes = [(0, 0)] * len(batch) if batch.images is None else \
            [(im.width, im.height) for im in batch.images]
        return {"words": np.array([len(c.split()) for c in batch.captions], dtype=np.int64),
                "chars": np.array([len(c.strip()) for c in batch.captions], dtype=np.int64),
                "width": np.array([w for w, _ in sizes], dtype=np.int64),
                "height": np.array([h for _, h in sizes], dtype=np.int64),
                "blocked": np.array(blocked, dtype=str),
                "language": np.array(langs, dtype="<U8"),
                "language_prob": np.array(probs, dtype=np.float64)}

    def _reason(self, c: dict[str, Any]) -> str | None:
        s = self.spec
        if s.min_words is not None and c["words"] < s.min_words:
            return f"caption has {c['words']} words, fewer than min_words {s.min_words}"
        if s.max_words is not None and c["words"] > s.max_words:
            return f"caption has {c['words']} words, more than max_words {s.max_words}"
        if s.min_chars is not None and c["chars"] < s.min_chars:
            return f"caption has {c['chars']} characters, fewer than min_chars {s.min_chars}"
        if s.max_chars is not None and c["chars"] > s.max_chars:
            return f"caption has {c['chars']} characters, more than max_chars {s.max_chars}"
        side = min(c["width"], c["height"])
        if s.min_image_side is not None and side < s.min_image_side:
            return (f"image {c['width']}x{c['height']}: shorter side {side} below "
                    f"min_image_side {s.min_image_side}")
        aspect = max(c["width"], c["height"]) / max(side, 1)
        if s.max_aspect_ratio is not None and aspect > s.max_aspect_ratio:
            return (f"image {c['width']}x{c['height']}: aspect ratio {aspect:.2f} above "
                    f"max_aspect_ratio {s.max_aspect_ratio}")
        if c["blocked"]:
            return f"caption contains blocklisted {c['blocked']!r}"
        if s.languages and (c["language"] not in s.languages
                            or c["language_prob"] < s.min_language_confidence):
            return (f"caption language {c['language']} (p={c['language_prob']:.2f}) not in "
                    f"{s.languages}" + (f" with p >= {s.min_language_confidence}"
                                        if s.min_language_confidence else ""))
        return None

    def decide(self, items: PoolItems, columns: dict[str, np.ndarray]) -> Decision:
        reasons = [self._reason({name: col[i].item() if hasattr(col[i], "item") else col[i]
                                 for name, col in columns.items()}) for i in range(len(items))]
        return Decision(keep=np.array([r is None for r in reasons], dtype=bool), reasons=reasons)
