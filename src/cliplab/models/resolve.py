"""The one resolver behind every command and config that names a model.

A model spec (`cliplab.models.spec.ModelSpec`) names, in the order tried:

1. a preset (``tiny-clip``, ...), built fresh with the spec's ``options``;
2. an existing path: a model folder (cliplab's, or a plain HF CLIP / SigLIP /
   VisionTextDualEncoder folder), a checkpoint folder (``…/checkpoints/step-N``, holding
   ``model/``) or a run folder (its newest complete checkpoint; a WiSE-FT run's with
   ``best/`` is refused, naming ``best/`` and the fine-tuned end);
   an OpenCLIP checkpoint (converted on the way in) or an ONNX export (`cliplab export
   --format onnx`: an `OnnxEncoder` with the same encode/preprocess face, for inference);
3. a Hugging Face Hub id (``openai/clip-vit-base-patch32``), read from transformers' own cache
   (``$HF_HUB_CACHE``), so it works offline (``HF_HUB_OFFLINE=1``) once fetched.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cliplab.errors import ModelError, UnknownModelError, warn
from cliplab.models.device import resolve_device
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.presets import PRESETS, build_model
from cliplab.models.spec import ModelSpec, is_hub_id, model_spec
from cliplab.runs import CHECKPOINTS, METRICS_FILE, RESULTS_FILE, latest_checkpoint

if TYPE_CHECKING:  # an ONNX export loads as one (it embeds as a DualEncoder does)
    from cliplab.models.onnx_encoder import OnnxEncoder

MODEL_DIR = "model"  # a checkpoint folder's model folder
WISE_FT_BEST = "best"  # adapt wise-ft's options.save_best: the model at the chosen α
# what a dual encoder needs from a Hub repo (not its TF / Flax / ONNX copies)
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]
CHECKPOINT_READ_TRIES = 3  # a live run's newest checkpoint removed while read: read anew


def load_model(spec: ModelSpec | str | dict | Any, device: str | torch.device = "cpu"
               ) -> DualEncoder | OnnxEncoder:
    """A `DualEncoder` from a model spec (preset, model/checkpoint/run folder, Hub id) on
    ``device`` (a torch device or a name, ``auto``: the GPU when there is one). An ONNX export
    runs on the CPU: with ``auto`` it does so, a GPU named for it is refused."""
    spec = model_spec(spec)
    named, device = str(device), resolve_device(device)
    if spec.name in PRESETS:
        return build_model(spec.name, **spec.options).to(device)
    if not Path(spec.name).expanduser().exists() and not is_hub_id(spec.name):
        raise unknown_model(spec.name)
    path = Path(spec.name).expanduser()
    if path.exists():
        from cliplab.models.convert import is_openclip_checkpoint, load_openclip
        from cliplab.models.onnx_encoder import is_onnx_export, load_onnx

        if is_onnx_export(path):
            if named not in ("auto", "cpu"):
                raise ModelError(f"{path} is an ONNX export, which runs on the CPU here "
                                 f"(onnxruntime); device {named} cannot run it: use cpu or auto")
            return load_onnx(path)
        if is_openclip_checkpoint(path):
            return load_openclip(path, device=device)
    return _load_folder(spec, device)


def _load_folder(spec: ModelSpec, device: torch.device) -> DualEncoder:
    """`DualEncoder.load` of the folder ``spec`` resolves to. A run still training with
    ``train.keep_checkpoints`` removes its older checkpoints: the one chosen as newest, removed
    while it was read, is taken again from the run's newest (the error would blame the model)."""
    for _ in range(CHECKPOINT_READ_TRIES):
        folder = resolve_model_path(spec)
        try:
            return DualEncoder.load(folder, device=device)
        except (ModelError, OSError):
            checkpoint = folder.parent
            if folder.exists() or checkpoint.parent.name != CHECKPOINTS:
                raise
            if Path(spec.name).expanduser() != checkpoint.parent.parent:
                # the checkpoint the user named is gone: no newer one is what they asked for
                raise ModelError(f"{folder} was removed while it was read (a run still training "
                                 "keeps only its newest train.keep_checkpoints checkpoints); "
                                 "give the run folder, or a checkpoint it keeps") from None
    raise ModelError(f"{spec.name}: its newest checkpoint was removed while it was read, "
                     f"{CHECKPOINT_READ_TRIES} times (a run still training keeps only its newest "
                     "train.keep_checkpoints); try again, or give a checkpoint it keeps")


