"""Data sources (built-in sets, manifests) and the two dataset kinds every stage speaks."""

from cliplab.data.types import ImageTextPairs, LabelledImages, SkipReport

__all__ = ["ImageTextPairs", "LabelledImages", "SkipReport"]
