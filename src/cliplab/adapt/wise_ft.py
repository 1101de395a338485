"""WiSE-FT (Wortsman et al. 2022): weight-space ensembles of zero-shot and fine-tuned models.

``θ(α) = (1 − α)·θ_zero-shot + α·θ_fine-tuned``, elementwise over every weight of the model and
of the classification head (the zero-shot head is the zero-shot text classifier). The sweep
reports, for each α, accuracy on the target test set and on a shifted set; the paper's finding
is that intermediate α keep the fine-tuned model's target accuracy while recovering (and often
beating) the zero-shot model's robustness under shift. With a validation split (``val_shots``) the α is
chosen on it (and on its copy shifted by ``options.val_shift``), never on the sets it reports.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator, model_validator

from cliplab.adapt.base import AdaptContext, Adapter, check_named_sets, method_options, \
    require_pytorch_model
from cliplab.adapt.common import head_metrics
from cliplab.adapt.finetune import Options as FinetuneOptions
from cliplab.adapt.finetune import TRAIN_DEFAULTS, FineTuned, finetune, load_finetuned, \
    save_finetuned
from cliplab.adapt.head import ClassifierHead, zeroshot_classifier_head
from cliplab.models.folder import check_same_origin, model_fingerprint
from cliplab.adapt.training import settings_that_ran, trainer_config
from cliplab.config import refuse_unused
from cliplab.data.shift import apply_shift, parse_shift
from cliplab.data.types import LabelledImages
from cliplab.errors import CliplabError, ConfigError, ModelError, warn
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.resolve import WISE_FT_BEST, is_hub_id, resolve_model_path
from cliplab.output_folder import resolved_path
from cliplab.train.trainer import MODEL_DIR

DEFAULT_ALPHAS = [round(0.1 * i, 1) for i in range(11)]
BEST_DIR = WISE_FT_BEST  # a run folder holding it is refused as a model: it holds two
__all__ = ["Options", "WiseFT", "best_alpha", "fit", "interpolate", "wise_ft_sweep"]


NEEDS_PYTORCH_MODEL = "it fine-tunes the model's weights and interpolates them"
INPUT_OPTIONS = ("finetuned",)  # folders of the user's that --out must keep apart from
# the sweep scores each set with every α's model: its sets are decoded once and held, where
# streamed (`cliplab.adapt.scored`) each would be decoded once per α
SCORED_WHOLE = True


class Options(FinetuneOptions):
    """The finetune method's options (``train_head``, ``train``: used when it fine-tunes here)
    plus ``finetuned``: a `--method finetune` result of the same base — its run folder (the
    newest checkpoint), a checkpoint folder or a model folder (null: fine-tune one here);
    ``alphas``: the sweep; ``select``: what the best α maximises (mean of test and shifted
    top-1, or one of them); ``save_best``: write ``best/``, the model at the best α;
    ``val_shift``: the shift (e.g. ``noise:0.3``) making the shifted copy of the validation
    split the α is chosen on when the run has one (``val_shots``)."""

    finetuned: str | None = None
    alphas: list[Annotated[float, Field(ge=0, le=1)]] = Field(DEFAULT_ALPHAS, min_length=1)
    select: Literal["mean", "test", "shifted"] = "mean"
    save_best: bool = False
    val_shift: str | None = None

    @field_validator("finetuned")
    @classmethod
    def _existing(cls, value: str | None) -> str | None:
        # resolved here, with the other options: a bad one fails before any image is encoded
        if value is not None and not Path(value).expanduser().exists() \
                and not is_hub_id(value):
            raise ValueError(f"{value} does not exist (no such file or folder; give a finetune "
                             "run, checkpoint or model folder)")
        if value is not None:
            try:
                resolve_model_path(value)
            except CliplabError as err:
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _no_training_settings_for_a_given_finetune(self) -> Options:
        # they were ignored, yet recorded in config.yaml and results.json as if used
        if self.finetuned is not None:
            refuse_unused(self, ["train_head", "train"], f"with finetuned: {self.finetuned} "
                          "(nothing is trained here)")
        return self

    @field_validator("val_shift")
    @classmethod
    def _known_shift(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_shift(value)
            except ConfigError as err:
                raise ValueError(str(err)) from None
        return value


def interpolate(zeroshot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """``(1 − α)·zeroshot + α·finetuned`` for every floating-point tensor; other tensors
    (integer buffers such as position ids) must be equal and are kept."""
    if set(zeroshot) != set(finetuned):
        diff = sorted(set(zeroshot) ^ set(finetuned))[:3]
        raise ModelError(f"cannot interpolate models with different weights (e.g. {diff})")
    out = {}
    for name, a in zeroshot.items():
        b = finetuned[name]
        if a.shape != b.shape:
            raise ModelError(f"cannot interpolate {name}: shapes {tuple(a.shape)} and "
                             f"{tuple(b.shape)} differ")
        if a.is_floating_point():
            out[name] = torch.lerp(a.float(), b.float(), float(alpha)).to(a.dtype)
        elif torch.equal(a, b):
            out[name] = a.clone()
        else:
            raise ModelError(f"cannot interpolate {name}: non-float tensors differ")
    return out


def wise_ft_sweep(zeroshot: DualEncoder, zs_head: torch.Tensor, finetuned: DualEncoder,
                  ft_head: torch.Tensor, sets: dict[str, LabelledImages],
                  alphas: list[float], progress: bool = True) -> list[dict]:
    """For each α, the interpolated model + head's metrics on every set of ``sets``."""
    check_named_sets(sets, "wise_ft_sweep")
    zs_state = {k: v.detach().clone() for k, v in zeroshot.model.state_dict().items()}
    ft_state = {k: v.detach().clone() for k, v in finetuned.model.state_dict().items()}
    work = copy.deepcopy(zeroshot)
    rows = []
    for alpha in alphas:
        work.model.load_state_dict(interpolate(zs_state, ft_state, alpha))
        head = torch.lerp(zs_head.float(), ft_head.float(), float(alpha))
        row = {"alpha": float(alpha)}
        for name, data in sets.items():
            row[name] = head_metrics(work, head, data, progress, f"α={alpha:g} {name}")
        rows.append(row)
    return rows