def model_record(spec: ModelSpec | str | dict | Any | None, model: Any) -> dict:
    """What identifies the model ``spec`` loaded as ``model``, for a results file: the folder
    it resolved to (a run folder's newest checkpoint, a Hub id's snapshot; None for a preset,
    built in memory; without a spec, the folder ``model`` was loaded from, if any) and its
    weights' `model_fingerprint` (equal iff the same weights)."""
    from cliplab.models.folder import model_fingerprint

    if spec is None:
        folder = getattr(model, "source", None)
    elif model_spec(spec).name in PRESETS:
        folder = None
    else:
        folder = str(resolve_model_path(spec).expanduser().resolve())
    return {"model_folder": folder, "fingerprint": model_fingerprint(model)}


def export_source(spec: str, model: Any) -> dict:
    """What an export records it was made from (``source`` in ``onnx_export.json`` and
    ``open_clip_export.json``): the spec as given plus `model_record`."""
    return {"model": spec, **model_record(spec, model)}


def resolve_model_path(spec: ModelSpec | str | dict | Any) -> Path:
    """The model folder a non-preset spec names (a folder, checkpoint, run or Hub id; an
    OpenCLIP checkpoint file: the file). Any other file is refused, naming its folder."""
    spec = model_spec(spec)
    if spec.name in PRESETS:
        raise ModelError(f"{spec.name!r} is a preset, built in memory: it has no folder")
    path = Path(spec.name).expanduser()
    if path.is_file():
        from cliplab.models.convert import is_openclip_checkpoint

        if not is_openclip_checkpoint(path):  # the one kind of file a spec may name
            raise not_a_folder(path)
    if path.exists():
        return model_folder(path)
    if is_hub_id(spec.name):
        return hub_snapshot(spec.name)
    raise unknown_model(spec.name)


def unknown_model(name: str) -> UnknownModelError:
    """The error for a name that is no preset, no existing path and no Hub id: a path that
    does not exist when it is written as one, else the kinds of names there are (and the
    preset it is closest to)."""
    if os.sep in name or "/" in name or name.startswith((".", "~")):
        return UnknownModelError(missing_path(name), name)
    close = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UnknownModelError(f"unknown model {name!r}: give a preset ({', '.join(PRESETS)}), "
                             f"a model, checkpoint or run folder, or a Hugging Face Hub id "
                             f"(org/name){hint}", name)


def missing_path(name: str) -> str:
    """What is said of a model path that does not exist: a relative one names the working
    folder it was looked for in (a shipped config's ``runs/…`` is made by an earlier run)."""
    said = f"{name} does not exist (no such file or folder, and no preset of that name)"
    if not Path(name).expanduser().is_absolute():
        said += f" in the working folder {Path.cwd()}"
    return said


def not_a_folder(file: Path) -> ModelError:
    """The error for a model spec naming a file that is no OpenCLIP checkpoint: the model
    folder holding it, when it is in one, else what a file must be to be taken."""
    if (file.parent / "config.json").is_file():
        return ModelError(f"{file} is a file, not a model folder; give the folder that holds it: "
                          f"{file.parent}")
    from cliplab.models.convert.openclip_files import WEIGHT_SUFFIXES

    if file.suffix in WEIGHT_SUFFIXES:
        return ModelError(f"{file} is a file, not a model folder; an OpenCLIP checkpoint file "
                          "needs its model config beside it (open_clip_config.json, or a single "
                          "*.json such as ViT-B-32.json)")
    return ModelError(f"{file} is a file; give a model, checkpoint or run folder (or an "
                      "OpenCLIP checkpoint file with its config JSON beside it)")


def model_folder(path: str | Path) -> Path:
    """The model folder behind ``path``: a model folder itself, a checkpoint folder (``…/step-N``,
    holding ``model/``) or a run folder (its newest complete checkpoint). A WiSE-FT run folder
    is refused, naming the models it holds."""
    path = Path(path)
    if (path / MODEL_DIR).is_dir():
        return path / MODEL_DIR
    if _is_wise_ft_run(path):
        # its newest checkpoint is the fine-tuned end (α=1), not the model the run chose
        raise ModelError(_wise_ft_run_choice(path))
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise ModelError(f"run folder {path} has no complete checkpoint yet "
                             f"({CHECKPOINTS}/step-N)")
        if not (latest / MODEL_DIR).is_dir():
            held = ", ".join(sorted(p.name for p in latest.iterdir())) or "nothing"
            raise ModelError(f"{latest} holds no {MODEL_DIR}/ folder (it holds {held}): "
                             + _partial_run_hint(path, latest))
        if not (path / RESULTS_FILE).is_file():
            # a killed run's step-20 of 46 was scored, merged and reported as if it were the run;
            # warned from here (not the caller): said once however many readers resolve it
            warn(f"run folder {path} has no {RESULTS_FILE}: the run stopped before its "
                 f"end, or still runs; using its newest checkpoint, {latest.name}")
        return latest / MODEL_DIR
    if (path / METRICS_FILE).is_file() and not (path / "config.json").is_file() \
            and not (path / RESULTS_FILE).is_file():
        # a run stopped before its first save: "not a model folder" hid that it is a run. Here
        # a model is read (export, eval, adapt, index...): no resume advice, whose "--out" would
        # name the reader's own output; pretrain --resume says its own (runs.check_new_run)
        raise ModelError(f"run folder {path} has no checkpoint yet: the run stopped (or still "
                         "runs) before its first save, so it holds no model to read; give a "
                         "model, a checkpoint or a run folder with a checkpoint")
    return path


