"""Finiteness checks. Every inference path checks the embeddings it returns: a model whose
weights hold NaN or infinite values (a run that diverged) embeds every input as NaN, and NaN
scores are argmax'd to class 0 — a plausible-looking accuracy instead of an error. Training
loops check the weights they update (`all_finite`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cliplab.errors import ModelError


def finite_embeddings(embeddings: torch.Tensor, what: str) -> torch.Tensor:
    """``embeddings`` (``[N, D]``) unchanged, or one `ModelError` saying how many of the
    ``what`` (e.g. ``image``) embeddings are NaN or infinite."""
    bad = ~torch.isfinite(embeddings).all(dim=-1)
    if bool(bad.any()):
        raise ModelError(f"{int(bad.sum())} of {len(embeddings)} {what} embeddings are NaN or "
                         "infinite: the model is broken (weights that are not finite or too "
                         "large, e.g. from a training run that diverged), so nothing it embeds "
                         "can be scored or searched")
    return embeddings


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Whether every value of ``tensors`` is finite, as one bool tensor on the first one's
    device (reading it is the one device sync)."""
    checks = [torch.isfinite(t.detach()).all() for t in tensors]
    if not checks:
        return torch.tensor(True)
    return torch.stack([c.to(checks[0].device) for c in checks]).all()
