"""`OnnxEncoder`: a folder written by `export_onnx`, run with onnxruntime behind the face every
stage uses (``preprocess``, ``tokenize``, ``encode_image``, ``encode_text``, ``encode_texts``,
``image_backbone`` + ``project_image``, ``logit_scale``), so eval (and index/serve) can run the
exported, optionally int8, towers instead of PyTorch's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from cliplab.errors import ModelError, checked_batch_size, first_line
from cliplab.models.finite import finite_embeddings
from cliplab.models.loading import load_tokenizer
from cliplab.models.onnx_export import EXPORT_FILE, IMAGE_FILE, PROJECTIONS_FILE, TEXT_FILE
from cliplab.models.preprocess import (RESIZE_VERSION, ImagePreprocessor, PreprocessConfig,
                                       is_finite_number)
from cliplab.models.tokenizer import clean_texts
from cliplab.provenance import PROVENANCE_KEYS, without_provenance


def is_onnx_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by `export_onnx`."""
    path = Path(path)
    return path.is_dir() and (path / EXPORT_FILE).is_file()


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# what the encoder reads of onnx_export.json (`export_onnx` writes it all): key → valid value;
# "preprocess" is checked by `PreprocessConfig.from_dict`
RECORD_KEYS = {"kind": lambda v: isinstance(v, str), "text_pooling": lambda v: isinstance(v, str),
               "embed_dim": _positive_int, "context_length": _positive_int,
               "preprocess": lambda v: True, "logit_scale": is_finite_number}
OPTIONAL_KEYS = {"logit_bias": lambda v: v is None or is_finite_number(v)}
AGAIN = "export the model again (cliplab export --format onnx)"
# the matrix in PROJECTIONS_FILE that projects each tower's pooled output
PROJECTIONS = {"image": "visual_projection", "text": "text_projection"}
GRAPH_OUTPUTS = ["embeddings", "pooled"]


def read_export_record(path: Path) -> dict:
    """The folder's ``onnx_export.json``, holding every key the encoder reads with a valid
    value; else a one-line `ModelError` naming the file and the key."""
    file = path / EXPORT_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{file}: not readable JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{file}: must be a JSON object, not {type(meta).__name__}")
    missing = [key for key in RECORD_KEYS if key not in meta]
    if missing:
        raise ModelError(f"{file}: missing {', '.join(map(repr, missing))}; {AGAIN}")
    checks = {**RECORD_KEYS, **OPTIONAL_KEYS}
    wrong = next((key for key in checks if key in meta and not checks[key](meta[key])), None)
    if wrong is not None:
        raise ModelError(f"{file}: {wrong} {meta[wrong]!r} is not a valid value; {AGAIN}")
    return meta


def check_export_files(path: Path, meta: dict) -> None:
    """Every file the encoder reads is in the folder: both ONNX graphs and, for a model with
    projection layers (every kind but SigLIP, whose towers end in the embedding),
    ``projections.safetensors``; else a one-line `ModelError` naming the folder and the file.
    (Without the projections the export would load and fail mid-evaluation, where pooled
    features are projected.)"""
    needed = [IMAGE_FILE, TEXT_FILE] + ([PROJECTIONS_FILE] if meta["kind"] != "siglip" else [])
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise ModelError(f"{path}: the ONNX export folder has no {' or '.join(missing)}; {AGAIN}")


def read_projections(path: Path, embed_dim: int, widths: dict[str, int | None]
                     ) -> dict[str, torch.Tensor]:
    """The projection matrices of ``projections.safetensors`` (none without the file), each
    ``[embed_dim, width]`` for its tower's pooled ``widths`` (None: not fixed in the graph);
    else a one-line `ModelError` naming the file and the tensor."""
    file = path / PROJECTIONS_FILE
    if not file.is_file():
        return {}
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except Exception as err:  # safetensors raises its own exception type
        raise ModelError(f"{file}: cannot be read ({first_line(err)}); {AGAIN}") from None
    for tower, name in PROJECTIONS.items():
        if name not in tensors:
            raise ModelError(f"{file}: no {name!r} tensor; {AGAIN}")
        shape, width = list(tensors[name].shape), widths[tower]
        if len(shape) != 2 or shape[0] != embed_dim or width not in (None, shape[1]):
            raise ModelError(f"{file}: {name} has shape {shape}, the export needs "
                             f"[{embed_dim}, {width or 'width'}]; {AGAIN}")
    return tensors


