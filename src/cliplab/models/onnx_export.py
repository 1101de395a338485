"""A model's towers as ONNX graphs (``cliplab export --format onnx``), optionally int8.

The folder holds ``image_encoder.onnx`` (``pixel_values [B, 3, S, S]`` → ``embeddings [B, D]``,
unit length, and ``pooled [B, H]``, the tower output before the projection) and
``text_encoder.onnx`` (``input_ids``, ``attention_mask [B, L]`` int64 → ``embeddings``,
``pooled``; every kind takes both, SigLIP's graph leaves the mask unread as SigLIP runs its
text unmasked), both with a dynamic batch (and text length); ``projections.safetensors`` (the
two projection matrices, for callers that project pooled features themselves, as eval's feature
cache does); the tokenizer files (returning those two inputs); and ``onnx_export.json``:
preprocessing, context length, logit scale/bias, the graphs' text inputs and the text cleaning
cliplab applies before the tokenizer (`cliplab.models.tokenizer.TEXT_CLEANING`), which
``tokenizer.json`` cannot hold.

int8 is onnxruntime's dynamic quantization (weights int8 per channel, activations quantized
per batch at run time) of the exported graphs. It was measured against PyTorch's own dynamic
quantization (``torch.ao.quantization.quantize_dynamic`` of the ``Linear`` layers) by
``benchmarks/inference_speed.py``; see the README for the numbers and the choice.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cliplab.errors import ModelError
from cliplab.extras import installed
from cliplab.file_modes import save_tensors
from cliplab.models.convert.atomic import atomic_folder
from cliplab.models.dual_encoder import DualEncoder, evaluating
from cliplab.models.hf_files import PROCESSOR_FILE, write_processor_config
from cliplab.models.tokenizer import TEXT_CLEANING
from cliplab.output_folder import TOKENIZER_FILES, OutputFiles
from cliplab.provenance import stamp

EXPORT_FILE = "onnx_export.json"
IMAGE_FILE, TEXT_FILE = "image_encoder.onnx", "text_encoder.onnx"
PROJECTIONS_FILE = "projections.safetensors"
OPSET = 18
# every text graph's inputs, whatever the kind of model (int64 [batch, tokens])
TEXT_INPUTS = ("input_ids", "attention_mask")


def external_data_files(folder: Path) -> set[str]:
    """The files beside the ONNX graphs of ``folder`` that hold their weights (a tower over
    2 GB is exported with its initializers in separate files); none without onnx installed."""
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    except ImportError:
        return set()
    names = set()
    for graph in (IMAGE_FILE, TEXT_FILE):
        if not (folder / graph).is_file():
            continue
        try:
            proto = onnx.load(str(folder / graph), load_external_data=False)
        except Exception:  # noqa: BLE001 - a damaged graph lists nothing of its own
            continue
        names |= {ExternalDataInfo(t).location for t in proto.graph.initializer
                  if uses_external_data(t)}
    return names


# a previous ONNX export: what `export_onnx` writes, and nothing else
ONNX_EXPORT = OutputFiles((EXPORT_FILE,),
                          TOKENIZER_FILES | {IMAGE_FILE, TEXT_FILE, PROJECTIONS_FILE,
                                             PROCESSOR_FILE},
                          more=external_data_files)


class _ImageTower(nn.Module):
    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        pooled = self.model.image_backbone(pixel_values)
        return F.normalize(self.model.project_image(pooled), dim=-1), pooled


class _TextTower(nn.Module):
    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        pooled = self.model.text_backbone(input_ids, attention_mask)
        return F.normalize(self.model.project_text(pooled), dim=-1), pooled


def _require_onnx():
    if not all(installed(m) for m in ("onnx", "onnxruntime")):
        raise ModelError("ONNX export needs onnx and onnxruntime: pip install 'cliplab[onnx]'")


def _export(module: nn.Module, args: tuple, names: list[str], dynamic: dict, file: Path) -> None:
    # The TorchScript exporter: about 10x faster here than the dynamo one (dynamo=True) on these
    # towers, with the same outputs (checked to 1e-6 on tiny-clip). Its tracer warns about
    # transformers' shape checks it freezes; the exported graphs are tested against PyTorch at
    # other batch sizes and lengths, so the warnings are not shown to users; nor are the
    # deprecation notices the exporter gives about itself and its own internals (it is chosen
    # knowingly; under `-W error` they failed the export).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based "
                                "ONNX export", category=DeprecationWarning)
        torch.onnx.export(module, args, str(file), input_names=names,
                          output_names=["embeddings", "pooled"], opset_version=OPSET,
                          dynamic_axes={**dynamic, "embeddings": {0: "batch"},
                                        "pooled": {0: "batch"}}, dynamo=False)


def _declare_text_inputs(file: Path) -> None:
    """Give the text graph in ``file`` every one of `TEXT_INPUTS`: the exporter drops an input
    the tower never reads (SigLIP's attention_mask), and a user feeding what the tokenizer
    returns then got onnxruntime's "Invalid input name". The added input stays unread: the
    graph's nodes, and so its outputs, are unchanged."""
    import onnx
    from onnx import TensorProto, helper

    # its weights, where they lie in files beside it, stay there: only the graph is rewritten
    proto = onnx.load(str(file), load_external_data=False)
    have = {i.name for i in proto.graph.input}
    missing = [name for name in TEXT_INPUTS if name not in have]
    if not missing:
        return
    for name in missing:
        proto.graph.input.append(
            helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "tokens"]))
    onnx.save(proto, str(file))


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime dynamic int8 quantization of ``src`` into ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime advises shape pre-processing on the root logger at every call; dynamic int8
    # quantization of these graphs does not need it (the int8 export is tested for closeness)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


