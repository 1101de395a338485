"""What every adaptation method shares: the `Adapter` it returns, the context it fits in, and
how a learned adapter is written (``adapter.safetensors`` + ``adapter.json``) and read back."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import torch
from safetensors.torch import load_file

from cliplab.adapt.featured import FeaturedImages
from cliplab.adapt.scored import ScoredSet, score_sets
from cliplab.config import Section, validate
from cliplab.data.pairs import check_same_classes
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError, InputError, ModelError
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.features import ImageFeatures
from cliplab.file_modes import save_tensors
from cliplab.models.dual_encoder import DualEncoder, kept_modes
from cliplab.models.folder import model_fingerprint
from cliplab.models.preprocess import to_uint8_batch
from cliplab.output_folder import lies_inside, write_utf8
from cliplab.provenance import stamp
from cliplab.runs import RunDir

TENSORS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
FORMAT_VERSION = 1
DEFAULT_SEED = 1  # the adapt config's default too: Python and `cliplab adapt` draw alike


O = TypeVar("O", bound=Section)


@dataclass
class AdaptContext:
    """What a method may use besides its model, data and options: the shared feature cache,
    a validation split (for hyper-parameter search), the seed, whether to show progress, the
    run folder (methods that train weights write their checkpoints there; None: nowhere),
    the name the model was given by (recorded as the pretrained origin of what is written;
    None: the folder it was loaded from, see `origin`) and what a choice made on ``val`` is
    recorded as being made on (``val_label``)."""

    cache: FeatureCache
    val: LabelledImages | None = None
    seed: int = DEFAULT_SEED
    progress: bool = True
    run: RunDir | None = None
    model_name: str | None = None
    val_label: str = "validation"

    def origin(self, model: DualEncoder) -> str | None:
        """The base recorded in what a method writes: ``model_name``, else the folder
        ``model`` was loaded from, else None (a model built in memory: no path to record)."""
        return self.model_name or model.source

    def features(self, model: DualEncoder, data: LabelledImages, probe: str | None = None,
                 desc: str = "encode images") -> ImageFeatures:
        """``data``'s image features (with ``probe``'s) from the cache; a streamed training
        set's (`FeaturedImages`, no pixels held) are the ones it carries."""
        if isinstance(data, FeaturedImages):
            return data.features_for(model, probe, desc)
        return self.cache.features(model, data.images, probe=probe, progress=self.progress,
                                   desc=desc)


class Adapter:
    """A learned classifier on top of a (frozen) `DualEncoder`.

    Subclasses set ``method``, keep their learned tensors in ``state()`` and their settings in
    ``options`` (the validated options plus what fitting found, as a plain dict), and implement
    ``feature_logits``; ``from_state`` rebuilds one from both. ``probe`` names the image
    features ``feature_logits`` needs besides the embeddings (``"tokens"`` / ``"layers"``), or
    None. Methods that change the model's weights override ``save`` (they write model or peft
    folders) and may add to ``score`` (WiSE-FT reports a sweep).
    """

    method: ClassVar[str] = ""
    probe: str | None = None
    # methods that train through the Trainer: the whole of its settings as they ran (the
    # options hold only the train keys given), recorded as results.json's "train_settings"
    trained_with: dict | None = None

    def __init__(self, model: DualEncoder, classnames: list[str], options: dict):
        self.model = model
        self.classnames = list(classnames)
        self.options = dict(options)

    # -- prediction ---------------------------------------------------------------------------
    def feature_logits(self, feats: ImageFeatures, progress: bool = False) -> torch.Tensor:
        """Class logits ``[N, C]`` from frozen image features (``progress``: a bar where the
        method's own scoring is long, e.g. CoCoOp's prompts per image)."""
        raise NotImplementedError

    @torch.no_grad()
    def logits(self, images_or_features, cache: FeatureCache | None = None,
               progress: bool = False) -> torch.Tensor:
        """Class logits ``[N, C]`` of uint8 images ``[N, H, W, C]`` (or what `to_uint8_batch`
        takes: one image, a list of PIL images, a numpy batch), of `ImageFeatures`, or of unit
        image embeddings ``[N, D]`` (float)."""
        x = images_or_features
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            if x.ndim != 2:
                raise InputError(f"float input must be image embeddings [N, D], got shape "
                                 f"{tuple(x.shape)}; images are uint8 [N, H, W, C]")
            x = ImageFeatures(x, torch.empty(len(x), 0))
        elif not isinstance(x, ImageFeatures):
            x = (cache or FeatureCache()).features(self.model, to_uint8_batch(x),
                                                   probe=self.probe, progress=progress)
        return self.feature_logits(x, progress).float()

    def score(self, sets: dict[str, ScoredSet], cache: FeatureCache,
              progress: bool = False) -> dict:
        """``{set name: acc1/acc5/mean per-class recall}`` of the adapter on each labelled set
        (``test``, and ``shifted`` when the config has one): the eval suite's ``zeroshot`` task
        with this adapter as its classifier (`score_sets`: a `ListedSet` is streamed). Each
        set must have the adapter's classes in its order (prompt learners score others
        through ``for_classes``)."""
        check_named_sets(sets, "score")
        for name, data in sets.items():
            check_same_classes(self, data, "score", ("the adapter", name))
        return score_sets(self.model, sets, cache, progress, classifier=self)

    def summary(self) -> dict:
        """Extra entries for ``results.json`` (parameter counts, written folders); none here."""
        return {}

    # -- persistence --------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """The learned tensors (what ``save`` writes to safetensors)."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, model: DualEncoder, classnames: list[str], options: dict,
                   tensors: dict[str, torch.Tensor]) -> "Adapter":
        raise NotImplementedError

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write ``adapter.safetensors`` (learned tensors) and ``adapter.json`` (method,
        options, class names, the model's weights fingerprint, and ``extra`` such as the
        model path)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.detach().float() if v.is_floating_point() else v).cpu().contiguous()
                   for k, v in self.state().items()}
        save_tensors(tensors, str(folder / TENSORS_FILE))
        meta = {"format": FORMAT_VERSION, "method": self.method, "options": self.options,
                "classnames": self.classnames, "fingerprint": model_fingerprint(self.model),
                **(extra or {})}
        # atomic: a full disk left a 0-byte adapter.json beside complete weights
        write_utf8(folder / META_FILE, json.dumps(stamp(meta), indent=2))
        return folder