def _is_wise_ft_run(path: Path) -> bool:
    """Whether ``path`` is a WiSE-FT run folder (no model folder itself): one holding
    ``best/``, or one its results say is."""
    if (path / "config.json").is_file():
        return False
    return (path / WISE_FT_BEST / "config.json").is_file() or \
        _results(path).get("method") == "wise-ft"


def _results(run: Path) -> dict:
    """The run folder's ``results.json`` as a dict (empty when it has none, or a bad one)."""
    try:
        loaded = json.loads((run / RESULTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _wise_ft_run_choice(run: Path) -> str:
    """The error for a WiSE-FT run folder given as a model: it names the two models the run
    holds, its best α's (``best/``) and the fine-tuned end."""
    results = _results(run)
    alpha = results.get("best_alpha")
    chosen = f"α={alpha:g}" if isinstance(alpha, (int, float)) else "the best α"
    if isinstance(results.get("selected_on"), str):
        chosen += f", chosen on {results['selected_on']}"
    latest = latest_checkpoint(run)
    end = (latest / MODEL_DIR if latest is not None
           else results.get("finetuned") or f"{run / CHECKPOINTS}/step-N/{MODEL_DIR}")
    if not (run / WISE_FT_BEST / "config.json").is_file():
        return (f"{run} is a WiSE-FT run folder: its checkpoints hold the fine-tuned end (α=1), "
                f"not the model at {chosen} (options.save_best=true keeps that as "
                f"{run / WISE_FT_BEST}); give {end} for the fine-tuned end")
    return (f"{run} is a WiSE-FT run folder, which holds two models: give {run / WISE_FT_BEST} "
            f"(the model at {chosen}) or {end} (the fine-tuned end, α=1)")


def _partial_run_hint(run: Path, latest: Path) -> str:
    """What to give instead of a run whose checkpoints hold no whole model (a LoRA run's hold
    its adapter): its merged model when it wrote one."""
    merged = run / "merged"  # adapt lora's options.merge=true
    if (merged / "config.json").is_file():
        return f"the run's merged model is {merged}: give that"
    if (latest / "adapter" / "adapter_config.json").is_file():
        return ("a LoRA run: load it with cliplab.adapt.lora.load_lora, or run it with "
                "options.merge=true for a whole model folder (RUN/merged)")
    return "give a run whose checkpoints are whole models"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of Hub model ``repo_id`` in the Hugging Face cache; fetched
    first when it is not cached and the Hub may be reached (``HF_HUB_OFFLINE`` unset)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception as err:  # noqa: BLE001 - a damaged cache entry: say which
        raise ModelError(f"Hugging Face cache entry of {repo_id} in {cache} cannot be read "
                         f"({type(err).__name__}: {err})") from None
    if hub_offline():
        raise UnknownModelError(f"{missing_path(repo_id)}, and is not in the Hugging Face "
                                f"cache ({cache}); if it is a Hub id, HF_HUB_OFFLINE=1: fetch it "
                                f"once with `hf download {repo_id}` (or set HF_HUB_OFFLINE=0 to "
                                "let cliplab fetch it)", repo_id)
    return _download(repo_id, cache)


def _download(repo_id: str, cache: str) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):  # older repos hold only PyTorch weights
            hf_hub_download(repo_id, "pytorch_model.bin", cache_dir=cache)
    except Exception as err:  # noqa: BLE001 - network, auth, no such repo: one line
        first = (str(err).strip().splitlines() or [""])[0]
        raise ModelError(f"cannot fetch {repo_id} from the Hugging Face Hub "
                         f"({type(err).__name__}: {first}); with it fetched elsewhere, copy "
                         f"the cache ({cache}) here and set HF_HUB_OFFLINE=1") from None
    return folder
