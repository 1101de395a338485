"""Exact InfoNCE and SigLIP losses computed tile by tile, with memory linear in the batch.

The B x B logit matrix is never held: the forward sweeps ``tile x tile`` blocks of it, keeping
only per-row / per-column log-sum-exps (InfoNCE) or a running sum (SigLIP), and the backward
recomputes each block to accumulate the feature gradients. The positive (target) terms need no
tiles at all: they are sums of dot products per key or caption
(:func:`~cliplab.train.losses.positive_pair_dot`). Loss and gradients (features, ``logit_scale``,
``logit_bias``) equal the plain losses'.

Work per step, in B x B x D products: InfoNCE 4 (forward 1, backward 3; the plain loss computes
the logits once but back-propagates through both directions), SigLIP 3 (its gradient needs no
global statistic, so it is accumulated in the same sweep as the loss and the backward only scales
it). Peak extra memory: a few ``tile x tile`` blocks plus ``O(B D)``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from cliplab.train.losses import check_keys_given_together, positive_pair_dot

DEFAULT_TILE = 2048


def _blocks(n: int, tile: int) -> list[slice]:
    return [slice(i, min(i + tile, n)) for i in range(0, n, tile)]


def _check_tile(tile: int) -> int:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    return tile


class _Workspace:
    """Reused ``tile x tile`` buffers: every block writes into them (``out=`` / in place), so
    the sweep allocates nothing per block and the allocator cannot pile up freed blocks."""

    def __init__(self, like: torch.Tensor, tile: int, n: int, m: int, count: int):
        size = min(tile, n) * min(tile, m)
        self.buffers = [like.new_empty(size) for _ in range(count)]

    def views(self, rows: slice, cols: slice) -> list[torch.Tensor]:
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        return [buf[:shape[0] * shape[1]].view(shape) for buf in self.buffers]


def _logaddexp_into(acc: torch.Tensor, z: torch.Tensor, work: torch.Tensor, dim: int) -> None:
    """``acc = logaddexp(acc, logsumexp(z, dim))`` with ``work`` as scratch (torch.logsumexp
    is several times slower than these passes on CPU, and allocates)."""
    m = z.amax(dim=dim, keepdim=True)
    sums = torch.sub(z, m, out=work).exp_().sum(dim=dim)
    torch.logaddexp(acc, sums.log_().add_(m.squeeze(dim)), out=acc)


def _exp_shift(lse: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``g * exp(z - lse)`` as ``exp(z - shift)`` with ``shift = lse - log g`` when every
    ``g > 0`` (saves a pass over each block); otherwise ``(lse, g)`` to multiply afterwards."""
    if bool((g > 0).all()):
        return lse - g.log(), None
    return lse, g


