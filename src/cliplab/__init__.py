"""cliplab: one toolkit for the whole life of CLIP-style contrastive image-text models."""

from cliplab.errors import CliplabError

__version__ = "0.1.0"
__all__ = ["CliplabError", "__version__"]
