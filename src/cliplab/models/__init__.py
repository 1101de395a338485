"""Models: the `DualEncoder` wrapper, presets, preprocessing and tokenizers."""

from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.preprocess import ImagePreprocessor, PreprocessConfig
from cliplab.models.presets import PRESETS, build_model

__all__ = ["DualEncoder", "ImagePreprocessor", "PreprocessConfig", "PRESETS", "build_model"]