def written_inside(written: Path, folder: str | Path) -> bool:
    """Whether ``written`` (a folder an adapter wrote, e.g. its run's last checkpoint) lies
    inside ``folder``: saving there again would write it twice."""
    return lies_inside(Path(written).resolve(), Path(folder).resolve())


def copy_written(written: Path, target: Path) -> Path:
    """A copy of the folder ``written`` at ``target`` (an adapter saved once already, saved to
    another folder: the same files)."""
    if target.exists():
        raise ConfigError(f"{target} exists already; save into a new folder")
    shutil.copytree(written, target)
    return target


@contextlib.contextmanager
def kept_training_state(model: DualEncoder):
    """``model``'s ``requires_grad`` flags and train/eval mode as they were before the block
    (a method that trains the weights in place freezes parts of the model to do it)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with kept_modes(model):
        try:
            yield model
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


def check_named_sets(sets: object, where: str) -> None:
    """An InputError unless ``sets`` maps names to the sets (a list of sets was a traceback)."""
    if not isinstance(sets, Mapping):
        raise InputError(f"{where}: sets must be a dict of named labelled sets, e.g. "
                         f"{{'test': data}}; got {type(sets).__name__}")


@contextlib.contextmanager
def frozen(model: DualEncoder):
    """Every weight of ``model`` frozen and the model in eval mode (no dropout) inside the
    block; the previous flags and mode are restored after."""
    with kept_training_state(model):
        model.requires_grad_(False)
        model.eval()
        yield model


# the methods that read only image and text features, which an ONNX export gives (the others
# declare NEEDS_PYTORCH_MODEL in their module and refuse an export). Written out, as the method
# modules import this one (reading them from the registry here would be an import circle);
# tests/test_onnx_as_model.py keeps it equal to the registry's methods without the flag.
EXPORT_METHODS = ("zeroshot", "linear-probe", "tip-adapter", "tip-adapter-f", "clip-adapter")


def require_pytorch_model(method: str, why: str, model) -> None:
    """A one-line `ConfigError` when ``model`` (a loaded model or a model spec) is an ONNX
    export (`cliplab export --format onnx`, inference only) and adapt method ``method`` needs
    the PyTorch model for ``why`` (gradients through a tower, or weights that change). Checked
    before any work: before the data is loaded, or first thing in the method's ``fit``."""
    from cliplab.models.onnx_encoder import OnnxEncoder, is_onnx_export
    from cliplab.models.spec import ModelSpec, model_spec

    if isinstance(model, OnnxEncoder):
        name = str(model.path)
    elif isinstance(model, (str, Path, dict, ModelSpec)):
        name = model_spec(model).name
        if not is_onnx_export(Path(name).expanduser()):
            return
    else:  # a PyTorch model, or none given
        return
    raise ConfigError(f"adapt method {method!r} needs the PyTorch model ({why}), but {name} is "
                      "an ONNX export, which runs inference only: give the PyTorch model "
                      "folder the export came from as the model (--model), or, on the export, "
                      f"a method that reads only features ({', '.join(EXPORT_METHODS)})")


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and tensors of a saved adapter folder, with one-line errors if absent."""
    folder = Path(folder)
    meta_file, tensor_file = folder / META_FILE, folder / TENSORS_FILE
    if not meta_file.is_file() or not tensor_file.is_file():
        raise ModelError(f"{folder} is not an adapter folder (needs {META_FILE} and "
                         f"{TENSORS_FILE}, as `cliplab adapt --out` writes)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(f"{meta_file}: invalid JSON ({err.msg}, line {err.lineno})") from None
    return meta, load_file(str(tensor_file))


def method_options(schema: type[O], given: O | dict | None, method: str,
                   where: str | None = None) -> O:
    """A method's options as its `Section` schema: ``given`` may be the schema's object, a
    mapping or None (all defaults); a bad key or value is a one-line error naming ``where``
    (default: the method) and the key as ``options.KEY``."""
    if isinstance(given, schema):
        return given
    return validate(schema, given or {}, where or f"adapt method {method!r}", prefix="options")
