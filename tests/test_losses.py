"""The contrastive loss against a hand-written reference: values and gradients."""

import numpy as np
import torch
import torch.nn.functional as F

from cliplab.train.losses import clip_loss


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
