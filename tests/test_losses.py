"""The contrastive losses against hand-written references: values and gradients; SigLIP by hand;
global-batch shares; the tiled losses against the plain ones."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliplab.errors import ConfigError
from cliplab.train.contrastive import contrastive_loss
from cliplab.train.losses import (clip_loss, clip_loss_global, key_pair_dot, positive_mask,
                                  positive_pair_dot, siglip_loss, siglip_loss_global)
from cliplab.train.tiled_loss import (_dot, tiled_clip_loss, tiled_clip_loss_global,
                                      tiled_siglip_loss, tiled_siglip_loss_global)


def reference_loss_and_grads(img: np.ndarray, txt: np.ndarray, scale: float, pos: np.ndarray):
    """Symmetric soft-target InfoNCE written out with explicit sums, and its analytic gradient
    with respect to the (already normalised) features."""
    b = len(img)
    logits = scale * img @ txt.T
    targets_r = pos / pos.sum(1, keepdims=True)
    targets_c = pos.T / pos.T.sum(1, keepdims=True)

    def log_softmax(x):
        m = x.max(1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))

    def softmax(x):
        return np.exp(log_softmax(x))

    loss_r = -(targets_r * log_softmax(logits)).sum() / b
    loss_c = -(targets_c * log_softmax(logits.T)).sum() / b
    loss = 0.5 * (loss_r + loss_c)
    # d loss / d logits: rows (softmax - target)/B, columns likewise, averaged.
    g = 0.5 * ((softmax(logits) - targets_r) / b + ((softmax(logits.T) - targets_c) / b).T)
    return loss, scale * g @ txt, scale * g.T @ img


def _features(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def test_infonce_matches_reference_values_and_gradients():
    img, txt = _features(7, 5, 0)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    log_scale = torch.tensor(np.log(10.0), dtype=torch.float64)
    loss = clip_loss(img, txt, log_scale)
    loss.backward()
    ref, g_img, g_txt = reference_loss_and_grads(img.detach().numpy(), txt.detach().numpy(),
                                                 10.0, np.eye(7))
    assert abs(loss.item() - ref) < 1e-10
    np.testing.assert_allclose(img.grad.numpy(), g_img, atol=1e-10)
    np.testing.assert_allclose(txt.grad.numpy(), g_txt, atol=1e-10)


def test_infonce_equals_torch_cross_entropy_formulation():
    img, txt = _features(9, 4, 1)
    logits = 3.0 * img @ txt.T
    labels = torch.arange(9)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(clip_loss(img, txt, torch.tensor(np.log(3.0))), expected)


def test_multi_positive_loss_matches_reference():
    img, txt = _features(6, 4, 2)
    keys = torch.tensor([0, 1, 0, 2, 1, 0])
    img.requires_grad_(True)
    loss = clip_loss(img, txt, torch.tensor(0.0, dtype=torch.float64), keys)
    loss.backward()
    pos = (keys[:, None] == keys[None, :]).numpy().astype(float)
    ref, g_img, _ = reference_loss_and_grads(img.detach().numpy(), txt.numpy(), 1.0, pos)
    assert abs(loss.item() - ref) < 1e-10
    np.testing.assert_allclose(img.grad.numpy(), g_img, atol=1e-10)


def _set_keys(b: int, seed: int, vocab: int | None = None, width: int = 3) -> torch.Tensor:
    """Random key rows ``[b, 1 + width]``: a drawn caption, then its image's 1..width captions
    (from a small vocabulary, so images share some captions but not all), -1 padded."""
    g = torch.Generator().manual_seed(seed)
    vocab = vocab or max(2, b // 2)
    rows = []
    for _ in range(b):
        n = int(torch.randint(1, width + 1, (1,), generator=g))
        caps = torch.randperm(vocab, generator=g)[:n]
        drawn = caps[torch.randint(0, n, (1,), generator=g)]
        rows.append(torch.cat([drawn, caps, torch.full((width - n,), -1)]))
    return torch.stack(rows)


def test_positive_mask_of_caption_sets_by_hand():
    # image 0 is "a green circle" / "a small green circle", image 1 "a green circle" / "a large
    # green circle", image 2 "a red square"; captions 0 green, 1 small, 2 large, 3 red
    keys = torch.tensor([[1, 0, 1], [0, 0, 2], [3, 3, -1]])
    expected = torch.tensor([[True, True, False],    # image 0: its own "small", 1's "green"
                             [False, True, False],   # image 1: not "small"
                             [False, False, True]])
    assert torch.equal(positive_mask(keys, keys), expected)
    # one key per pair is equality, as before
    one = torch.tensor([4, 1, 4])
    assert torch.equal(positive_mask(one, one), one[:, None] == one[None, :])


def test_positive_mask_of_caption_sets_equals_the_membership_of_each_drawn_caption():
    # unsorted rows, -1 padding, repeated ids, more texts than images: text j is a positive of
    # image i exactly when j's drawn caption is among i's captions
    g = torch.Generator().manual_seed(3)
    image_keys = torch.randint(0, 12, (9, 7), generator=g)
    image_keys[:, 1:][torch.rand(9, 6, generator=g) < 0.3] = -1
    text_keys = torch.randint(0, 12, (15, 7), generator=g)
    expected = torch.tensor([[int(t[0]) in set(i[1:].tolist()) for t in text_keys]
                             for i in image_keys])
    assert expected.any() and not expected.all()
    assert torch.equal(positive_mask(image_keys, text_keys), expected)


def test_caption_set_loss_matches_reference_with_an_asymmetric_mask():
    img, txt = _features(8, 4, 12)
    keys = _set_keys(8, 3)
    pos = positive_mask(keys, keys)
    assert not torch.equal(pos, pos.t())  # the case one key per pair cannot express
    img.requires_grad_(True)
    txt.requires_grad_(True)
    loss = clip_loss(img, txt, torch.tensor(0.5, dtype=torch.float64), keys)
    loss.backward()
    ref, g_img, g_txt = reference_loss_and_grads(img.detach().numpy(), txt.detach().numpy(),
                                                 math.exp(0.5), pos.numpy().astype(float))
    assert abs(loss.item() - ref) < 1e-10
    np.testing.assert_allclose(img.grad.numpy(), g_img, atol=1e-10)
    np.testing.assert_allclose(txt.grad.numpy(), g_txt, atol=1e-10)


@pytest.mark.parametrize("sets", [False, True])
@pytest.mark.parametrize("mean_over", [None, "image", "text"])
def test_positive_pair_dot_matches_mask_sum(sets, mean_over):
    g = torch.Generator().manual_seed(1)
    image, text = (torch.randn(10, 3, generator=g, dtype=torch.float64) for _ in range(2))
    image_keys = _set_keys(10, 5) if sets else torch.randint(0, 4, (10,), generator=g)
    text_keys = torch.cat([image_keys[3:], image_keys[:3]])  # other rows: not symmetric
    mask = positive_mask(image_keys, text_keys).double()
    weights = mask
    if mean_over == "image":
        weights = mask / mask.sum(1, keepdim=True).clamp(min=1)
    elif mean_over == "text":
        weights = mask / mask.sum(0, keepdim=True).clamp(min=1)
    dot, n = positive_pair_dot(image, image_keys, text, text_keys, mean_over)
    assert torch.allclose(dot, (weights * (image @ text.T)).sum()) and n == int(mask.sum())


def test_unique_keys_reduce_to_plain_infonce():
    img, txt = _features(5, 3, 3)
    scale = torch.tensor(1.5, dtype=torch.float64)
    assert torch.allclose(clip_loss(img, txt, scale, torch.arange(5)), clip_loss(img, txt, scale))


def test_temperature_gradient_matches_finite_difference():
    img, txt = _features(8, 6, 4)
    s = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    clip_loss(img, txt, s).backward()
    eps = 1e-6
    fd = (clip_loss(img, txt, s.detach() + eps) - clip_loss(img, txt, s.detach() - eps)) / (2 * eps)
    assert abs(s.grad.item() - fd.item()) < 1e-7


def test_loss_is_minimal_for_aligned_pairs():
    img, _ = _features(6, 6, 5)
    scale = torch.tensor(np.log(50.0), dtype=torch.float64)
    aligned = clip_loss(img, img, scale)
    shuffled = clip_loss(img, img[torch.randperm(6, generator=torch.Generator().manual_seed(0))], scale)
    assert aligned < shuffled


# --- SigLIP ---------------------------------------------------------------------------------

def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_siglip_loss_hand_computed_2x2():
    # images (1,0), (0,1); texts (0.6,0.8), (0.8,-0.6); scale 2, bias -1:
    # dots [[0.6, 0.8], [0.8, -0.6]] -> z = 2 dot - 1 = [[0.2, 0.6], [0.6, -2.2]].
    # Diagonal pairs are positives: -log sigmoid(z) = softplus(-z); the others softplus(z).
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[0.6, 0.8], [0.8, -0.6]], dtype=torch.float64)
    scale = torch.tensor(math.log(2.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    loss = siglip_loss(img, txt, scale, bias)
    expected = (_softplus(-0.2) + _softplus(0.6) + _softplus(0.6) + _softplus(2.2)) / 2
    assert abs(loss.item() - expected) < 1e-12
    loss.backward()
    # d/d bias: positives -sigmoid(-z), negatives sigmoid(z); / B.
    d_bias = (-_sigmoid(-0.2) + _sigmoid(0.6) + _sigmoid(0.6) - _sigmoid(2.2)) / 2
    assert abs(bias.grad.item() - d_bias) < 1e-12
    # d/d log_scale = sum of dz/dlog_scale (= 2 dot) times the same weights.
    d_scale = (-_sigmoid(-0.2) * 1.2 + _sigmoid(0.6) * 1.6 + _sigmoid(0.6) * 1.6
               - _sigmoid(2.2) * -1.2) / 2
    assert abs(scale.grad.item() - d_scale) < 1e-12


def test_siglip_keys_make_shared_key_pairs_positive():
    # Two pairs with the same key: all four pairs are positives, so the loss is the mean of
    # softplus(-z) over them; with unique keys it is the plain diagonal loss.
    img, txt = _features(2, 3, 6)
    s, b = torch.tensor(1.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    z = s.exp() * img @ txt.T + b
    assert torch.allclose(siglip_loss(img, txt, s, b, torch.tensor([4, 4])),
                          F.softplus(-z).sum() / 2)
    assert torch.allclose(siglip_loss(img, txt, s, b, torch.tensor([4, 5])),
                          siglip_loss(img, txt, s, b))


def test_siglip_gradients_match_finite_differences():
    img, txt = _features(5, 4, 7)
    args = (img.requires_grad_(), txt.requires_grad_(),
            torch.tensor(0.7, dtype=torch.float64, requires_grad=True),
            torch.tensor(-1.5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(siglip_loss, args)


def test_key_pair_dot_matches_mask_sum():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g,
                                                                          dtype=torch.float64)
    ka, kb = torch.tensor([0, 1, 1, 7, 3, 0]), torch.tensor([1, 0, 0, 0, 9, 1, 3, 3, 2])
    mask = (ka[:, None] == kb[None, :]).double()
    dot, n = key_pair_dot(a, ka, b, kb)
    assert torch.allclose(dot, (mask * (a @ b.T)).sum()) and n == int(mask.sum())
    # per_key_mean: each pair weighs 1 / #{j : kb[j] == ka[i]}
    count = torch.tensor([float((kb == k).sum()) for k in ka], dtype=torch.float64)
    weights = mask / count.clamp(min=1)[:, None]
    dot_mean, _ = key_pair_dot(a, ka, b, kb, per_key_mean=True)
    assert torch.allclose(dot_mean, (weights * (a @ b.T)).sum())


# --- global-batch shares: ranks simulated in one process -------------------------------------

def _split_losses(kind, img, txt, scale, bias, keys, sizes, tile=None):
    """Mean over simulated ranks of each rank's share, each seeing the whole batch as 'all'."""
    total, start = 0.0, 0
    for n in sizes:
        rows = slice(start, start + n)
        k, k_all = (None, None) if keys is None else (keys[rows], keys)
        if kind == "clip":
            fn = clip_loss_global if tile is None else \
                lambda *a: tiled_clip_loss_global(*a, tile=tile)
            total = total + fn(img[rows], txt[rows], img, txt, scale, start, len(sizes), k, k_all)
        else:
            fn = siglip_loss_global if tile is None else \
                lambda *a: tiled_siglip_loss_global(*a, tile=tile)
            total = total + fn(img[rows], txt, scale, bias, start, len(sizes), k, k_all)
        start += n
    return total / len(sizes)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("with_keys", [None, "one", "sets"])
