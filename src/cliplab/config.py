"""One schema mechanism for every stage's config: YAML + ``key=value`` overrides, validated by
pydantic models whose errors name the file, the key path and what was expected.

A stage declares its config as a `Section` subclass (nested sections for nested keys) and reads
it with `load_config(Schema, path, overrides)`; components receive the validated object, never a
raw dict. Unknown keys, wrong types and renamed keys are all reported in one line before any
work starts:

    configs/x.yaml: train.batch_size: expected a valid integer, ..., got 'many'
    configs/x.yaml: unknown key train.bacth_size (valid: augment, batch_size, ...)
    configs/x.yaml: model: renamed key 'preset': use 'name'

Why pydantic: it is the ecosystem's well-kept validator, gives the key path of every error,
parses numbers written as strings ("2e-3") in one place, and builds a JSON schema for free.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from importlib import resources
from pathlib import Path, PurePath
from typing import Annotated, Any, ClassVar, TypeVar

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from cliplab.errors import ConfigError

S = TypeVar("S", bound="Section")

# a folder a command writes (``out``), ``~`` read as the home folder: a config's paths meet no
# shell (a folder named ``~`` was made)
OutFolder = Annotated[str, AfterValidator(os.path.expanduser)]


class Section(BaseModel):
    """Base of every config schema: unknown keys are errors, defaults are validated too.

    ``renamed`` maps an old key of this section to its new name; a config that still uses the
    old key gets an error naming the new one (no silent compatibility shims in a 0.x project).
    """

    # allow_inf_nan: a nan/inf setting (a merge scale, a Tip-Adapter alpha) only ever
    # produced NaN weights or chance accuracy without a word
    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True,
                              arbitrary_types_allowed=True, protected_namespaces=(),
                              allow_inf_nan=False)
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _no_renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for old, new in cls.renamed.items():
                if old in data:
                    raise ValueError(f"renamed key {old!r}: use {new!r}")
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true/false as 1/0 for an int or float: `shots: true` trained on 1
        # shot, `scale: true` merged at 1.0; where a key also takes true/false, they stay
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            number, boolean = _takes(cls.model_fields[info.field_name].annotation)
            if number and not boolean:
                raise ValueError(f"expected {number}, got {value!r}")
        return value

    def to_dict(self) -> dict:
        """Plain YAML-able dict of every key (defaults included), as written to config.yaml."""
        return self.model_dump(mode="json")


def refuse_unused(section: BaseModel, keys: Sequence[str], when: str, prefix: str = "",
                  how: str = "") -> None:
    """A ValueError naming each of ``keys`` given a value other than its default though it
    has no effect ``when`` (``"unless init is ''"``): a setting that changes nothing must not
    look as if it did. A default value passes (a saved config.yaml holds every key, and must
    load again). For a section's ``mode="after"`` validator; ``prefix`` goes before the
    names of keys in a sub-section (``train.``); ``how`` tells how to drop them."""
    given = [prefix + key for key in keys if getattr(section, key) !=
             type(section).model_fields[key].get_default(call_default_factory=True)]
    if given:
        one = len(given) == 1
        raise ValueError(f"{' and '.join(given)} {'has' if one else 'have'} no effect {when}; "
                         f"drop {'it' if one else 'them'}" + (f" ({how})" if how else ""))


def _takes(annotation: Any) -> tuple[str | None, bool]:
    """For a type annotation: which numbers it takes ("an integer", "a number" or None) and
    whether it takes true/false."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _takes(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        members = [_takes(a) for a in typing.get_args(annotation)]
        numbers = sorted({m[0] for m in members} - {None})
        return ("a number" if "a number" in numbers else next(iter(numbers), None),
                any(m[1] for m in members))
    if origin is typing.Literal:  # pydantic takes True for a Literal[1] (True == 1)
        values = typing.get_args(annotation)
        numbers = any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        return (f"one of {', '.join(map(repr, values))}" if numbers else None,
                any(isinstance(v, bool) for v in values))
    if annotation is bool or annotation is Any or annotation is object:
        return None, True
    if isinstance(annotation, type) and issubclass(annotation, float):
        return "a number", False
    if isinstance(annotation, type) and issubclass(annotation, int):
        return "an integer", False
    return None, False


