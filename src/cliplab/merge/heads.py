"""Classifier heads in a soup. Fine-tunes of `cliplab adapt --method finetune` carry a head
(``head.safetensors``) trained with their tower; a model soup averages the whole fine-tuned
model, head included (Wortsman et al. 2022), and scores each candidate with its own averaged
head. The heads ride in the weights as two extra tensors (`HEAD_KEYS`), so every soup — the
streamed uniform sum, the greedy search — averages them with the towers, the same weights."""

from __future__ import annotations

from pathlib import Path

from cliplab.adapt.head import HEAD_FILE, ClassifierHead
from cliplab.errors import warn
from cliplab.merge.methods import methods_with
from cliplab.merge.state import StateDict

__all__ = ["HEAD_FILE", "HEAD_KEYS", "SOUPS", "soup_heads", "split_head", "with_head"]

HEAD_KEYS = ("__head__.weight", "__head__.scale")
SOUPS = methods_with("soup")  # the registered methods that average whole models


def soup_heads(method: str, paths: list[str]) -> list[ClassifierHead] | None:
    """The heads of ``paths`` when a soup merges them: every model has one, of the same classes
    (rows put in the first's order); otherwise None (and a warning when some carry one: only the towers are
    merged, and held-out scores use the zero-shot text head)."""
    with_head = [p for p in paths if (Path(p) / HEAD_FILE).is_file()]
    if not with_head:
        return None
    heads = [ClassifierHead.load(p) for p in with_head] if method in SOUPS else []
    # the same classes in another order (a manifest's order, a folder's sorted one): its rows
    # put in the first head's order
    aligned = [h.in_class_order(heads[0].classnames) for h in heads]
    why = None
    if method not in SOUPS:
        why = f"{method} combines task vectors of the towers only"
    elif len(with_head) < len(paths):
        why = f"only {len(with_head)} of the {len(paths)} models carry one"
    elif any(h is None or h.weight.shape != heads[0].weight.shape for h in aligned):
        why = "they are heads of different classes"
    if why is None:
        return aligned
    warn(f"merge: models carry a classifier head ({HEAD_FILE}, e.g. {with_head[0]}) that is "
         f"not merged ({why}): the merged folder has none, and held-out scores use the "
         "zero-shot text head")
    return None


def with_head(state: StateDict, head: ClassifierHead) -> StateDict:
    """``state`` and ``head``'s weight and scale under `HEAD_KEYS`."""
    return {**state, HEAD_KEYS[0]: head.weight.detach().float(),
            HEAD_KEYS[1]: head.scale.detach().float().reshape(1)}


def split_head(state: StateDict, classnames: list[str] | None
               ) -> tuple[StateDict, ClassifierHead | None]:
    """The model's own weights of ``state`` and the head riding in it (None without one, or
    when ``classnames`` is None: the head is dropped)."""
    if HEAD_KEYS[0] not in state:
        return state, None
    model = {k: v for k, v in state.items() if k not in HEAD_KEYS}
    if classnames is None:
        return model, None
    head = ClassifierHead(state[HEAD_KEYS[0]].float(), float(state[HEAD_KEYS[1]].float()[0]),
                          classnames)
    return model, head