# tile 6: larger than every rank's share (4, 3, 5), smaller than the global batch (12), as the
# default tile against a few hundred images per rank
@pytest.mark.parametrize("tile", [None, 3, 6])
def test_rank_shares_average_to_the_global_loss_and_gradients(kind, with_keys, tile):
    img, txt = _features(12, 5, 8)
    keys = {None: None, "one": torch.tensor([0, 1, 2, 0, 3, 1, 4, 5, 0, 6, 7, 2]),
            "sets": _set_keys(12, 8)}[with_keys]
    leaves = [img.requires_grad_(), txt.requires_grad_(),
              torch.tensor(1.1, dtype=torch.float64, requires_grad=True),
              torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)]
    full = (clip_loss(img, txt, leaves[2], keys) if kind == "clip"
            else siglip_loss(img, txt, leaves[2], leaves[3], keys))
    g_full = torch.autograd.grad(full, leaves, allow_unused=True)
    # three "ranks" of unequal size; DDP averages the gradients of their losses
    shares = _split_losses(kind, img, txt, leaves[2], leaves[3], keys, [4, 3, 5], tile)
    g_shares = torch.autograd.grad(shares, leaves, allow_unused=True)
    assert torch.allclose(shares, full, atol=1e-12)
    for a, b in zip(g_full, g_shares):
        if a is None:
            assert b is None or torch.all(b == 0)
        else:
            assert torch.allclose(a, b, atol=1e-12)


