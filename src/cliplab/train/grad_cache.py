"""Contrastive gradient accumulation that gives the large-batch update (GradCache, Gao et al.
2021): embed the batch in chunks without a graph, compute the loss over the whole batch, then
re-embed each chunk with a graph and back-propagate the cached feature gradients into it.

Peak activation memory is one chunk's; the loss still sees every negative of the batch. Dropout
and other random ops replay the same random numbers in both passes (the RNG state of each chunk
is saved in the first pass and restored in the second)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cliplab.train.mps_rng import mps_rng_state, set_mps_rng_state

Embed = Callable[[slice], tuple[torch.Tensor, torch.Tensor]]


def _rng_state() -> tuple:
    """The generators dropout may draw from: the CPU's, every GPU's, Apple's MPS."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, mps_rng_state()


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
    set_mps_rng_state(state[2])


def grad_cache_backward(embed: Embed, n: int, chunk: int,
                        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                        ) -> torch.Tensor:
    """Back-propagate ``loss_fn(image_emb, text_emb)`` of ``n`` pairs through ``embed(rows)``
    run ``chunk`` rows at a time; returns the (detached) loss. Gradients accumulate into the
    parameters exactly as one ``loss.backward()`` over the whole batch would put them."""
    chunks = [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    states, images, texts = [], [], []
    with torch.no_grad():
        for rows in chunks:
            states.append(_rng_state())
            img, txt = embed(rows)
            images.append(img)
            texts.append(txt)
    after = _rng_state()
    image_emb = torch.cat(images).detach().requires_grad_(True)
    text_emb = torch.cat(texts).detach().requires_grad_(True)
    loss = loss_fn(image_emb, text_emb)
    loss.backward()
    for rows, state in zip(chunks, states):
        _set_rng_state(state)
        img, txt = embed(rows)
        outputs, grads = [], []
        for out, cached in ((img, image_emb), (txt, text_emb)):
            if out.requires_grad:
                outputs.append(out)
                grads.append(cached.grad[rows].to(out.dtype))
        if outputs:
            torch.autograd.backward(outputs, grads)
    _set_rng_state(after)  # leave the RNG where a single pass would have left it
    return loss.detach()