def best_alpha(rows: list[dict], select: str = "mean") -> dict:
    """The row maximising test, shifted, or their mean top-1 (ties: the smaller α); without a
    shifted set, the test set stands in for it."""
    def score(row):
        t, s = row["test"]["acc1"], row.get("shifted", row["test"])["acc1"]
        return {"test": t, "shifted": s, "mean": (t + s) / 2}[select]
    return max(rows, key=lambda r: (score(r), -r["alpha"]))


class WiseFT(Adapter):
    """The zero-shot and the fine-tuned model with their heads; ``score`` sweeps α and picks
    the best, after which the adapter is the interpolated model at that α."""

    method = "wise-ft"

    def __init__(self, model: DualEncoder, classnames, options: dict, zs_head: ClassifierHead,
                 finetuned: DualEncoder, ft_head: ClassifierHead, ft_dir: Path | None,
                 base_path: str, fingerprint: str, val: LabelledImages | None = None,
                 val_label: str = "validation"):
        super().__init__(model, classnames, options)
        self.val, self.val_label = val, val_label
        self.zs_head, self.finetuned, self.ft_head, self.ft_dir = zs_head, finetuned, ft_head, \
            ft_dir
        self.base_path, self.fingerprint = base_path, fingerprint
        self.alpha: float | None = None
        self.best_dir: Path | None = None
        self._at: FineTuned | None = None

    def at(self, alpha: float) -> FineTuned:
        """The interpolated model and head at ``alpha``."""
        if self._at is None or self._at.options.get("alpha") != alpha:
            model = copy.deepcopy(self.model)
            model.model.load_state_dict(interpolate(self.model.model.state_dict(),
                                                    self.finetuned.model.state_dict(), alpha))
            head = copy.deepcopy(self.ft_head)
            head.weight.data = torch.lerp(self.zs_head.weight.data.float(),
                                          self.ft_head.weight.data.float(), float(alpha))
            self._at = FineTuned(model, self.classnames, {"alpha": alpha}, head,
                                 self.base_path, self.fingerprint)
        return self._at

    def _chosen(self) -> FineTuned:
        if self.alpha is None:
            raise ModelError("WiSE-FT picks its α in score(); call it first")
        return self.at(self.alpha)

    def logits(self, images_or_features, cache: FeatureCache | None = None,
               progress: bool = False) -> torch.Tensor:
        return self._chosen().logits(images_or_features, cache, progress)

    def feature_logits(self, feats, progress: bool = False):
        return self._chosen().feature_logits(feats, progress)

    def score(self, sets: dict[str, LabelledImages], cache: FeatureCache,
              progress: bool = False) -> dict:
        """The α sweep on every set, the best α by ``select`` — on the validation split (as
        ``test``) and its shifted copy (as ``shifted``) when there is one, else on ``sets``
        themselves — and the sets' metrics at it."""
        rows = wise_ft_sweep(self.model, self.zs_head.weight, self.finetuned,
                             self.ft_head.weight, sets, self.options["alphas"], progress)
        extra: dict = {"selected_on": "the reported sets (no validation split: val_shots=0)"}
        chosen_from = rows
        if self.val is not None:
            val_sets = {"test": self.val}
            if self.options["val_shift"]:
                val_sets["shifted"] = dataclasses.replace(
                    self.val, images=apply_shift(self.val.images, self.options["val_shift"]))
            chosen_from = wise_ft_sweep(self.model, self.zs_head.weight, self.finetuned,
                                        self.ft_head.weight, val_sets, self.options["alphas"],
                                        progress)
            extra = {"selected_on": self.val_label + (f" + {self.options['val_shift']}"
                                                      if self.options["val_shift"] else ""),
                     "validation_sweep": chosen_from}
        if self.options["select"] == "shifted" and "shifted" not in chosen_from[0]:
            extra["selected_by"] = "test (select=shifted, but no shifted set to choose on)"
            warn("wise-ft: select=shifted, but there is no shifted set to choose α on ("
                 + ("options.val_shift makes one of the validation split"
                    if self.val is not None else "set data.shifted, or val_shots and "
                    "options.val_shift") + "); test accuracy chose it")
        self.alpha = best_alpha(chosen_from, self.options["select"])["alpha"]
        best = next(r for r in rows if r["alpha"] == self.alpha)
        return {"sweep": rows, "best_alpha": self.alpha, **extra,
                **{name: best[name] for name in sets}}

    def save(self, folder: str | Path, extra: dict | None = None) -> Path | None:
        """With ``save_best``, ``folder/best``: the model and head at the best α."""
        if self.options["save_best"] and self.best_dir is None:
            chosen = self._chosen()
            self.best_dir = save_finetuned(chosen.model, chosen.head, Path(folder) / BEST_DIR,
                                           self.base_path, self.fingerprint,
                                           wise_ft_alpha=self.alpha)
        return self.best_dir

    def summary(self) -> dict:
        return {"finetuned": resolved_path(self.ft_dir),
                **({"best_dir": resolved_path(self.best_dir)} if self.best_dir else {})}


