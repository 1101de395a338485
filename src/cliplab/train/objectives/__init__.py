"""Training objectives, one module each: an objective turns a step's `StepBatch` into this
rank's loss and back-propagates it (whole, in GradCache chunks, or in micro-batches, as its
loss allows). The `Trainer` is given one explicitly; it never guesses it from the data.

- `ContrastiveObjective` (contrastive.py): CLIP or SigLIP loss over the global batch of pairs.
- `ClassificationObjective` (classification.py): cross-entropy of a head on labelled images.
"""

from __future__ import annotations

from typing import Protocol

import torch

from cliplab.train.objectives.classification import ClassificationObjective
from cliplab.train.objectives.contrastive import ContrastiveObjective
from cliplab.train.step_batch import StepBatch

__all__ = ["Objective", "ContrastiveObjective", "ClassificationObjective"]


class Objective(Protocol):
    """What the trainer needs of an objective."""

    # True: trains on labelled images (batches carry ``labels``); False: on image-text pairs
    labelled: bool

    def backward(self, batch: StepBatch) -> torch.Tensor:
        """This rank's loss of ``batch`` (detached), its gradients accumulated into the
        parameters."""
        ...
