"""LoRA (Hu et al. 2021) on the attention and MLP projections of either tower or both, via peft.

Target modules are chosen by name among the linear layers of each chosen tower's numbered
blocks (``…layer(s).N.…``), so one rule covers CLIP / SigLIP (``q_proj k_proj v_proj out_proj``,
``fc1 fc2``), HF ViT (``q_proj … o_proj``, ``fc1 fc2``) and BERT / MiniLM (``query key value``,
``attention.output.dense``; ``intermediate.dense``, ``output.dense``). Training is the one `Trainer` loop, with either the
contrastive objective (labelled images turned into caption pairs) or a zero-shot-initialised
classification head. The result is a peft adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, plus ``head.safetensors`` and ``cliplab.json`` with the base
model's path and fingerprint) that loads back onto its base, or merges into a full model folder.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from cliplab.adapt.common import (DATA_KEYS, check_same_classes, count_parameters,
                                  head_metrics, load_split, section)
from cliplab.adapt.finetune import save_finetuned, zeroshot_head
from cliplab.adapt.head import HEAD_FILE, ClassifierHead
from cliplab.config import check_keys, deep_merge
from cliplab.data.pairs import labelled_to_pairs
from cliplab.errors import ConfigError, ModelError
from cliplab.evaluate.zeroshot import zeroshot_classifier
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.folder import (check_same_origin, model_fingerprint, require_origin,
                                  write_origin)
from cliplab.models.resolve import load_model
from cliplab.runs import RunDir
from cliplab.train.trainer import TrainConfig, Trainer

TOWER_PREFIX = {"image": "vision_model", "text": "text_model"}
# regexes of a module name after its block ("…layers.3."); "output.dense" right after the block
# number is BERT's MLP output, "attention.output.dense" its attention output
MODULE_FAMILIES = {
    "attention": [r"(.*\.)?(q_proj|k_proj|v_proj|out_proj|o_proj|query|key|value)",
                  r"attention\.output\.dense"],
    "mlp": [r"(.*\.)?(fc1|fc2)", r"intermediate\.dense", r"output\.dense"],
}
MODULE_FAMILIES["all"] = MODULE_FAMILIES["attention"] + MODULE_FAMILIES["mlp"]
ADAPTER_DIR = "adapter"
TOP_KEYS = {"method", "data", "train", "lora"}
TRAIN_DEFAULTS = {"epochs": 2, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.01,
                  "warmup": 0.1, "augment": {"hflip": False}}


@dataclass
class LoraOptions:
    """The ``lora:`` section: where the adapters go, their size, and what they train for."""

    towers: list[str] = field(default_factory=lambda: ["image"])  # image, text or both
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    modules: str | list[str] = "all"  # all | attention | mlp | [module names, e.g. q_proj]
    objective: str = "classifier"  # classifier (zero-shot-initialised head) | contrastive
    train_head: bool = True  # classifier objective: the head trains with the adapters
    merge: bool = False  # also write the merged full model folder

    @classmethod
    def from_dict(cls, d: dict | None) -> "LoraOptions":
        d = dict(d or {})
        check_keys(d, {f.name for f in fields(cls)}, "section 'lora'")
        opts = cls(**d)
        if isinstance(opts.towers, str):
            opts.towers = [opts.towers]
        bad = sorted(set(opts.towers) - set(TOWER_PREFIX)) or (not opts.towers and ["(none)"])
        if bad:
            raise ConfigError(f"lora.towers must list 'image' and/or 'text', not {bad}")
        if opts.objective not in ("classifier", "contrastive"):
            raise ConfigError(f"lora.objective must be 'classifier' or 'contrastive', "
                              f"not {opts.objective!r}")
        if opts.objective == "classifier" and opts.towers != ["image"]:
            raise ConfigError("lora.objective=classifier trains the image tower only "
                              "(the head replaces the text tower); use towers: [image], or "
                              "objective: contrastive for text-tower adapters")
        if int(opts.rank) < 1:
            raise ConfigError(f"lora.rank must be at least 1, not {opts.rank}")
        if isinstance(opts.modules, str) and opts.modules not in MODULE_FAMILIES:
            raise ConfigError(f"lora.modules must be one of {sorted(MODULE_FAMILIES)} or a list "
                              f"of module names, not {opts.modules!r}")
        return opts


def target_regex(towers: list[str], modules: str | list[str]) -> str:
    """The peft ``target_modules`` regex (full-matched against module names)."""
    if isinstance(modules, str):
        suffix = "|".join(MODULE_FAMILIES[modules])
    else:
        suffix = r"(.*\.)?(" + "|".join(re.escape(m) for m in modules) + ")"
    prefixes = "|".join(TOWER_PREFIX[t] for t in towers)
    return rf"({prefixes})\.(.*\.)?layers?\.\d+\.({suffix})"


def target_modules(model: DualEncoder, towers: list[str], modules: str | list[str]) -> list[str]:
    """Names of the linear layers LoRA would wrap; a tower with none is an error."""
    pattern = re.compile(target_regex(towers, modules))
    names = [n for n, m in model.model.named_modules()
             if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
    for tower in towers:
        if not any(n.startswith(TOWER_PREFIX[tower] + ".") for n in names):
            module = model.tower(tower)
            raise ModelError(f"no LoRA target modules {modules!r} found in the {tower} tower "
                             f"({type(module).__name__}); name them with lora.modules")
    return names


def add_lora(model: DualEncoder, opts: LoraOptions) -> PeftModel:
    """Wrap the target layers of ``model`` (in place) with LoRA adapters; only they train.
    Returns the peft handle (save / merge)."""
    target_modules(model, opts.towers, opts.modules)  # fail clearly before peft does
    config = LoraConfig(r=int(opts.rank), lora_alpha=float(opts.alpha),
                        lora_dropout=float(opts.dropout),
                        target_modules=target_regex(opts.towers, opts.modules))
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        return get_peft_model(model.model, config)


def lora_parameter_count(model: DualEncoder) -> int:
    return sum(p.numel() for n, p in model.model.named_parameters() if "lora_" in n)


def save_adapter(peft_model: PeftModel, folder: str | Path, base_path: str, fingerprint: str,
                 head: ClassifierHead | None = None, options: LoraOptions | None = None) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``head.safetensors``) and
    ``cliplab.json`` recording the base model."""
    folder = Path(folder)
    peft_model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty model card
    if head is not None:
        head.save(folder)
    write_origin(folder, base_path, fingerprint, adapter="lora",
                lora=asdict(options) if options else None)
    return folder