def _pooled_width(session, file: Path, embed_dim: int) -> int | None:
    """The width of a graph's ``pooled`` output (None where the graph leaves it open), after
    checking its outputs are ``embeddings [B, embed_dim]`` and ``pooled``."""
    outputs = session.get_outputs()
    names = [o.name for o in outputs]
    if names != GRAPH_OUTPUTS:
        raise ModelError(f"{file}: the graph's outputs are {names}, not {GRAPH_OUTPUTS}; {AGAIN}")
    widths = [o.shape[-1] if o.shape and isinstance(o.shape[-1], int) else None
              for o in outputs]
    if widths[0] not in (None, embed_dim):
        raise ModelError(f"{file}: the graph's embeddings are {widths[0]} wide, "
                         f"onnx_export.json says embed_dim {embed_dim}; {AGAIN}")
    return widths[1]


class OnnxEncoder:
    """Image and text towers from an ONNX export folder (CPU, onnxruntime)."""

    # the probe features it gives: its graph returns the embedding and the pooled output
    # only, no hidden states for ``tokens`` / ``layers`` probes
    probe_features = ("embeddings", "backbone")

    def __init__(self, path: str | Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelError("running an ONNX export needs onnxruntime: "
                             "pip install 'cliplab[onnx]'") from None
        path = Path(path)
        if not is_onnx_export(path):
            raise ModelError(f"{path} is not an ONNX export folder (no {EXPORT_FILE})")
        meta = read_export_record(path)
        check_export_files(path, meta)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = path
        self.source = str(path.resolve())  # as `DualEncoder.source`: the folder it was read from
        self.meta = meta
        self._fingerprint: str | None = None  # `weights_fingerprint`, once computed
        self.kind = meta["kind"]
        self.embed_dim = int(meta["embed_dim"])
        self.context_length = int(meta["context_length"])
        self.text_pooling = meta["text_pooling"]
        self.quantize = meta.get("quantize")
        # int8 activations are scaled per batch (dynamic quantization): an image's features
        # depend on the others embedded with it
        self.batch_dependent = self.quantize is not None
        self.preprocess_config = PreprocessConfig.from_dict(meta["preprocess"],
                                                            source=str(path / EXPORT_FILE))
        self.preprocessor = ImagePreprocessor(self.preprocess_config)
        self.tokenizer = load_tokenizer(path)
        self.sessions = {}
        for name, file in (("image", IMAGE_FILE), ("text", TEXT_FILE)):
            try:
                self.sessions[name] = ort.InferenceSession(str(path / file), options,
                                                           providers=["CPUExecutionProvider"])
            except Exception as err:  # onnxruntime raises its own, unrelated exception types
                raise ModelError(f"{path / file}: cannot load the ONNX graph "
                                 f"({str(err).splitlines()[0]})") from None
        self._text_inputs = {i.name for i in self.sessions["text"].get_inputs()}
        widths = {tower: _pooled_width(self.sessions[tower], path / file, self.embed_dim)
                  for tower, file in (("image", IMAGE_FILE), ("text", TEXT_FILE))}
        self.projections = read_projections(path, self.embed_dim, widths)
        if not self.projections and any(w not in (None, self.embed_dim) for w in widths.values()):
            raise ModelError(f"{path}: the ONNX export folder has no {PROJECTIONS_FILE}, and its "
                             f"towers' pooled outputs are not embed_dim {self.embed_dim} wide; "
                             f"{AGAIN}")
        self.logit_scale = torch.tensor(float(meta["logit_scale"]))
        bias = meta.get("logit_bias")
        self.logit_bias = None if bias is None else torch.tensor(float(bias))

    # -- the DualEncoder face -------------------------------------------------------------------
    device = torch.device("cpu")
    training = False

    def eval(self) -> "OnnxEncoder":
        return self

    def train(self, mode: bool = True) -> "OnnxEncoder":
        if mode:
            raise ModelError("an ONNX export runs inference only; it cannot be trained")
        return self

    def to(self, device) -> "OnnxEncoder":
        if torch.device(device).type != "cpu":
            raise ModelError("ONNX exports run on the CPU here")
        return self

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded as the exported model's own tokenize pads."""
        padding = "max_length" if self.meta.get("pad_to_context") else "longest"
        enc = self.tokenizer(clean_texts(texts), padding=padding, truncation=True,
                             max_length=self.context_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def preprocess(self, images, train: bool = False, generator=None, augment=None) -> torch.Tensor:
        return self.preprocessor(images, train=train, generator=generator, augment=augment)

    def _run_image(self, pixel_values: torch.Tensor) -> list[np.ndarray]:
        x = pixel_values.detach().float().cpu().numpy()
        return self.sessions["image"].run(None, {"pixel_values": x})

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Unit-length image embeddings ``[B, D]`` (the graph normalises; ``normalize=False``
        projects the pooled output here instead)."""
        embeddings, pooled = self._run_image(pixel_values)
        if normalize:
            return torch.from_numpy(embeddings)
        return self.project_image(torch.from_numpy(pooled))

    def image_backbone(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run_image(pixel_values)[1])

    def image_backbone_and_probe(self, pixel_values: torch.Tensor, kind: str = "tokens",
                                 layers: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """Not available: the exported graph returns only the pooled output and the embedding."""
        raise ModelError(f"{self.path}: an ONNX export has no {kind!r} probe features (its graph "
                         "returns only the pooled output); set the probe's features to "
                         "backbone or embeddings, or probe the model folder it came from")

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        w = self.projections.get("visual_projection")
        return pooled if w is None else pooled @ w.t()

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        w = self.projections.get("text_projection")
        return pooled if w is None else pooled @ w.t()

    def _run_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feeds = {"input_ids": input_ids.cpu().numpy().astype(np.int64),
                 "attention_mask": attention_mask.cpu().numpy().astype(np.int64)}
        return self.sessions["text"].run(
            None, {k: v for k, v in feeds.items() if k in self._text_inputs})

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        embeddings, pooled = self._run_text(input_ids, attention_mask)
        if normalize:
            return torch.from_numpy(embeddings)
        return self.project_text(torch.from_numpy(pooled))

    def text_backbone(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.from_numpy(self._run_text(input_ids, attention_mask)[1])

    @torch.no_grad()
    def encode_texts(self, texts: list[str] | str, batch_size: int = 256) -> torch.Tensor:
        """Unit text embeddings of a list of strings (one string: a batch of one), as
        `DualEncoder.encode_texts`."""
        texts = [texts] if isinstance(texts, str) else texts  # not one text per character
        batch_size = checked_batch_size(batch_size)
        out = [self.encode_text(**self.tokenize(texts[i:i + batch_size]))
               for i in range(0, len(texts), batch_size)]
        return finite_embeddings(torch.cat(out), "text") if out else \
            torch.empty(0, self.embed_dim)

    def tower_fingerprint(self, tower: str) -> str:
        """The feature caches' key of a tower: the whole export's `weights_fingerprint` (a
        graph's weights may lie in files beside it, and the projections in their own file:
        hashing the graph alone missed both) and the tower's name."""
        h = hashlib.sha256(f"{self.weights_fingerprint()}\0{tower}".encode())
        if tower == "image":  # cliplab's resizing runs before the graph
            h.update(f"resize-v{RESIZE_VERSION}".encode())
        return h.hexdigest()[:16]

    def weights_fingerprint(self) -> str:
        """The export's `model_fingerprint`: SHA-256 over every file of its folder, which is
        what fixes its embeddings — both ONNX graphs (their weights are initializers in them,
        or files beside them for towers over 2 GB), the projection matrices, the export record
        (preprocessing, logit scale, quantization) and the tokenizer. Equal for the same export loaded
        twice (and for a copy of its folder), different for other weights or an int8 export of
        the same model; never equal to a PyTorch model's. The record counts without when it
        was written (`_record_digest`): the same export made again keys the same caches. Read
        once, on first use."""
        if self._fingerprint is None:
            h = hashlib.sha256(b"cliplab-onnx-export\0")
            for file in sorted(p for p in self.path.rglob("*") if p.is_file()):
                h.update(file.relative_to(self.path).as_posix().encode() + b"\0")
                h.update(_record_digest(file) if file == self.path / EXPORT_FILE
                         else _file_digest(file))
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def __repr__(self) -> str:
        return f"OnnxEncoder({self.path}, kind={self.kind}, quantize={self.quantize})"


def _record_digest(file: Path) -> bytes:
    """The digest of ``onnx_export.json`` as written without `stamp`'s keys: what
    `export_onnx` wrote before records carried them (the same bytes, so an older export keys
    as before); a record without them, or not JSON, by its bytes."""
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return _file_digest(file)
    if not isinstance(record, dict) or not any(key in record for key in PROVENANCE_KEYS):
        return _file_digest(file)
    text = json.dumps(without_provenance(record), indent=2) + "\n"
    return hashlib.sha256(text.encode("utf-8")).digest()


def _file_digest(file: Path, chunk: int = 1 << 20) -> bytes:
    h = hashlib.sha256()
    with file.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.digest()


def load_onnx(path: str | Path, threads: int | None = None) -> OnnxEncoder:
    """The towers of an ONNX export folder, run with onnxruntime."""
    return OnnxEncoder(path, threads=threads)


