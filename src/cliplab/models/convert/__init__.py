"""Models in and out: OpenCLIP checkpoints to and from transformers ``CLIPModel`` folders.

- `convert_openclip` / `load_openclip`: an OpenCLIP checkpoint (``.pt``/``.safetensors`` state
  dict with its model config JSON, or an ``open_clip_config.json`` Hub folder) as a cliplab model
  folder / `DualEncoder`; `is_openclip_checkpoint` tells a model spec it is one.
- `export_openclip`: a CLIP `DualEncoder` as an OpenCLIP Hub folder.
"""

from cliplab.models.convert.openclip_export import export_openclip
from cliplab.models.convert.openclip_files import is_openclip_checkpoint
from cliplab.models.convert.openclip_import import (convert_openclip, load_openclip,
                                                    openclip_to_dual_encoder)

__all__ = ["convert_openclip", "export_openclip", "is_openclip_checkpoint", "load_openclip",
           "openclip_to_dual_encoder"]
