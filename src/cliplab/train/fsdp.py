"""FSDP for large towers: each transformer block's weights, gradients and optimizer state are
sharded over the ranks with torch's ``fully_shard`` (FSDP2), gathered only while a block runs.

The trainer calls the towers' methods rather than one ``forward``, so only the blocks are
sharded: embeddings, projections, norms and the temperature stay replicated (a small part of a
large model) and get their gradients averaged by the trainer's all-reduce. Checkpoints gather
the full weights and optimizer state, so they are plain HF folders whatever the world size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from cliplab.models.dual_encoder import DualEncoder
from cliplab.train import distributed

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_blocks(model: DualEncoder) -> int:
    """Shard every transformer block of both towers over the ranks; returns how many."""
    blocks = model.tower_layers("image") + model.tower_layers("text")
    mesh = distributed.sharding_mesh(model.device)
    for block in blocks:
        # Each block is its own FSDP root, and a root left to itself keeps its weights
        # gathered after its forward until its backward, which a frozen block never gets: a
        # locked tower's blocks stayed whole (its cached features' forward, evaluations), and
        # plain tensors where a resume loads shards. Said explicitly, every block reshards.
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    return len(blocks)


def is_sharded(param: torch.Tensor) -> bool:
    return isinstance(param, DTensor)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over sharded and replicated parameters: the global
    L2 norm counts each shard once and each replicated gradient once."""
    device = params[0].device  # collectives run where the gradients are (nccl: on the GPU)
    sharded, replicated = torch.zeros((), device=device), torch.zeros((), device=device)
    for p in params:
        if p.grad is None:
            continue
        if is_sharded(p.grad):
            sharded = sharded + p.grad.to_local().float().pow(2).sum()
        else:
            replicated = replicated + p.grad.float().pow(2).sum()
    sharded = distributed.mean_over_ranks(sharded) * distributed.world_size()
    norm = (sharded + replicated).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)
    return norm


def full_model_state(model: DualEncoder) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (a collective: every rank calls it)."""
    return get_model_state_dict(model.model, options=_FULL)


@contextlib.contextmanager
def full_state_dicts(model: DualEncoder) -> Iterator[None]:
    """Inside the block ``model.model.state_dict()`` holds each sharded weight whole (a plain
    tensor, not a DTensor), e.g. for the evaluation caches' fingerprints of the towers' weights,
    which read every byte of them. Each such ``state_dict()`` is then a collective (one
    all-gather per sharded weight, in the same key order on every rank): every rank must call
    it alike, as every rank runs the evaluation of a sharded model."""

    @torch.no_grad()
    def gather(module, state: dict, prefix: str, local_metadata) -> None:
        for key, value in state.items():
            if isinstance(value, DTensor):
                state[key] = value.full_tensor()

    handle = model.model.register_state_dict_post_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def full_optimizer_state(model: DualEncoder, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name (a collective)."""
    return get_optimizer_state_dict(model.model, optimizer, options=_FULL)


def load_full_state(model: DualEncoder, weights: dict, optimizer: torch.optim.Optimizer,
                    optimizer_state: dict) -> None:
    """Put full weights and optimizer state back onto the shards (every rank calls it)."""
    set_model_state_dict(model.model, weights, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model.model, optimizer,
                             _keyed_by_name(model, optimizer, optimizer_state),
                             options=StateDictOptions(full_state_dict=True))


def _keyed_by_name(model: DualEncoder, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """An optimizer state as one process saves it (parameters by position: a run with ``fsdp:
    true`` and one rank shards nothing) keyed by parameter name, as `full_optimizer_state`
    writes it and ``set_optimizer_state_dict`` reads it; one keyed by name as it is."""
    groups = state["param_groups"]
    if all(isinstance(i, str) for group in groups for i in group["params"]):
        return state
    names = {param: name for name, param in model.model.named_parameters()}
    rename = {i: names[param] for saved, now in zip(groups, optimizer.param_groups)
              for i, param in zip(saved["params"], now["params"])}
    return {"state": {rename[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [rename[i] for i in group["params"]]}
                             for group in groups]}
