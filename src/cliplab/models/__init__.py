"""Models: the `DualEncoder` wrapper, presets, preprocessing and tokenizers."""

from transformers.utils import logging as _hf_logging

# cliplab reports its own progress; HF's per-load weight reports and shard bars are noise here.
_hf_logging.set_verbosity_error()
_hf_logging.disable_progress_bar()

from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.preprocess import ImagePreprocessor, PreprocessConfig
from cliplab.models.presets import PRESETS, build_model

__all__ = ["DualEncoder", "ImagePreprocessor", "PreprocessConfig", "PRESETS", "build_model"]
