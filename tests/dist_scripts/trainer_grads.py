"""Run under ``torchrun --nproc-per-node N``: one Trainer step per scenario; each rank saves the
gradients it would apply (after averaging) and its logged loss to ``OUT/rank{R}.pt``.
Without torchrun it runs the same scenarios in one process (the reference)."""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch.distributed.tensor import DTensor

from cliplab.data.shapes import load_shapes
from cliplab.models import build_model
from cliplab.models.fingerprints import image_tower_fingerprint, text_tower_fingerprint
from cliplab.train import distributed, fsdp
from cliplab.train.trainer import TrainConfig, Trainer

# name -> (preset, train options); every one a batch of 16 split over the ranks
SCENARIOS = {
    "clip": ("tiny-clip", {}),
    "clip-keys-tiled": ("tiny-clip", {"loss_tile": 3}),
    "clip-gradcache": ("tiny-clip", {"micro_batch_size": 3}),
    "siglip": ("tiny-siglip", {"loss": "siglip"}),
    "siglip-tiled-gradcache": ("tiny-siglip", {"loss": "siglip", "loss_tile": 5,
                                                "micro_batch_size": 4}),
    "clip-fsdp": ("tiny-clip", {"fsdp": True, "grad_clip": 0.5}),
    "siglip-fsdp-gradcache": ("tiny-siglip", {"loss": "siglip", "fsdp": True,
                                              "micro_batch_size": 5}),
    # the locked tower's features are cached by a forward through its sharded blocks
    "clip-fsdp-locked-image": ("tiny-clip", {"fsdp": True, "lock_image": True}),
    # each rank builds its model with its own seed: rank 0's weights are the ones trained
    "clip-fsdp-seeded-by-rank": ("tiny-clip", {"fsdp": True, "seed_by_rank": True}),
}


def full(grad: torch.Tensor) -> torch.Tensor:
    """A gradient as one plain tensor (FSDP shards are gathered: every rank calls this)."""
    return grad.full_tensor() if isinstance(grad, DTensor) else grad.clone()


def one_step(preset: str, options: dict) -> dict:
    """Gradients after one step's backward and averaging, and the step's (global) loss."""
    options = dict(options)
    seed = distributed.rank() if options.pop("seed_by_rank", False) else 0
    torch.manual_seed(seed)
    model = build_model(preset, image_size=16, patch_size=8, width=32, layers=2, heads=2,
                        context_length=48, seed=seed)
    pairs = load_shapes(n=48, seed=0, kinds=("single",), image_size=32)
    cfg = TrainConfig.from_dict({**dict(steps=1, batch_size=16, lr=1e-3, warmup=1, grad_clip=0,
                                        log_every=1, progress=False, augment=False), **options})
    trainer = Trainer(model, cfg)
    grads: dict = {}
    sharded: set = set()
    step = torch.optim.AdamW.step

    def capture(opt, *a, **kw):  # the gradients the optimizer is about to apply (after clipping)
        grads.update({k: full(p.grad) for k, p in model.model.named_parameters()
                      if p.grad is not None})
        # which towers' blocks FSDP holds sharded while training (a gathered block is plain)
        sharded.update(tower for tower in ("image", "text") for block in model.tower_layers(tower)
                       for p in block.parameters() if isinstance(p, DTensor))
        return step(opt, *a, **kw)

    torch.optim.AdamW.step = capture
    try:
        last = trainer.fit(pairs)
    finally:
        torch.optim.AdamW.step = step
    # how many weights a full-state gather gives this rank (only rank 0 receives them: the
    # others would hold a whole model for nothing)
    gathered = len(fsdp.full_model_state(model)) if options.get("fsdp") else None
    # the eval caches key features on the towers' weights: sharded, each rank must read them
    # whole (as one process does), or ranks would key their caches on their own shards
    whole = fsdp.full_state_dicts(model) if sharded else contextlib.nullcontext()
    with whole:
        towers = (image_tower_fingerprint(model), text_tower_fingerprint(model))
    return {"grads": grads, "loss": last["loss"], "sharded": sharded, "gathered": gathered,
            "towers": towers}


def main(out: str) -> None:
    torch.set_num_threads(1)
    info = distributed.init_distributed(backend="gloo", timeout_s=120)
    results = {name: one_step(*spec) for name, spec in SCENARIOS.items()}
    torch.save(results, os.path.join(out, f"rank{info.rank}.pt"))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
