"""Zero-shot prompts longer than the text tower reads: the tokenizer cuts them silently, so a
long class name can lose its end (two names differing only there get the same head row)."""

from __future__ import annotations

from collections.abc import Sequence

from cliplab.errors import warn
from cliplab.models.tokenizer import clean_texts


def warn_cut_prompts(model: object, classnames: Sequence[str], prompts: Sequence[str]) -> None:
    """One warning if any of ``prompts`` (``len(classnames)`` equal runs, one per class) is
    longer than ``model``'s context length: how many were cut, the first class affected, the
    limit, and classes whose prompts are all the same once cut. Models without a tokenizer
    (fakes, ONNX stand-ins) are not checked."""
    tokenizer = getattr(model, "tokenizer", None)
    limit = getattr(model, "context_length", None)
    if tokenizer is None or not isinstance(limit, int) or not prompts:
        return
    texts = clean_texts(prompts)
    # one token past the limit tells a cut prompt from one that fits exactly
    ids = [list(row) for row in
           tokenizer(texts, truncation=True, max_length=limit + 1)["input_ids"]]
    cut = [i for i, row in enumerate(ids) if len(row) > limit]
    if not cut:
        return
    kept = tokenizer([texts[i] for i in cut], truncation=True, max_length=limit)["input_ids"]
    for i, row in zip(cut, kept):
        ids[i] = list(row)
    per_class = len(prompts) // len(classnames)
    first = classnames[cut[0] // per_class]
    cut_classes = {i // per_class for i in cut}
    seen: dict[tuple, int] = {}
    same: list[tuple[str, str]] = []
    for c, name in enumerate(classnames):
        key = tuple(tuple(row) for row in ids[c * per_class:(c + 1) * per_class])
        other = seen.setdefault(key, c)
        # equal names are told of where the classes are loaded; here only what the cut did
        if other != c and classnames[other] != name and cut_classes & {c, other}:
            same.append((classnames[other], name))
    said = ""
    if same:
        pairs = "; ".join(f"{a!r} and {b!r}" for a, b in same[:2])
        said = (f"; {len(same)} class(es) get the same prompts as another once cut ({pairs}"
                f"{'; ...' if len(same) > 2 else ''}), so zero-shot cannot tell them apart")
    warn(f"zero-shot: {len(cut)} of {len(prompts)} prompts are longer than the text tower's "
         f"{limit} tokens and were cut (first: class {first!r}){said}; shorten the class "
         "names or templates")