def export_onnx(model: DualEncoder, out: str | Path, quantize: str | None = None,
                overwrite: bool = False, inputs=(), source: dict | None = None) -> Path:
    """Write ``model``'s towers as ONNX (``quantize="int8"``: dynamically quantized) to ``out``
    (``overwrite``: replacing a previous ONNX export there; never one of the ``inputs``).
    ``source`` (what the model was loaded from, `cliplab.models.resolve.export_source`: the
    spec, the folder it resolved to and the weights' fingerprint) is kept in the export
    record."""
    _require_onnx()
    if quantize not in (None, "int8"):
        raise ModelError(f"--quantize must be int8 (or left out), not {quantize!r}")
    if model.device.type != "cpu":
        raise ModelError("export the model from the CPU (load it with device='cpu')")
    size = model.preprocess_config.image_size
    pixels = torch.zeros(2, 3, size, size)
    tok = model.tokenize(["a photo of a cat", "two dogs"])
    # the exporter restores the wrappers' train/eval mode afterwards: they are built in eval
    # mode and `evaluating` puts the user's model back as it was
    with atomic_folder(out, overwrite, "ONNX export", ONNX_EXPORT, inputs) as tmp, \
            torch.no_grad(), evaluating(model):
        for tower, args, names, dynamic, file in (
                (_ImageTower(model).eval(), (pixels,), ["pixel_values"],
                 {"pixel_values": {0: "batch"}}, IMAGE_FILE),
                (_TextTower(model).eval(), (tok["input_ids"], tok["attention_mask"]),
                 list(TEXT_INPUTS),
                 {"input_ids": {0: "batch", 1: "tokens"},
                  "attention_mask": {0: "batch", 1: "tokens"}}, TEXT_FILE)):
            target = tmp / file
            fp32 = tmp / ("fp32-" + file) if quantize else target
            with model.attention_implementation("eager"):
                _export(tower, args, names, dynamic, fp32)
            if file == TEXT_FILE:
                _declare_text_inputs(fp32)
            if quantize:
                quantize_int8(fp32, target)
                fp32.unlink()
        projections = {}
        for name in ("visual_projection", "text_projection"):
            layer = getattr(model.model, name, None)
            if layer is not None:
                projections[name] = layer.weight.detach().contiguous()
        if projections:
            save_tensors(projections, str(tmp / PROJECTIONS_FILE))
        # what plain transformers and onnxruntime users need beside the graphs: the tokenizer
        # as cliplab tokenizes (after TEXT_CLEANING), returning the graph's inputs (not
        # BERT's token_type_ids, nor SigLIP's ids alone), the image processor as cliplab
        # preprocesses
        model.save_tokenizer(tmp, input_names=list(TEXT_INPUTS))
        write_processor_config(tmp, model.preprocess_config)
        bias = model.logit_bias
        meta = {"kind": model.kind, "embed_dim": model.embed_dim,
                "preprocess": model.preprocess_config.to_dict(),
                "context_length": model.context_length, "text_pooling": model.text_pooling,
                "pad_to_context": model.kind == "siglip", "text_inputs": list(TEXT_INPUTS),
                "text_cleaning": TEXT_CLEANING,
                "logit_scale": float(model.logit_scale), "logit_bias":
                    None if bias is None else float(bias),
                "quantize": quantize, "opset": OPSET, "source": source}
        (tmp / EXPORT_FILE).write_text(json.dumps(stamp(meta), indent=2) + "\n",
                                       encoding="utf-8")
    return Path(out)
