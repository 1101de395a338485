"""WiSE-FT (Wortsman et al. 2022): weight-space ensembles of zero-shot and fine-tuned models.

``θ(α) = (1 − α)·θ_zero-shot + α·θ_fine-tuned``, elementwise over every weight of the model and
of the classification head (the zero-shot head is the zero-shot text classifier). The sweep
reports, for each α, accuracy on the target test set and on a shifted set; the paper's finding
is that intermediate α keep the fine-tuned model's target accuracy while recovering (and often
beating) the zero-shot model's robustness under shift.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from cliplab.adapt.common import DATA_KEYS, check_same_classes, head_metrics, load_split, section
from cliplab.adapt.finetune import (TRAIN_DEFAULTS, finetune, load_finetuned, save_finetuned,
                                    train_config, zeroshot_head)
from cliplab.config import check_keys
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError, ModelError
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.folder import check_same_origin, model_fingerprint
from cliplab.models.resolve import load_model
from cliplab.runs import RunDir
from cliplab.train.trainer import MODEL_DIR

TOP_KEYS = {"method", "data", "train", "finetune", "wise_ft"}
WISE_KEYS = {"finetuned", "alphas", "save_best", "select"}
DEFAULT_ALPHAS = [round(0.1 * i, 1) for i in range(11)]
SELECT = ("mean", "target", "shifted")  # what "best α" maximises
__all__ = ["interpolate", "wise_ft_sweep", "run", "TRAIN_DEFAULTS"]


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
    """The row maximising target, shifted, or their mean top-1 (ties: the smaller α)."""
    def score(row):
        t, s = row["target"]["acc1"], row.get("shifted", row["target"])["acc1"]
        return {"target": t, "shifted": s, "mean": (t + s) / 2}[select]
    return max(rows, key=lambda r: (score(r), -r["alpha"]))


def _alphas(value) -> list[float]:
    alphas = DEFAULT_ALPHAS if value is None else value
    if not isinstance(alphas, list) or not alphas or not all(
            isinstance(a, (int, float)) and 0 <= a <= 1 for a in alphas):
        raise ConfigError(f"wise_ft.alphas must be a list of numbers in [0, 1], not {value!r}")
    return [float(a) for a in alphas]


def run(model_path: str, cfg: dict, out: Path, progress: bool = True) -> dict:
    """`cliplab adapt --method wise-ft`: fine-tune ``model_path`` (or take ``wise_ft.finetuned``,
    a fine-tuned folder of it), sweep α, report target/shifted accuracy and the best α."""
    start = time.time()
    check_keys(cfg, TOP_KEYS, "the wise-ft config")
    data_cfg = section(cfg, "data", DATA_KEYS)
    opts = section(cfg, "wise_ft", WISE_KEYS)
    alphas = _alphas(opts.get("alphas"))
    select = opts.get("select", "mean")
    if select not in SELECT:
        raise ConfigError(f"wise_ft.select must be one of {SELECT}, not {select!r}")
    sets = {"target": load_split(data_cfg, "test")}
    if data_cfg.get("shifted") is not None:
        sets["shifted"] = load_split(data_cfg, "shifted")
        check_same_classes(sets["target"], sets["shifted"], "data.test and data.shifted")
    zeroshot = load_model(model_path)
    run_dir = RunDir(out)
    run_dir.write_config({**cfg, "model": str(model_path)})

    if opts.get("finetuned"):
        ft_dir = Path(opts["finetuned"])
        check_same_origin(ft_dir, zeroshot, str(model_path))
        finetuned, ft_head = load_finetuned(ft_dir)
    else:
        train = load_split(data_cfg, "train")
        check_same_classes(train, sets["target"], "data.train and data.test")
        finetuned = copy.deepcopy(zeroshot)
        ft_head, trainer = finetune(finetuned, train, train_config(cfg, progress), run_dir,
                                    str(model_path),
                                    bool(section(cfg, "finetune", {"train_head"}).get(
                                        "train_head", True)))
        ft_dir = trainer.last_checkpoint / MODEL_DIR
    if [c.lower() for c in ft_head.classnames] != [c.lower() for c in sets["target"].classnames]:
        raise ConfigError(f"the fine-tuned head's classes {ft_head.classnames} differ from "
                          f"data.test's {sets['target'].classnames}")
    zs_head = zeroshot_head(zeroshot, sets["target"])
    rows = wise_ft_sweep(zeroshot, zs_head.weight, finetuned, ft_head.weight, sets, alphas,
                         progress)
    best = best_alpha(rows, select)
    results = {"method": "wise-ft", "base": str(model_path), "finetuned": str(ft_dir),
               "sets": {k: v.name for k, v in sets.items()}, "sweep": rows,
               "select": select, "best_alpha": best["alpha"], "best": best}
    if opts.get("save_best"):
        state = interpolate(zeroshot.model.state_dict(), finetuned.model.state_dict(),
                            best["alpha"])
        model = copy.deepcopy(zeroshot)
        model.model.load_state_dict(state)
        ft_head.weight.data = torch.lerp(zs_head.weight.data, ft_head.weight.data, best["alpha"])
        results["best_dir"] = str(save_finetuned(model, ft_head, Path(out) / "best",
                                                 str(model_path), model_fingerprint(zeroshot),
                                                 wise_ft_alpha=best["alpha"]))
    results["wall_time_s"] = round(time.time() - start, 1)
    run_dir.write_json("results.json", results)
    return results
