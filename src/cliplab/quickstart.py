"""`cliplab quickstart`: LiT pretraining on Fashion-MNIST with three classes never seen in
training, then zero-shot transfer to them and a linear probe — a small real pipeline, end to end.
"""

from __future__ import annotations

import time

import torch

from cliplab.config import check_keys, deep_merge
from cliplab.data.fashion_mnist import canonical_name, load_fashion_mnist
from cliplab.data.pairs import class_indices, labelled_to_pairs, split_classes
from cliplab.errors import ConfigError
from cliplab.evaluate.features import PROBE_FEATURES, encode_images
from cliplab.evaluate.linear_probe import linear_probe
from cliplab.evaluate.zeroshot import zeroshot_classifier, zeroshot_metrics
from cliplab.models.resolve import load_model
from cliplab.runs import RunDir, default_run_dir
from cliplab.train.trainer import TrainConfig, Trainer

DEFAULTS: dict = {
    "model": {"preset": "lit-minilm",
              "options": {"image_size": 28, "patch_size": 7, "width": 192, "layers": 4,
                          "heads": 3}},
    "data": {"data_dir": None, "heldout": ["Shirt", "Sneaker", "Bag"], "train_limit": None,
             "test_limit": None, "descriptions": True},
    "train": {"epochs": 8, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.05, "warmup": 0.05,
              "lock_text": True, "augment": {"hflip": False}, "multi_positive": True,
              "precision": "bf16", "lr_scale": {"text_projection": 0.1}},
    "eval": {"probe_train_size": 20000, "probe_l2": 0.01, "probe_features": "tokens",
             "probe_layers": 4},
    "out": None,
}
SECTIONS = {"model": {"preset", "options"},
            "data": {"data_dir", "heldout", "train_limit", "test_limit", "descriptions"},
            "eval": {"probe_train_size", "probe_l2", "probe_features", "probe_layers"}}


def quickstart_config(user: dict | None = None) -> dict:
    """The defaults updated with ``user``; unknown keys are an error naming the section."""
    user = user or {}
    check_keys(user, set(DEFAULTS), "the quickstart config")
    for section, known in SECTIONS.items():
        if isinstance(user.get(section), dict):
            check_keys(user[section], known, f"quickstart config section {section!r}")
    cfg = deep_merge(DEFAULTS, user)
    TrainConfig.from_dict(cfg["train"])  # validate early, before any data is loaded
    return cfg


def run_quickstart(config: dict | None = None, progress: bool = True) -> dict:
    """Pretrain, evaluate and write the run folder; returns the results dict."""
    start = time.time()
    cfg = quickstart_config(config)
    data = cfg["data"]
    describe = bool(data["descriptions"])
    train_all = load_fashion_mnist("train", data["data_dir"], data["train_limit"], describe)
    test = load_fashion_mnist("test", data["data_dir"], data["test_limit"], describe)
    held_names = [canonical_name(n) for n in data["heldout"]]
    heldout = class_indices(train_all.classnames, held_names)
    seen_train, _ = split_classes(train_all, held_names)

    # the run folder is made only once the inputs are known to be good
    run = RunDir(cfg["out"] or default_run_dir("quickstart"))
    cfg["out"] = str(run.path)
    run.write_config(cfg)

    model = load_model({"name": cfg["model"]["preset"],
                        "options": cfg["model"].get("options") or {}})
    train_cfg = TrainConfig.from_dict({**cfg["train"], "progress": progress})
    trainer = Trainer(model, train_cfg, run)
    trainer.fit(labelled_to_pairs(seen_train))
    final = trainer.last_checkpoint / "model"

    results = evaluate_transfer(model, train_all, test, heldout, cfg["eval"], progress)
    results.update({"heldout_classes": [train_all.classnames[i] for i in heldout],
                    "train_pairs": len(seen_train), "steps": trainer.step,
                    "model_dir": str(final), "wall_time_s": round(time.time() - start, 1)})
    run.write_json("results.json", results)
    return results


def evaluate_transfer(model, train_all, test, heldout: list[int], eval_cfg: dict,
                      progress: bool = True) -> dict:
    """Zero-shot over all classes and over the held-out ones, and a linear probe on all."""
    which = eval_cfg["probe_features"]
    if which not in PROBE_FEATURES:
        raise ConfigError(f"eval.probe_features must be one of {PROBE_FEATURES}, not {which!r}")
    layers = int(eval_cfg["probe_layers"])
    classifier = zeroshot_classifier(model, test.prompt_names, test.templates)
    test_feats = encode_images(model, test.images, progress=progress, desc="encode test",
                               probe=which, probe_layers=layers)
    zs_all = zeroshot_metrics(test_feats.embeddings, test.labels, classifier)
    zs_held = zeroshot_metrics(test_feats.embeddings, test.labels, classifier, classes=heldout)

    n_probe = min(int(eval_cfg["probe_train_size"]), len(train_all))
    pick = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(0))[:n_probe]
    probe_train = train_all.subset(pick)
    train_feats = encode_images(model, probe_train.images, progress=progress,
                                desc="encode probe train", probe=which, probe_layers=layers)
    probe = linear_probe(train_feats.get(which), probe_train.labels, test_feats.get(which),
                         test.labels, l2=eval_cfg["probe_l2"])
    pred = (test_feats.embeddings @ classifier.t()).argmax(1)
    per_class = {name: (pred[test.labels == c] == c).float().mean().item()
                 for c, name in enumerate(test.classnames) if (test.labels == c).any()}
    return {"zeroshot_heldout_acc1": zs_held["acc1"], "zeroshot_all_acc1": zs_all["acc1"],
            "linear_probe_acc1": probe["acc1"],
            "zeroshot_all": zs_all, "zeroshot_heldout": zs_held, "linear_probe": probe,
            "zeroshot_per_class_acc1": per_class}


def format_results(results: dict) -> str:
    """A short plain-text table of the headline numbers."""
    held = ", ".join(results.get("heldout_classes", []))
    rows = [("zero-shot top-1, held-out classes (" + held + ")", results["zeroshot_heldout_acc1"]),
            ("zero-shot top-1, all 10 classes", results["zeroshot_all_acc1"]),
            ("linear probe top-1, all 10 classes", results["linear_probe_acc1"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{name:<{width}}  {value:6.1%}" for name, value in rows]
    lines.append(f"{'wall time':<{width}}  {results['wall_time_s']:.0f} s")
    return "\n".join(lines)