def _wide(device: torch.device) -> torch.dtype:
    """The dtype sums accumulate in: float64, but float32 on Apple's MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _dot(x: torch.Tensor, y: torch.Tensor, tile: int) -> torch.Tensor:
    """Sum of ``x * y`` in row blocks, each summed pairwise into float64 (float32 on MPS): no
    temporary of their size, and accurate (BLAS ``sdot`` over B * D terms drifts by ~1e-4 at
    B = 32768)."""
    total = torch.zeros((), dtype=_wide(x.device), device=x.device)
    for rows in _blocks(len(x), tile):
        total += (x[rows] * y[rows]).sum(dtype=total.dtype)
    return total.to(x.dtype)


class _TiledLogSumExp(torch.autograd.Function):
    """Row (and optionally column) log-sum-exps of ``z = exp(log_scale) * a @ b.T``."""

    @staticmethod
    def forward(ctx, a, b, log_scale, tile: int, cols: bool):
        s = log_scale.exp()
        lse_r = a.new_full((len(a),), float("-inf"))
        lse_c = a.new_full((len(b) if cols else 0,), float("-inf"))
        space = _Workspace(a, tile, len(a), len(b), 2)
        for i in _blocks(len(a), tile):
            a_i = a[i] * s
            for j in _blocks(len(b), tile):
                z, work = space.views(i, j)
                torch.mm(a_i, b[j].t(), out=z)
                _logaddexp_into(lse_r[i], z, work, 1)
                if cols:
                    _logaddexp_into(lse_c[j], z, work, 0)
        ctx.save_for_backward(a, b, log_scale, lse_r, lse_c)
        ctx.tile, ctx.cols = tile, cols
        return lse_r, lse_c

    @staticmethod
    @once_differentiable
    def backward(ctx, g_r, g_c):
        a, b, log_scale, lse_r, lse_c = ctx.saved_tensors
        need_a, need_b, need_s = ctx.needs_input_grad[:3]
        s = float(log_scale.exp())
        need_a = need_a or (need_s and not need_b)  # d log_scale comes from da (or db)
        # d loss / d z_ij = g_r[i] softmax_row(z)_ij + g_c[j] softmax_col(z)_ij
        rows = _exp_shift(lse_r, g_r) if g_r is not None else None
        cols = _exp_shift(lse_c, g_c) if ctx.cols and g_c is not None else None
        if rows is None and cols is None:
            return None, None, None, None, None
        da = torch.zeros_like(a) if need_a else None
        db = torch.zeros_like(b) if need_b else None
        space = _Workspace(a, ctx.tile, len(a), len(b), 2)
        for i in _blocks(len(a), ctx.tile):
            a_i = a[i] * s
            for j in _blocks(len(b), ctx.tile):
                z, p = space.views(i, j)
                torch.mm(a_i, b[j].t(), out=z)
                if rows is not None:
                    shift, g = rows
                    torch.sub(z, shift[i, None], out=p).exp_()
                    if g is not None:
                        p.mul_(g[i, None])
                if cols is not None:
                    shift, g = cols
                    q = z.sub_(shift[None, j]).exp_()
                    if g is not None:
                        q.mul_(g[None, j])
                    p = q if rows is None else p.add_(q)
                if da is not None:
                    da[i].addmm_(p, b[j], alpha=s)
                if db is not None:
                    db[j].addmm_(p.t(), a[i], alpha=s)
        # d log_scale = sum_ij p_ij z_ij = sum_i <a_i, da_i> (da already holds the factor s)
        d_log = None
        if need_s:
            d_log = _dot(da, a, ctx.tile) if da is not None else _dot(db, b, ctx.tile)
            d_log = d_log.reshape(log_scale.shape)
        return (da if ctx.needs_input_grad[0] else None), db, d_log, None, None


class _TiledSoftplusSum(torch.autograd.Function):
    """``sum_ij softplus(exp(log_scale) * <a_i, b_j> + bias)``; its gradient (weights
    ``sigmoid(z)``) is accumulated in the same sweep, so backward only scales it."""

    @staticmethod
    def forward(ctx, a, b, log_scale, bias, tile: int):
        need_a, need_b, need_s, need_bias = ctx.needs_input_grad[:4]
        need_a = need_a or (need_s and not need_b)
        grads = need_a or need_b or need_bias
        s = float(log_scale.exp())
        total = torch.zeros((), dtype=_wide(a.device), device=a.device)
        p_sum = torch.zeros((), dtype=total.dtype, device=a.device)
        da = torch.zeros_like(a) if need_a else None
        db = torch.zeros_like(b) if need_b else None
        space = _Workspace(a, tile, len(a), len(b), 2)
        for i in _blocks(len(a), tile):
            a_i = a[i] * s
            for j in _blocks(len(b), tile):
                z, w = space.views(i, j)
                torch.addmm(bias, a_i, b[j].t(), out=z)
                # softplus(z) = max(z, 0) + log1p(exp(-|z|)); sum of max(z, 0) = (sum z + sum|z|)/2
                abs_sum = torch.abs(z, out=w).sum()
                relu_sum = (z.sum() + abs_sum) / 2
                total += (w.neg_().exp_().log1p_().sum() + relu_sum).to(total.dtype)
                if not grads:
                    continue
                p = z.sigmoid_()
                if da is not None:
                    da[i].addmm_(p, b[j], alpha=s)
                if db is not None:
                    db[j].addmm_(p.t(), a[i], alpha=s)
                if need_bias:
                    p_sum += p.sum().to(p_sum.dtype)
        d_log = None
        if need_s:  # sum_ij sigmoid(z_ij) (z_ij - bias) = sum_i <a_i, da_i>
            d_log = _dot(da, a, tile) if da is not None else _dot(db, b, tile)
            d_log = d_log.reshape(log_scale.shape)
        d_bias = p_sum.to(bias.dtype).reshape(bias.shape) if need_bias else None
        ctx.grads = (da if ctx.needs_input_grad[0] else None, db, d_log, d_bias)
        return total.to(a.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        grads = tuple(None if t is None else t * g for t in ctx.grads)
        return (*grads, None)


def tiled_clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                    keys: torch.Tensor | None = None, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """:func:`~cliplab.train.losses.clip_loss` (symmetric InfoNCE, optional multi-positive
    ``keys``) computed in ``tile x tile`` blocks: same value and gradients, O(B D) memory."""
    n, logit_scale = len(image), logit_scale.reshape(())
    lse_r, lse_c = _TiledLogSumExp.apply(image, text, logit_scale, _check_tile(tile), True)
    if keys is None:
        target = (image * text).sum()
    else:
        target, _ = positive_pair_dot(image, keys, text, keys, mean_over="image")
        if keys.dim() == 2:  # key rows: the two directions' targets differ
            t_text, _ = positive_pair_dot(image, keys, text, keys, mean_over="text")
            target = 0.5 * (target + t_text)
    return (0.5 * (lse_r.sum() + lse_c.sum()) - logit_scale.exp() * target) / n


def tiled_clip_loss_global(image: torch.Tensor, text: torch.Tensor, image_all: torch.Tensor,
                           text_all: torch.Tensor, logit_scale: torch.Tensor, offset: int,
                           world_size: int, keys: torch.Tensor | None = None,
                           keys_all: torch.Tensor | None = None,
                           tile: int = DEFAULT_TILE) -> torch.Tensor:
    """:func:`~cliplab.train.losses.clip_loss_global` in tiles: this rank's images against all
    texts and its texts against all images, O(G D) memory."""
    _check_tile(tile)
    check_keys_given_together(keys, keys_all)
    logit_scale = logit_scale.reshape(())
    lse_image, _ = _TiledLogSumExp.apply(image, text_all, logit_scale, tile, False)
    lse_text, _ = _TiledLogSumExp.apply(text, image_all, logit_scale, tile, False)
    if keys is None:
        rows = slice(offset, offset + len(image))
        target = (image * text_all[rows]).sum() + (text * image_all[rows]).sum()
    else:
        t_image, _ = positive_pair_dot(image, keys, text_all, keys_all, mean_over="image")
        t_text, _ = positive_pair_dot(image_all, keys_all, text, keys, mean_over="text")
        target = t_image + t_text
    return 0.5 * (lse_image.sum() + lse_text.sum() - logit_scale.exp() * target) * world_size \
        / len(text_all)


def tiled_siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                      logit_bias: torch.Tensor, keys: torch.Tensor | None = None,
                      tile: int = DEFAULT_TILE) -> torch.Tensor:
    """:func:`~cliplab.train.losses.siglip_loss` in tiles: same value and gradients, O(B D)
    memory."""
    return tiled_siglip_loss_global(image, text, logit_scale, logit_bias, 0, 1, keys, keys, tile)


def tiled_siglip_loss_global(image: torch.Tensor, text_all: torch.Tensor,
                             logit_scale: torch.Tensor, logit_bias: torch.Tensor, offset: int,
                             world_size: int, keys: torch.Tensor | None = None,
                             keys_all: torch.Tensor | None = None,
                             tile: int = DEFAULT_TILE) -> torch.Tensor:
    """:func:`~cliplab.train.losses.siglip_loss_global` in tiles.

    Uses ``-log sigmoid(y z) = softplus(z) - [y = +1] z``: the softplus sum over all pairs is
    tiled, the positives' logits are summed per key.
    """
    check_keys_given_together(keys, keys_all)
    logit_scale = logit_scale.reshape(())
    bias = torch.as_tensor(logit_bias, dtype=image.dtype, device=image.device).reshape(())
    total = _TiledSoftplusSum.apply(image, text_all, logit_scale, bias, _check_tile(tile))
    if keys is None:
        pos_dot, n_pos = (image * text_all[offset:offset + len(image)]).sum(), len(image)
    else:
        pos_dot, n_pos = positive_pair_dot(image, keys, text_all, keys_all)
    return (total - logit_scale.exp() * pos_dot - n_pos * bias) * world_size / len(text_all)