class _KeysOnceLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML's loaders keep
    the last silently, losing the first's settings)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping (lines {seen[key]} and "
                    f"{key_node.start_mark.line + 1}); the second would replace the first",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads 1e-3 as the string "1e-3" (its floats need a dot): a learning rate
# written so reached free-form settings and records as text. YAML 1.2's floats take it.
_KeysOnceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


# YAML 1.1 reads 2026-12-06 as a date, which no config value takes ("a Python object"):
# dates stay text, as OmegaConf and Hydra keep them
for _first, _resolvers in list(_KeysOnceLoader.yaml_implicit_resolvers.items()):
    _KeysOnceLoader.yaml_implicit_resolvers[_first] = [
        (tag, regexp) for tag, regexp in _resolvers if tag != "tag:yaml.org,2002:timestamp"]

_COMMENT = re.compile(r"(^|\s)#")


def parse_value(raw: str, key: str = "") -> Any:
    """A ``key=value`` override's value as YAML (``1e-3`` a number, as in a config file); text
    that is no valid YAML stays as it is. A command line has no comments: text with a `` #``
    (``title=run #2``) is kept whole, where YAML cut it; a list or mapping it would cut is
    refused (``key`` names it)."""
    try:
        value = yaml.load(raw, Loader=_KeysOnceLoader) if raw else ""
    except yaml.YAMLError:
        return raw
    if _cut_as_comment(raw, value):
        if value is None or isinstance(value, str):
            return raw.strip()
        raise ConfigError(f"the command line: {key or 'a value'}={raw}: ' #' starts a YAML "
                          "comment, which would drop what follows it; quote the text holding it")
    return value


def _cut_as_comment(raw: str, value: Any) -> bool:
    """Whether YAML read ``raw`` as ``value`` by dropping a `` #...`` tail as a comment: the
    text before some `` #`` (or a leading ``#``) alone reads the same."""
    for found in _COMMENT.finditer(raw):
        try:
            if yaml.load(raw[:found.start()], Loader=_KeysOnceLoader) == value:
                return True
        except yaml.YAMLError:  # a # inside quotes: the text before it is no value
            continue
    return False


def shipped_config(path: str | Path) -> Path:
    """``path``, or the copy cliplab ships of it: a relative ``configs/...`` path that is no
    file where cliplab runs names the installed package's config of that name (README's
    commands work from any folder after a ``pip install``)."""
    path = Path(path)
    if path.is_file() or path.is_absolute() or not path.parts or path.parts[0] != "configs":
        return path
    package = Path(str(resources.files("cliplab")))
    shipped = package.joinpath(*path.parts).resolve()
    if not shipped.is_file() or not shipped.is_relative_to((package / "configs").resolve()):
        return path
    if shipped not in _SAID_SHIPPED:  # a command may read its config more than once
        _SAID_SHIPPED.add(shipped)
        print(f"cliplab: {path} is not here: reading the shipped {shipped}", file=sys.stderr)
    return shipped


_SAID_SHIPPED: set[Path] = set()


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with one-line errors naming the file (and line) when it is bad
    (a ``configs/...`` path missing here is the shipped config: `shipped_config`)."""
    path = shipped_config(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_KeysOnceLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file, so not a YAML config") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return data


# a run's length is given one way: epochs or steps of a ``train`` mapping
LENGTH_KEYS = ("epochs", "steps")


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of ``config`` with ``a.b.c=value`` overrides applied (values parsed as YAML).
    An override giving a ``train`` mapping's length (``train.steps=500``) clears the config's
    other length (``epochs``) unless that is overridden too."""
    config = copy.deepcopy(config)
    _clear_replaced_lengths(config, [item.partition("=") for item in overrides])
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
        value = parse_value(raw, key)
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                child = node[_list_index(node, part, item)]
            else:
                child = node.setdefault(part, {})
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        if isinstance(node, list):
            node[_list_index(node, parts[-1], item)] = value
        else:
            node[parts[-1]] = value
    return config