# --- tiled exact losses ---------------------------------------------------------------------

def _plain_and_tiled(kind, b, d, keys, tile, seed=0, dtype=torch.float32, scale=2.3,
                     lock_text=False, lock_image=False):
    out = []
    for tiled in (False, True):
        img, txt = _features(b, d, seed)
        img = img.to(dtype).requires_grad_(not lock_image)
        txt = txt.to(dtype).requires_grad_(not lock_text)
        s = torch.tensor(scale, dtype=dtype, requires_grad=True)
        bias = torch.tensor(-4.0, dtype=dtype, requires_grad=True)
        loss = contrastive_loss(img, txt, s, bias if kind == "siglip" else None, kind=kind,
                                keys=keys, tile=tile if tiled else None)
        loss.backward()
        out.append([loss.detach(), img.grad, txt.grad, s.grad, bias.grad])
    return out


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("with_keys", [None, "one", "sets"])
@pytest.mark.parametrize("b,tile", [(1, 4), (16, 4), (33, 8), (50, 64), (97, 16)])
def test_tiled_loss_equals_plain_loss_and_gradients(kind, with_keys, b, tile):
    keys = None
    if with_keys == "one":
        keys = torch.randint(0, max(1, b // 3), (b,), generator=torch.Generator().manual_seed(b))
    elif with_keys == "sets":
        keys = _set_keys(b, b)
    plain, tiled = _plain_and_tiled(kind, b, 32, keys, tile)
    for name, p, t in zip(["loss", "d_image", "d_text", "d_logit_scale", "d_bias"], plain, tiled):
        if p is None:
            assert t is None, name
            continue
        torch.testing.assert_close(t, p, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("lock_image", [False, True])  # both frozen: only the scale learns
def test_tiled_loss_with_frozen_sides(kind, lock_image):
    plain, tiled = _plain_and_tiled(kind, 20, 8, None, 6, lock_text=True, lock_image=lock_image)
    assert tiled[2] is None and plain[2] is None
    assert (tiled[1] is None) == (plain[1] is None) == lock_image
    assert plain[3] is not None
    for p, t in zip(plain[:2] + plain[3:], tiled[:2] + tiled[3:]):
        if p is not None:
            torch.testing.assert_close(t, p, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tiled_loss_accumulating_in_float32_as_on_mps_equals_the_plain_loss(kind, monkeypatch):
    """Apple's MPS has no float64: there the tiled sums accumulate in float32, and must stay
    as exact at a modest batch."""
    import cliplab.train.tiled_loss as tiled_loss

    assert tiled_loss._wide(torch.device("mps")) == torch.float32
    assert tiled_loss._wide(torch.device("cpu")) == torch.float64
    monkeypatch.setattr(tiled_loss, "_wide", lambda device: torch.float32)
    plain, tiled = _plain_and_tiled(kind, 97, 32, None, 16)
    for name, p, t in zip(["loss", "d_image", "d_text", "d_logit_scale", "d_bias"], plain, tiled):
        if p is not None:
            torch.testing.assert_close(t, p, atol=1e-5, rtol=1e-5, msg=name)


def test_tiled_dot_sums_in_float64():
    # float32 loses the 1 beside 1e8 (its spacing there is 8); float64 keeps it
    x = torch.tensor([[1e8], [1.0], [-1e8]])
    assert _dot(x, torch.ones_like(x), tile=3).item() == 1.0


def test_tiled_clip_is_stable_at_extreme_logits():
    # scale 100; one image aligned with every text (logits +100), one opposite (-100): a single
    # shift per block would underflow the second row; per-row/column maxima keep it exact.
    img = torch.zeros(6, 4)
    img[:, 0] = 1.0
    img[3] = torch.tensor([-1.0, 0, 0, 0])
    txt = F.normalize(torch.rand(6, 4, generator=torch.Generator().manual_seed(1)) +
                      torch.tensor([3.0, 0, 0, 0]), dim=-1)
    for t in (img, txt):
        t.requires_grad_()
    s = torch.tensor(math.log(100.0), requires_grad=True)
    plain = clip_loss(img, txt, s)
    g_plain = torch.autograd.grad(plain, [img, txt, s])
    tiled = tiled_clip_loss(img, txt, s, tile=2)
    g_tiled = torch.autograd.grad(tiled, [img, txt, s])
    assert torch.isfinite(tiled) and abs(tiled.item() - plain.item()) < 1e-4 * abs(plain.item())
    for p, t in zip(g_plain, g_tiled):
        torch.testing.assert_close(t, p, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fn", ["clip", "clip_keys", "clip_sets", "siglip", "siglip_keys",
                                "siglip_sets"])
def test_tiled_backward_matches_finite_differences(fn):
    img, txt = _features(7, 3, 9)
    keys = _set_keys(7, 9) if fn.endswith("sets") else torch.tensor([0, 1, 0, 2, 1, 3, 0])
    s = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    k = keys if fn.endswith(("keys", "sets")) else None
    if fn.startswith("clip"):
        def f(i, t, s):
            return tiled_clip_loss(i, t, s, k, tile=3)
        args = (img.requires_grad_(), txt.requires_grad_(), s)
    else:
        def f(i, t, s, b):
            return tiled_siglip_loss(i, t, s, b, k, tile=3)
        args = (img.requires_grad_(), txt.requires_grad_(), s, b)
    assert torch.autograd.gradcheck(f, args)


def test_tiled_loss_never_holds_the_full_logit_matrix():
    # Every allocation during forward + backward stays far below one B x B fp32 matrix.
    from torch.profiler import ProfilerActivity, profile

    b, d, tile = 512, 16, 128
    img, txt = (t.float().requires_grad_() for t in _features(b, d, 10))
    s = torch.tensor(2.0, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tiled_clip_loss(img, txt, s, tile=tile).backward()
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest < b * b * 4 / 8, biggest
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        clip_loss(img, txt, s).backward()
    assert max(e.cpu_memory_usage for e in prof.events()) >= b * b * 4  # the check can fail


def test_contrastive_loss_rejects_bad_settings():
    img, txt = _features(4, 3, 11)
    s = torch.tensor(0.0, dtype=torch.float64)
    with pytest.raises(ConfigError, match="loss kind 'infonce' is unknown"):
        contrastive_loss(img, txt, s, kind="infonce")
    with pytest.raises(ConfigError, match="siglip loss needs a logit_bias"):
        contrastive_loss(img, txt, s, kind="siglip")
    with pytest.raises(ConfigError, match="tile must be a positive integer"):
        contrastive_loss(img, txt, s, tile=0)
    with pytest.raises(ValueError, match=r"must both be \[batch, dim\]"):
        contrastive_loss(img, txt[:3], s)


def test_the_global_losses_take_keys_and_the_gathered_keys_together():
    """``keys`` without ``keys_all`` was a TypeError inside positive_mask (and ``keys_all``
    alone was ignored): one says which."""
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    keys, scale, bias = torch.arange(4), torch.tensor(2.0), torch.tensor(-1.0)
    for given in ({"keys": keys}, {"keys_all": keys}):
        with pytest.raises(ValueError, match="^keys and keys_all go together"):
            clip_loss_global(image, text, image, text, scale, 0, 1, **given)
        with pytest.raises(ValueError, match="^keys and keys_all go together"):
            siglip_loss_global(image, text, scale, bias, 0, 1, **given)
        with pytest.raises(ValueError, match="^keys and keys_all go together"):
            tiled_clip_loss_global(image, text, image, text, scale, 0, 1, **given)
        with pytest.raises(ValueError, match="^keys and keys_all go together"):
            tiled_siglip_loss_global(image, text, scale, bias, 0, 1, **given)
    # distinct keys: the same as no keys
    torch.testing.assert_close(clip_loss_global(image, text, image, text, scale, 0, 1, keys, keys),
                               clip_loss_global(image, text, image, text, scale, 0, 1))
