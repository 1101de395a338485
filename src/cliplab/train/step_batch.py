"""`StepBatch`: what every input (in-memory, replayed, streamed) hands the objective each step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# captions for a step: the tokenizer's {"input_ids", "attention_mask"} of a table of captions,
# or a locked text tower's pooled features of them [n, D]
TextSource = dict[str, torch.Tensor] | torch.Tensor


@dataclass
class StepBatch:
    """This rank's share of one training step.

    ``images`` are model inputs ``[b, C, H, W]`` or a locked image tower's cached features
    ``[b, D]``. Image-text pairs carry ``captions`` (one row of ``texts`` per image) and
    ``keys`` (``[b]``: pairs sharing a key are positives of each other; or ``[b, 1 + L]``: the
    pair's caption id, then the ids of the captions describing its image, -1 padded, so a text
    is a positive of every image it describes), and with
    ``train.hard_negatives`` ``negatives`` (per image, the row of ``texts`` holding a hard
    negative of its caption, -1 for none); labelled images carry ``labels``.
    """

    images: torch.Tensor
    texts: TextSource | None = None
    captions: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    negatives: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)