def _clear_replaced_lengths(config: dict, items: list[tuple[str, str, str]]) -> None:
    given = {key for key, sep, raw in items if sep and raw.strip() not in ("", "null", "~")}
    named = {key for key, _, _ in items}
    for key in given:
        prefix, _, last = key.rpartition(".")
        if last not in LENGTH_KEYS or not (prefix == "train" or prefix.endswith(".train")):
            continue
        node = value_at(config, prefix)  # through list positions too (steps.0.train)
        for other in LENGTH_KEYS:
            if other != last and f"{prefix}.{other}" not in named and isinstance(node, dict) \
                    and node.get(other) is not None:
                node[other] = None


def value_at(tree: Any, path: str) -> Any:
    """The value at dotted ``path`` in mappings and lists (``steps.0.train``), None where
    there is none."""
    for part in path.split("."):
        if isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _list_index(items: list, part: str, item: str) -> int:
    """``part`` as an index into ``items`` (``steps.1.keep_top=0.3``), or a one-line error."""
    if not part.lstrip("-").isdigit():
        raise ConfigError(f"override {item!r}: {part!r} indexes a list, so it must be a number "
                          f"(0 to {len(items) - 1})")
    index = int(part)
    if not 0 <= index < len(items):
        raise ConfigError(f"override {item!r}: index {index} is outside the list's {len(items)} "
                          "items")
    return index


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated recursively with ``extra`` (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(schema: type[S], data: Any, where: str = "the config", prefix: str = "",
             required: Mapping[str, str] | None = None) -> S:
    """``data`` checked against ``schema``; every problem in one `ConfigError` line that names
    ``where`` (a file, or a description such as "task 'zs'"; empty: none), the key path and the
    expectation.
    ``prefix`` is the key path of ``data`` inside a larger config (e.g. ``"options"``), so a
    section validated on its own is still named by its full path. ``required`` maps top-level
    keys the caller needs given, whatever the schema's default, to the words of their absence
    (in place of "KEY is required"); a blank text counts as absent."""
    data = plain_paths(data) if data is not None else {}
    required = required or {}
    absent = [key for key in required if isinstance(data, dict) and _blank(data.get(key))]
    if absent:
        data = {k: v for k, v in data.items() if k not in absent}
    try:
        checked = schema.model_validate(data)
        errors = []
    except ValidationError as err:
        errors = err.errors()
    if not errors and not absent:
        return checked
    # the members of a union that fail at one key are alternatives: one entry, "or"
    problems: dict[str, list[str]] = {required[key]: [required[key]] for key in absent}
    python_only: dict[str, str] = {}  # "an instance of X": objects only Python code passes
    for error in errors:
        path, message = _describe(error, schema, prefix, required)
        key = path if path else message  # missing/unknown keys: each its own entry
        if error["type"] == "is_instance_of":
            python_only.setdefault(key, message)
        elif message not in problems.setdefault(key, []):
            problems[key].append(message)
    for key, message in python_only.items():  # said only where nothing else can be
        if not problems.get(key):
            problems[key] = [message]
    refusal = ConfigError((f"{where}: " if where else "") + "; ".join(
        (f"{key}: " + " or ".join(messages)) if messages[0] != key else key
        for key, messages in problems.items()))
    refusal.key_paths = absent + [_error_key_path(e, prefix) for e in errors]
    raise refusal


def _blank(value: Any) -> bool:
    """Whether a config value says nothing: absent (None) or a text of spaces only."""
    return value is None or (isinstance(value, str) and not value.strip())


def plain_paths(data: Any) -> Any:
    """``data`` with every `pathlib` path in its dicts and lists written as a string (a config
    from Python may hold ``Path`` values where a file says strings); anything else as is."""
    if isinstance(data, PurePath):
        return str(data)
    if isinstance(data, dict):
        return {key: plain_paths(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(plain_paths(value) for value in data)
    return data


def _error_key_path(error: dict, prefix: str) -> str:
    """The key path a pydantic error is about; a whole-section check has none in its location,
    and names the key at the start of its message instead (``steps[2]: unknown key ...``,
    ``scale=2.0 does not apply ...``, ``quality has no effect ...``); "" when it names none."""
    path = ".".join(_location(error, prefix))
    if path == prefix:
        named = re.match(r"(?:Value error, )?([\w.\[\]]+)(?::|=| has no effect)", error["msg"])
        if named:
            path = ".".join([prefix] * bool(prefix) + [named.group(1)])
    return _key_path(path)


def _location(error: dict, prefix: str) -> list[str]:
    """The key names of a pydantic error's location under ``prefix`` (union members left out)."""
    return [prefix] * bool(prefix) + [str(p) for p in error["loc"] if not _is_union_tag(p)]


def _key_path(path: str) -> str:
    """A key path with list items by index: ``steps[2].model`` as ``steps.2.model`` (a suite
    task's label drops its name: ``tasks[0] (name 'zs').data`` is ``tasks.0.data``)."""
    path = re.sub(r" \(name .*?\)(?=\.|$)", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path)


def _overlaps(a: str, b: str) -> bool:
    """Whether key paths ``a`` and ``b`` are one, or one lies inside the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def load_config(schema: type[S], path: str | Path | None = None,
                overrides: Sequence[str] = (), defaults: dict | None = None,
                extra: dict | None = None, replace: dict | None = None,
                required: Mapping[str, str] | None = None) -> S:
    """A stage's validated config: ``defaults`` < the YAML file < ``extra`` (e.g. command-line
    options, merged into the file's sections) and ``replace`` (options that stand for a whole
    section, such as ``--data``: the file's section is dropped, not merged, so a new source
    keeps none of the old one's options) < ``key=value`` overrides. ``required``: keys that
    must be given, with the words of their absence (`validate`); said alone, those words are
    the whole error (they say where to give it: ``say where to write ...: --out DIR``)."""
    raw = load_yaml(path) if path else {}
    raw = deep_merge(defaults or {}, raw)
    raw = deep_merge(raw, {k: v for k, v in (extra or {}).items() if v is not None})
    raw.update({k: v for k, v in (replace or {}).items() if v is not None})
    _refuse_options_overridden(overrides, extra or {}, replace or {})
    raw = apply_overrides(raw, overrides)
    given = [_key_path(item.partition("=")[0]) for item in overrides] + [
        key for key, v in {**(extra or {}), **(replace or {})}.items() if v is not None]
    try:
        return validate(schema, raw, "", required=required)
    except ConfigError as err:
        if str(err) in (required or {}).values():
            raise ConfigError(str(err)) from None
        # the file is named alone when the command line set none of the keys at fault (a
        # fault whose key is unknown may be the command line's)
        wrong = getattr(err, "key_paths", [])
        by_command_line = any(_overlaps(k, g) for k in wrong for g in given) or (
            bool(given) and (not wrong or "" in wrong))
        raise ConfigError(f"{config_source(path, by_command_line)}: {err}") from None


def _refuse_options_overridden(overrides: Sequence[str], extra: dict, replace: dict) -> None:
    """A key set twice on one command line with two values, by an option (``--out a``) and an
    override (``out=b``) or by two overrides (``data.n=4 data.n=8``), is refused: which one
    wins would be silent. An option is named by its key (``--data_dir`` as ``--data-dir``);
    one that stands for a section by the section's."""
    given = {path: (f"--{path.rpartition('.')[2].replace('_', '-')} {value}", value)
             for path, value in _leaves(_set(extra)).items()}
    given.update({path: (f"--{path.partition('.')[0]} {value}", value)
                  for path, value in _leaves(_set(replace)).items()})
    for item in overrides:
        key, _, raw = item.partition("=")
        value = parse_value(raw, key)
        path = _key_path(key)
        if path in given and value != given[path][1]:
            raise ConfigError(f"the command line: {key} is given twice, as {given[path][0]} "
                              f"and as {item}; give one")
        given.setdefault(path, (item, value))


def _set(options: dict) -> dict:
    return {key: value for key, value in options.items() if value is not None}


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


def changed_key_paths(a: Any, b: Any, skip: Collection[str] = (),
                      prefix: str = "") -> list[str]:
    """The dotted paths (list items by index: ``steps.1.keep_top``) at which two JSON-like
    values differ, keys in ``skip`` left out at any depth; ``[]`` when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [path for key in sorted(set(a) | set(b), key=str) if key not in skip
                for path in ([f"{prefix}{key}"] if key not in a or key not in b else
                             changed_key_paths(a[key], b[key], skip, f"{prefix}{key}."))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [path for i, (x, y) in enumerate(zip(a, b))
                for path in changed_key_paths(x, y, skip, f"{prefix}{i}.")]
    return [] if a == b else [prefix.rstrip(".") or "(value)"]


def config_source(path: str | Path | None, from_command_line: bool) -> str:
    """How errors name a config: its file, the command line, or both (without a file, every
    setting came from the command line or a default)."""
    if path and from_command_line:
        return f"{path} + command line"
    return str(path) if path else "the command line"


def _describe(error: dict, schema: type[BaseModel], prefix: str = "",
              required: Mapping[str, str] | None = None) -> tuple[str, str]:
    """One error of pydantic as (``key.path``, what is wrong); ``required``: `validate`'s."""
    path = ".".join(_location(error, prefix))
    kind = error["type"]
    if kind == "extra_forbidden":
        # a section validated apart (a suite's task) names its keys in the error's ctx
        known = (error.get("ctx") or {}).get("valid") or _known_keys(
            schema, tuple(p for p in error["loc"][:-1] if not _is_union_tag(p)))
        hint = f" (valid: {', '.join(known)})" if known else ""
        return "", f"unknown key {path}{hint}"
    if kind == "missing":
        return "", (required or {}).get(path) or f"{path} is required"
    return path, value_error_words(error)


def value_error_words(error: dict) -> str:
    """What is wrong with one value, from a pydantic error of it, in cliplab's words
    (``expected a valid integer, ..., got 'many'``; no class names): the configs' and the
    search API's."""
    kind, given, message = error["type"], error.get("input"), error["msg"]
    if kind in ("dict_type", "model_type", "model_attributes_type"):  # a section: no class name
        shown = f"a list ({', '.join(map(str, given))})" if isinstance(given, list) \
            else _shown(given)
        return f"expected a mapping of keys (key: value), got {shown}"
    if kind in ("too_short", "too_long") and isinstance(given, (list, tuple)):
        ctx = error.get("ctx") or {}
        bound = ctx.get("min_length" if kind == "too_short" else "max_length")
        return (f"expected at {'least' if kind == 'too_short' else 'most'} {bound} "
                f"value{'s' * (bound != 1)}, got {len(given) or 'none'}")
    if kind in ("string_too_short", "string_too_long") and isinstance(given, str):
        ctx = error.get("ctx") or {}
        bound = ctx.get("min_length" if kind == "string_too_short" else "max_length")
        got = len(given) if kind == "string_too_long" else _shown(given)
        return (f"expected at {'least' if kind == 'string_too_short' else 'most'} {bound} "
                f"character{'s' * (bound != 1)}, got {got}")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    elif message.startswith("Input should be"):
        message = "expected" + message[len("Input should be"):]
    if kind not in ("value_error", "assertion_error") and not isinstance(given, (dict, list)):
        # pydantic's own "got a number with a fractional part" gets the value in brackets
        message += f" ({_shown(given)})" if ", got " in message else f", got {_shown(given)}"
    return message


def _shown(value: Any) -> str:
    """A value as an error shows it: a YAML scalar as written (a long string cut), any other
    object by its type (a loaded model's repr is its whole module tree, dozens of lines)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        shown = repr(value)
        return shown if len(shown) <= 60 else shown[:57] + "..."
    return f"a {type(value).__name__} object (a Python object where a config value goes)"


# what pydantic puts in an error's location for the member of a union that failed:
# "float", "constrained-float", "literal['auto']", "function-after[...]", "list[str]", ...
_UNION_TAG = re.compile(r"(int|float|str|bool|none|list|dict|tuple|set|frozenset|bytes|"
                        r"constrained-\w+|is-instance\[.*\]|"
                        r"(literal|function-\w+|list|dict|tuple|set|frozenset|union|"
                        r"tagged-union|nullable|model|json-or-python|lax-or-strict|chain)\[.*\])")


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and _UNION_TAG.fullmatch(part) is not None


def _known_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a section at ``loc`` accepts (best effort through nested sections)."""
    node: Any = schema
    for part in loc:
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            return []
        node = _section_type(fields[part].annotation)
        if node is None:
            return []
    fields = getattr(node, "model_fields", None)
    return sorted(fields) if fields else []


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The `BaseModel` inside an annotation such as ``Train``, ``Train | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if found is not None:
            return found
    return None