def load_adapter(folder: str | Path, base: str | None = None
                 ) -> tuple[DualEncoder, PeftModel, ClassifierHead | None]:
    """The base model (``base`` or the recorded path; its weights must match the recorded
    fingerprint) with the adapter of ``folder`` on it, and the head if the adapter has one."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"{folder} is not a LoRA adapter folder (no adapter_config.json)")
    base_path = base or require_origin(folder)["path"]
    model = load_model(base_path)
    check_same_origin(folder, model, str(base_path))
    peft_model = PeftModel.from_pretrained(model.model, str(folder))
    head = ClassifierHead.load(folder) if (folder / HEAD_FILE).is_file() else None
    return model.eval(), peft_model, head


def merge_adapter(model: DualEncoder, peft_model: PeftModel) -> DualEncoder:
    """Fold the LoRA updates into the base weights; ``model`` becomes a plain model again."""
    model.model = peft_model.merge_and_unload()
    return model


def train_config(cfg: dict, opts: LoraOptions, progress: bool) -> TrainConfig:
    merged = deep_merge(TRAIN_DEFAULTS, cfg.get("train") or {})
    # a text tower without adapters is frozen: cache its caption features
    return TrainConfig.from_dict({**merged, "lock_text": "text" not in opts.towers,
                                  "progress": progress})


def run(model_path: str, cfg: dict, out: Path, progress: bool = True) -> dict:
    """`cliplab adapt --method lora`: train LoRA adapters on ``data.train``, report accuracy on
    ``data.test`` before and after and the trainable parameter counts; writes ``out/``."""
    start = time.time()
    check_keys(cfg, TOP_KEYS, "the lora config")
    data_cfg = section(cfg, "data", DATA_KEYS)
    opts = LoraOptions.from_dict(cfg.get("lora"))
    train_cfg = train_config(cfg, opts, progress)
    train, test = load_split(data_cfg, "train"), load_split(data_cfg, "test")
    check_same_classes(train, test, "data.train and data.test")
    model = load_model(model_path)
    fingerprint = model_fingerprint(model)
    full = count_parameters(model)["total"]
    image_full = count_parameters(model.vision_tower)["total"] + sum(
        p.numel() for p in getattr(model.model, "visual_projection", nn.Identity()).parameters())
    run_dir = RunDir(out)
    run_dir.write_config({**cfg, "model": str(model_path)})

    zs = zeroshot_head(model, test)
    results = {"method": "lora", "base": str(model_path), "options": asdict(opts),
               "train_images": len(train),
               "zeroshot": head_metrics(model, zs.weight, test, progress, "zero-shot test")}
    head = None
    if opts.objective == "classifier":
        head = zeroshot_head(model, train)
        head.weight.requires_grad_(opts.train_head)
    peft_model = add_lora(model, opts)

    def save(folder: Path) -> None:
        save_adapter(peft_model, folder / ADAPTER_DIR, str(model_path), fingerprint, head, opts)

    trainer = Trainer(model, train_cfg, run_dir, head=head, save_model=save)
    trainer.fit(train if head is not None else labelled_to_pairs(train))
    n_lora = lora_parameter_count(model)
    n_head = head.weight.numel() if head is not None and opts.train_head else 0
    results["params"] = {"lora": n_lora, "head": n_head, "trainable": n_lora + n_head,
                         "total": full, "image_tower": image_full,
                         "fraction_of_total": (n_lora + n_head) / full,
                         "fraction_of_image_tower": (n_lora + n_head) / image_full}
    weight = head.weight if head is not None else zeroshot_classifier(
        model, test.prompt_names, test.templates)
    results["lora"] = head_metrics(model, weight, test, progress, "LoRA test")
    results["adapter_dir"] = str(trainer.last_checkpoint / ADAPTER_DIR)
    if opts.merge:
        merged = merge_adapter(model, peft_model)
        merged_dir = Path(out) / "merged"
        if head is not None:
            save_finetuned(merged, head, merged_dir, str(model_path), fingerprint)
        else:
            merged.save(merged_dir)
            write_origin(merged_dir, str(model_path), fingerprint)
        results["merged_dir"] = str(merged_dir)
    results["wall_time_s"] = round(time.time() - start, 1)
    run_dir.write_json("results.json", results)
    return results
