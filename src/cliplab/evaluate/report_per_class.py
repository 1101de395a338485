"""The per-class values of a report's task table (``per_class_acc1``, ``per_class_ap``, a
long-tail result's ``per_class``): listed after the task's other metrics, and, for a set of
many classes, only its lowest classes (the rest stay in the inputs' results files), so that a
1000-class task's table stays a table of its headline metrics."""

from __future__ import annotations

PER_CLASS_ROWS = 40  # a group of at most this many classes is listed whole
LOWEST_SHOWN = 10  # of a larger one, these lowest classes


def is_per_class(key: str) -> bool:
    """Whether a metrics key holds one value per class (``mean_per_class_recall`` does not;
    adapt's ``fewer_than_shots`` does: images per class short of its shots)."""
    return key in ("per_class", "fewer_than_shots") or key.startswith("per_class_")


def split_per_class(metrics: dict, prefix: str = "") -> tuple[dict, dict[str, dict]]:
    """``metrics`` without its per-class dicts, and those dicts by dotted path
    (``per_class_acc1``, ``fit_scope.per_class``)."""
    rest: dict = {}
    groups: dict[str, dict] = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and is_per_class(key):
            groups[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            inner, found = split_per_class(value, f"{prefix}{key}.")
            rest[key] = inner
            groups.update(found)
        else:
            rest[key] = value
    return rest, groups


def per_class_rows(groups: dict[str, dict[str, dict]]
                   ) -> tuple[list[tuple[str, dict[str, object]]], list[str]]:
    """Table rows of per-class groups (``{path: {column: {class: value}}}``) and a note for each
    group cut to its ``LOWEST_SHOWN`` classes (lowest mean over the columns of the class's
    ``acc1`` or value). A class's value is a number or a dict of numbers (one row each)."""
    rows: list[tuple[str, dict[str, object]]] = []
    notes: list[str] = []
    for path, by_column in groups.items():
        classes = list(dict.fromkeys(c for values in by_column.values() for c in values))
        if len(classes) > PER_CLASS_ROWS:
            classes = sorted(classes, key=lambda c: _mean_score(c, by_column))[:LOWEST_SHOWN]
            how, whose = (" (by the mean over the columns)", "inputs'") if len(by_column) > 1 \
                else ("", "input's")
            notes.append(f"{path}: the {LOWEST_SHOWN} lowest of {_count(by_column)} classes"
                         f"{how}; every class is in the {whose} results")
        for klass in classes:
            given = [values.get(klass) for values in by_column.values()]
            fields = dict.fromkeys(k for value in given if isinstance(value, dict)
                                   for k in value)
            if not fields or any(_number(value) is not None for value in given):
                rows.append((f"{path}.{klass}", {col: _number(values.get(klass))
                                                 for col, values in by_column.items()}))
            for name in fields:  # (an input's number, not a dict, has none of them)
                rows.append((f"{path}.{klass}.{name}", {col: _field(values.get(klass), name)
                                                        for col, values in by_column.items()}))
    return rows, notes


def _count(by_column: dict[str, dict]) -> int:
    return len({c for values in by_column.values() for c in values})


def _score(value: object) -> float | None:
    """The number a class is ranked by: its value, or its ``acc1`` in a dict."""
    if isinstance(value, dict):
        value = value.get("acc1")
    return _number(value)


def _mean_score(klass: str, by_column: dict[str, dict]) -> tuple[int, float]:
    """Classes with a score first (lowest mean first), those with none after."""
    scores = [s for values in by_column.values() if (s := _score(values.get(klass))) is not None]
    return (0, sum(scores) / len(scores)) if scores else (1, 0.0)


def _field(value: object, name: str) -> float | int | None:
    """The number ``name`` of a class's dict of values (None for any other value)."""
    return _number(value.get(name)) if isinstance(value, dict) else None


def _number(value: object) -> float | int | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
