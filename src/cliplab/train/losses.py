"""Contrastive losses over a batch of image and text embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_mask(image_keys: torch.Tensor, text_keys: torch.Tensor) -> torch.Tensor:
    """``mask[i, j]`` is True when text ``j`` describes image ``i``.

    Keys come in two forms (see `~cliplab.train.step_batch.StepBatch`): one integer per pair
    (``[n]``; pairs with equal keys are positives of each other), or a row per pair
    (``[n, 1 + L]``: the id of the pair's caption, then the ids of every caption describing its
    image, padded with -1), where text ``j`` describes image ``i`` when its caption is among
    image ``i``'s. The second form says what one key per pair cannot: a caption two images
    share ("a green circle", drawn for a small and a large one) is true of both, while their
    other captions ("a small green circle") are true of one.
    """
    if image_keys.dim() == 1:
        return image_keys[:, None] == text_keys[None, :]
    # membership by binary search in each image's sorted captions: a broadcast comparison would
    # build an [images, texts, L] intermediate, L being the largest image's caption count
    captions = image_keys[:, 1:].sort(dim=1).values
    drawn = text_keys[:, 0].expand(len(captions), -1).contiguous()
    at = torch.searchsorted(captions, drawn).clamp(max=captions.shape[1] - 1)
    return captions.gather(1, at) == drawn


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target spread evenly over each row's positives."""
    targets = positives.to(logits.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) loss of L2-normalised features ``[B, D]``.

    ``logit_scale`` is the log temperature (the HF parameter); logits are
    ``exp(logit_scale) * image @ text.T``. Without ``keys`` pair ``i`` is the only positive of
    row/column ``i``. With ``keys`` (one integer per pair, e.g. the class of a labelled image or
    the id of its caption) every pair sharing a key is a positive, so duplicate captions in a
    batch are not pushed apart as false negatives; the target is then uniform over positives.
    """
    logits = logit_scale.exp() * image_features @ text_features.t()
    if keys is None:
        labels = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    pos = positive_mask(keys, keys)
    return 0.5 * (soft_cross_entropy(logits, pos) + soft_cross_entropy(logits.t(), pos.t()))


def clip_loss_hard_negatives(image_features: torch.Tensor, text_features: torch.Tensor,
                             negative_features: torch.Tensor, has_negative: torch.Tensor,
                             logit_scale: torch.Tensor, keys: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """NegCLIP's loss: :func:`clip_loss` whose image-to-text side also scores each image
    ``i`` against its own hard-negative caption ``negative_features[i]`` (L2-normalised
    ``[B, D]``; rows where ``has_negative`` is False have none). The negative is an extra
    column of that image's softmax only: a negative made for one image may be true of another
    image in the batch, so it never competes there. The text-to-image side is unchanged; with no
    negatives at all it is `clip_loss`."""
    s = logit_scale.exp()
    logits = s * image_features @ text_features.t()
    negative = s * (image_features * negative_features).sum(-1)
    negative = negative.masked_fill(~has_negative, float("-inf"))
    logits_image = torch.cat([logits, negative[:, None]], dim=1)
    if keys is None:
        pos = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    else:
        pos = positive_mask(keys, keys)
    pos_image = torch.cat([pos, pos.new_zeros(len(pos), 1)], dim=1)
    targets = pos_image.to(logits.dtype) / pos_image.sum(dim=1, keepdim=True)
    # 0 * -inf would be nan: the target of a missing negative is 0, so drop its term
    log_p = F.log_softmax(logits_image, dim=1).masked_fill(~torch.isfinite(logits_image), 0.0)
    i2t = -(targets * log_p).sum(dim=1).mean()
    return 0.5 * (i2t + soft_cross_entropy(logits.t(), pos.t()))


def key_pair_dot(a: torch.Tensor, a_keys: torch.Tensor, b: torch.Tensor, b_keys: torch.Tensor,
                 per_key_mean: bool = False) -> tuple[torch.Tensor, int]:
    """``sum of <a_i, b_j> over the pairs with a_keys[i] == b_keys[j]``, in O((n + m) D).

    With ``per_key_mean`` each pair counts ``1 / #{j: b_keys[j] == key}`` (the soft InfoNCE
    target spreads a row's weight over its positives). Also returns the number of such pairs
    (SigLIP's bias term). The sums per key replace the B x B positive mask the plain losses use.
    """
    uniq, inverse = torch.unique(torch.cat([a_keys, b_keys]), return_inverse=True)
    ia, ib = inverse[:len(a_keys)], inverse[len(a_keys):]
    sum_a = a.new_zeros(len(uniq), a.shape[1]).index_add(0, ia, a)
    sum_b = b.new_zeros(len(uniq), b.shape[1]).index_add(0, ib, b)
    count_a = torch.bincount(ia, minlength=len(uniq))
    count_b = torch.bincount(ib, minlength=len(uniq))
    dots = (sum_a * sum_b).sum(dim=1)
    if per_key_mean:
        dots = dots / count_b.clamp(min=1).to(dots.dtype)
    return dots.sum(), int((count_a * count_b).sum())


def positive_pair_dot(image: torch.Tensor, image_keys: torch.Tensor, text: torch.Tensor,
                      text_keys: torch.Tensor, mean_over: str | None = None
                      ) -> tuple[torch.Tensor, int]:
    """``sum of <image_i, text_j>`` over the positive pairs (:func:`positive_mask`), without
    the mask, and the number of such pairs. ``mean_over="image"`` weighs each pair by ``1 /``
    its image's number of positive texts, ``"text"`` by ``1 /`` its text's number of positive
    images (the soft InfoNCE targets of the two directions)."""
    if image_keys.dim() == 1:  # one key per pair: symmetric, sums per key
        if mean_over == "text":
            return key_pair_dot(text, text_keys, image, image_keys, per_key_mean=True)
        return key_pair_dot(image, image_keys, text, text_keys, per_key_mean=mean_over == "image")
    # caption sets: per caption id, the texts drawing it and the images it describes
    sets, drawn = image_keys[:, 1:], text_keys[:, 0]
    ids, inverse = torch.unique(torch.cat([sets.flatten(), drawn]), return_inverse=True)
    set_ids, text_ids = inverse[:sets.numel()].view_as(sets), inverse[sets.numel():]
    valid = sets >= 0
    rows = torch.arange(len(sets), device=sets.device)[:, None].expand_as(sets)[valid]
    set_ids = set_ids[valid]
    sum_text = text.new_zeros(len(ids), text.shape[1]).index_add(0, text_ids, text)
    count_text = torch.bincount(text_ids, minlength=len(ids))
    count_image = torch.bincount(set_ids, minlength=len(ids))
    pairs = int((count_text * count_image).sum())
    if mean_over == "text":
        sum_image = image.new_zeros(len(ids), image.shape[1]).index_add(0, set_ids, image[rows])
        dots = (sum_image * sum_text).sum(dim=1) / count_image.clamp(min=1).to(image.dtype)
        return dots.sum(), pairs
    # per image, the sum of the texts its captions drew
    described = image.new_zeros(image.shape).index_add(0, rows, sum_text[set_ids])
    dots = (image * described).sum(dim=1)
    if mean_over == "image":
        positives = torch.zeros(len(image), dtype=torch.long, device=image.device).index_add(
            0, rows, count_text[set_ids])
        dots = dots / positives.clamp(min=1).to(dots.dtype)
    return dots.sum(), pairs


def _row_labels(n: int, offset: int, device: torch.device) -> torch.Tensor:
    return torch.arange(offset, offset + n, device=device)


def check_keys_given_together(keys: torch.Tensor | None, keys_all: torch.Tensor | None
                              ) -> None:
    """A ValueError unless a global loss gets both key tensors or neither."""
    if (keys is None) != (keys_all is None):
        raise ValueError("keys and keys_all go together: this rank's keys and the gathered "
                         "batch's (or neither, for pairs that are each other's only positive)")


def clip_loss_global(image: torch.Tensor, text: torch.Tensor, image_all: torch.Tensor,
                     text_all: torch.Tensor, logit_scale: torch.Tensor, offset: int,
                     world_size: int, keys: torch.Tensor | None = None,
                     keys_all: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of the global-batch InfoNCE loss.

    ``image``/``text`` ``[b, D]`` are this rank's rows, ``image_all``/``text_all`` ``[G, D]`` the
    gathered global batch (this rank's rows at ``offset``), ``keys``/``keys_all`` their keys.
    Local images are scored against all texts and local texts against all images (2 b G logits
    instead of G^2). The share is divided by ``G / world_size`` (not ``b``), so the mean over
    ranks is :func:`clip_loss` of the global batch even when local batches differ in size, and
    with the gather's backward and DDP's averaging the gradients match too.
    """
    check_keys_given_together(keys, keys_all)
    s = logit_scale.exp()
    logits_image = s * image @ text_all.t()
    logits_text = s * text @ image_all.t()
    if keys is None:
        labels = _row_labels(len(image), offset, image.device)
        loss = F.cross_entropy(logits_image, labels, reduction="sum") + \
            F.cross_entropy(logits_text, labels, reduction="sum")
    else:
        loss = len(image) * (soft_cross_entropy(logits_image, positive_mask(keys, keys_all)) +
                             # contiguous: a transposed mask sums rows in another order
                             soft_cross_entropy(logits_text,
                                                positive_mask(keys_all, keys).t().contiguous()))
    return 0.5 * loss * world_size / len(text_all)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                keys: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid loss of SigLIP (Zhai et al. 2023) over L2-normalised features ``[B, D]``.

    Every pair is a binary problem: ``z = exp(logit_scale) * <image_i, text_j> + logit_bias``,
    label +1 for positives (pair ``i == j``, or equal ``keys``) and -1 otherwise; the loss is
    ``-sum(log sigmoid(label * z)) / B`` over the B x B pairs, as in the paper and big_vision.
    """
    return siglip_loss_global(image_features, text_features, logit_scale, logit_bias, 0, 1,
                              keys, keys)


def siglip_loss_global(image: torch.Tensor, text_all: torch.Tensor, logit_scale: torch.Tensor,
                       logit_bias: torch.Tensor, offset: int, world_size: int,
                       keys: torch.Tensor | None = None,
                       keys_all: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of the global-batch sigmoid loss: its ``b`` images against all ``G``
    texts, divided by ``G / world_size``; the mean over ranks is :func:`siglip_loss` of the
    global batch."""
    check_keys_given_together(keys, keys_all)
    logits = logit_scale.exp() * image @ text_all.t() + logit_bias
    if keys is None:
        cols = torch.arange(len(text_all), device=image.device)
        pos = _row_labels(len(image), offset, image.device)[:, None] == cols[None, :]
    else:
        pos = positive_mask(keys, keys_all)
    labels = 2 * pos.to(logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() * world_size / len(text_all)