def uses_validation(options: Options) -> bool:
    """The best α is chosen on the validation split when there is one."""
    return True


def fit(model: DualEncoder, train: LabelledImages, options: Options | dict | None,
        ctx: AdaptContext) -> WiseFT:
    """Fine-tune a copy of ``model`` on ``train`` (or load ``options.finetuned``'s model
    folder, which must come from exactly these weights); ``model`` stays the zero-shot end."""
    require_pytorch_model("wise-ft", NEEDS_PYTORCH_MODEL, model)
    opts = method_options(Options, options, "wise-ft")
    if opts.val_shift and ctx.val is None:
        raise ConfigError("options.val_shift shifts a copy of the validation split, but there "
                          "is none: set val_shots (or data.val), or drop val_shift")
    fingerprint = model_fingerprint(model)
    if opts.finetuned:
        ft_dir = resolve_model_path(opts.finetuned)
        check_same_origin(ft_dir, model, ctx.origin(model) or "the given model")
        finetuned, ft_head = load_finetuned(ft_dir, model.device)  # where the sweep runs
    else:
        finetuned = copy.deepcopy(model)
        train_cfg = trainer_config(TRAIN_DEFAULTS, opts.train, seed=ctx.seed, lock_text=True,
                                   progress=ctx.progress, device=model.device)
        ft_head, trainer = finetune(finetuned, train, train_cfg, ctx.run, ctx.origin(model),
                                    opts.train_head, fingerprint)
        ft_dir = trainer.last_checkpoint / MODEL_DIR if trainer.last_checkpoint else None
    if [c.lower() for c in ft_head.classnames] != [c.lower() for c in train.classnames]:
        raise ConfigError(f"the fine-tuned head's classes {ft_head.classnames} differ from "
                          f"data.train's {train.classnames}")
    adapter = WiseFT(model, train.classnames, opts.to_dict(),
                     zeroshot_classifier_head(model, train), finetuned, ft_head, ft_dir,
                     ctx.origin(model), fingerprint, ctx.val, ctx.val_label)
    adapter.trained_with = None if opts.finetuned else \
        settings_that_ran(train_cfg, trainer.precision)
    return adapter
