"""Turn a labelled set into image-text pairs, optionally holding classes out entirely."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from cliplab.data.types import ImageTextPairs, LabelledImages, source_keys
from cliplab.errors import DataError, warn
from cliplab.report_text import unique_labels


def twice(indices: list[int], classnames: Sequence[str]) -> str:
    """The first class ``indices`` holds twice, by its name."""
    seen: set[int] = set()
    for i in indices:
        if i in seen:
            return classnames[i]
        seen.add(i)
    raise ValueError("no class is named twice")


def folded(name: str) -> str:
    """A class name as zero-shot prompts read it, for telling names alike: case folded (the
    tokenizers lowercase) and runs of spaces as one (prompts collapse them)."""
    return " ".join(name.casefold().split())


def class_indices(classnames: list[str], names: list[str], key: str | None = "classes"
                  ) -> list[int]:
    """Indices of ``names`` in ``classnames``: the class of exactly that name (of several, the
    first, with a warning), else the one per-class results key so (``crane#2``: the second
    "crane"), else the one of that name in another case. A one-line `DataError` for a name of
    no class, and (naming ``key``, the config key that gave ``names``) for one that matches
    several classes only in another case (``dog`` of ``Dog/`` and ``DOG/``): which is meant is
    not guessed."""
    by_fold: dict[str, list[int]] = {}
    for i, c in enumerate(classnames):
        by_fold.setdefault(folded(c), []).append(i)
    keys = class_keys(list(classnames))
    out = []
    for name in names:
        if name in classnames:  # a class of that very name wins over ones in another case
            out.append(classnames.index(name))
            same = [i for i, c in enumerate(classnames) if c == name]
            if len(same) > 1:
                warn(f"{key + ': ' if key else ''}{name!r} names {len(same)} classes; taken "
                     f"as the first ({keys[same[1]]!r} is the second, as per-class results "
                     "name it)")
            continue
        if name in keys:
            out.append(keys.index(name))
            continue
        found = by_fold.get(folded(name), [])
        if not found:
            raise DataError(f"unknown class {name!r}; classes are: {', '.join(classnames)}")
        if len(found) > 1:
            candidates = ", ".join(repr(classnames[i]) for i in found)
            raise DataError(f"{key + ': ' if key else ''}{name!r} matches {len(found)} classes "
                            f"only in another case ({candidates}); give the one meant as it "
                            "is written")
        out.append(found[0])
    return out


class HasClasses(Protocol):
    """A labelled set, or what was fitted on one (an adapter): its class names, in index order."""

    classnames: Sequence[str]


def check_same_classes(first: HasClasses, second: HasClasses, where: str,
                       names: tuple[str, str] = ("train", "test")) -> None:
    """A one-line `DataError` unless ``first`` and ``second`` have the same class names
    (any case or spacing, where that pairs them one to one) in the same order: labels are
    class indices, so a classifier fitted on one
    set is only scored right on the other when index i is the same class in both."""
    a, b = list(first.classnames), list(second.classnames)
    fa, fb = [folded(c) for c in a], [folded(c) for c in b]
    # names alike but for case or spacing are one class only where that pairs them one to
    # one: of Dog/ and dog/, each side's order must be the other's as written
    if a == b or (fa == fb and len(set(fa)) == len(fa)):
        return
    one, two = names
    only = [(side, _only_in(x, y)) for side, x, y in ((one, a, b), (two, b, a))]
    if len(a) != len(b) and any(names for _, names in only):
        # the first names of each side are often the same: name what differs
        detail = f"{one} has {len(a)} classes, {two} has {len(b)}; " + "; ".join(
            f"{len(names)} only in {side}: {_few(names, 3)}" for side, names in only if names)
        raise DataError(f"{where}: {one} and {two} must have the same classes in the same "
                        f"order; {detail}")
    if len(a) != len(b):
        detail = f"{one} has {len(a)} classes, {two} has {len(b)}"
    else:
        # alike all along (Dog/ and dog/ in two orders): the first that differs as written
        i = next(i for i in range(len(a)) if (fa[i] != fb[i] if fa != fb else a[i] != b[i]))
        detail = f"class {i} is {a[i]!r} in {one} but {b[i]!r} in {two}"
    raise DataError(f"{where}: {one} and {two} must have the same classes in the same order; "
                    f"{detail} ({one}: {_few(a)}; {two}: {_few(b)})")


def _only_in(names: list[str], other: list[str]) -> list[str]:
    """The names of ``names`` that ``other`` lacks (any case or spacing), in order."""
    other_folded = {folded(c) for c in other}
    return [c for c in names if folded(c) not in other_folded]


def class_keys(classnames: list[str]) -> list[str]:
    """Each class's key in per-class results: its name, made unique when names repeat
    (``hot_dog/`` and ``hot dog/`` are both "hot dog": the second keyed ``hot dog#2``), so no
    class's entry overwrites another's; a suffix never takes another class's own name (of
    ``x``, ``x``, ``x#2`` the second ``x`` is ``x#3``)."""
    return unique_labels(list(classnames), keep_first=True)


def leave_out_classes(sets: str) -> str:
    """How a run whose sets hold a class with no image (an empty folder, one whose images are
    all unreadable, or one ``holdout:`` takes out) leaves it out; ``sets`` names the sets
    whose ``classes:`` must agree."""
    return (f"a class with no image (an empty folder, one whose images are all unreadable, or "
            f"one holdout: takes out) is left out by listing the classes to keep in classes: of "
            f"{sets} alike (the sets must have the same classes), or by removing its folder "
            "(or renaming it to start with '.': no class)")


def classes_with_fewer(labels: torch.Tensor, classnames: list[str], k: int
                       ) -> list[tuple[str, int]]:
    """``(class key, count)`` of every class with fewer than ``k`` samples (none: 0), each
    class by its `class_keys` key (its name, unless another class has it too)."""
    counts = torch.bincount(labels, minlength=len(classnames)).tolist()
    return [(name, n) for name, n in zip(class_keys(classnames), counts) if n < k]


def _few(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit
                                       else "")


def split_classes(data: LabelledImages, heldout: list[str]) -> tuple[LabelledImages, LabelledImages]:
    """(samples of the seen classes, samples of the held-out classes), labels unchanged."""
    held = torch.tensor(class_indices(data.classnames, heldout, "holdout"), dtype=torch.long)
    is_held = torch.isin(data.labels, held)
    return data.subset(~is_held), data.subset(is_held)


def select_classes(data: LabelledImages, names: list[str]) -> LabelledImages:
    """Only the samples of classes ``names``, relabelled ``0 … len(names)-1`` in that order
    (class names and descriptions follow): a task over those classes alone, as base-to-novel
    evaluation scores base and novel classes each among their own."""
    keep = class_indices(data.classnames, names)
    if len(set(keep)) != len(keep):
        raise DataError(f"classes: {twice(keep, data.classnames)!r} is named twice")
    new_label = torch.full((len(data.classnames),), -1, dtype=torch.long)
    new_label[torch.tensor(keep)] = torch.arange(len(keep))
    mask = new_label[data.labels] >= 0
    descriptions = [data.descriptions[i] for i in keep] if data.descriptions else None
    keys = [k for k, m in zip(source_keys(data), mask.tolist()) if m]
    return LabelledImages(data.images[mask], new_label[data.labels[mask]],
                          [data.classnames[i] for i in keep], data.templates, data.name,
                          skipped=data.skipped, descriptions=descriptions, keys=keys)


def labelled_to_pairs(data: LabelledImages, templates: list[str] | None = None) -> ImageTextPairs:
    """Each image gets one caption per template filled with its class name (or description);
    the class is the caption group, so all captions of a class are positives for its images."""
    templates = templates or data.templates
    per_class = [[t.format(name) for t in templates] for name in data.prompt_names]
    captions = [per_class[int(y)] for y in data.labels]
    return ImageTextPairs(data.images, captions, groups=data.labels.clone(),
                          name=pairs_name(data.name), skipped=data.skipped)  # nothing lost unsaid


def pairs_name(name: str) -> str:
    """A labelled set's name as pairs: ``NAME-pairs`` (once: a set read back from its shards
    has the suffix already)."""
    return name if name.endswith("-pairs") else f"{name}-pairs"


def concat_pairs(first: ImageTextPairs, second: ImageTextPairs) -> ImageTextPairs:
    """One set holding ``first`` then ``second`` (images must share their size). Groups are kept
    only when both sets have them: a group of ``second`` whose caption texts are those of a
    group of ``first`` joins it (identical captions are positives, as within one set, where a
    group is the images with the same captions), any other is renumbered apart; partners are
    kept (re-indexed) when either set has them."""
    if first.images.shape[1:] != second.images.shape[1:]:
        raise DataError(f"cannot mix {first.name} (images {tuple(first.images.shape[1:])}) with "
                        f"{second.name} ({tuple(second.images.shape[1:])}); give both the same "
                        "image size")
    groups = None
    if first.groups is not None and second.groups is not None:
        groups = torch.cat([first.groups, _joined_groups(first, second)])
    partners = None
    if first.partners is not None or second.partners is not None:
        def own(p: ImageTextPairs, offset: int) -> torch.Tensor:
            if p.partners is None:
                return torch.full((len(p),), -1, dtype=torch.int64)
            return torch.where(p.partners >= 0, p.partners + offset, p.partners)
        partners = torch.cat([own(first, 0), own(second, len(first))])
    return ImageTextPairs(torch.cat([first.images, second.images]),
                          first.captions + second.captions, groups=groups,
                          name=f"{first.name}+{second.name}", partners=partners)


def _group_texts(pairs: ImageTextPairs) -> dict[int, frozenset[str]]:
    """Each group of ``pairs`` (which has groups) and the caption texts of its images."""
    texts: dict[int, set[str]] = {}
    for group, captions in zip(pairs.groups.tolist(), pairs.captions):
        texts.setdefault(group, set()).update(captions)
    return {group: frozenset(t) for group, t in texts.items()}


def _joined_groups(first: ImageTextPairs, second: ImageTextPairs) -> torch.Tensor:
    """``second``'s groups numbered for the concatenation after ``first``: a group with the
    caption texts of one of ``first``'s takes its id (the lowest, if several have them), every
    other a new id above ``first``'s, one per group of ``second``."""
    own: dict[frozenset[str], int] = {}
    for group, texts in sorted(_group_texts(first).items()):
        own.setdefault(texts, group)
    start = int(first.groups.max()) + 1 if first.groups.numel() else 0
    fresh = iter(range(start, 1 << 62))
    new_id = {group: own[texts] if texts in own else next(fresh)
              for group, texts in sorted(_group_texts(second).items())}
    return torch.tensor([new_id[g] for g in second.groups.tolist()], dtype=torch.int64)
