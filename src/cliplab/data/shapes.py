"""``shapes``: a built-in offline dataset of procedurally drawn scenes with exact captions.

Each scene is a few flat-coloured shapes on a black background, drawn without anti-aliasing so
every object pixel is exactly its palette colour. Three kinds of scene:

* ``single``   one object, named by size, colour, shape and 3x3 grid cell:
  "a small red circle at the top left";
* ``relation`` two objects of different colours, one clearly left of / right of / above / below
  the other: "a red circle left of a blue square";
* ``count``    two to four identical objects: "three green triangles".

With ``counterfactuals`` each relation scene is followed by its twin, the same two objects with
their positions or their colours exchanged (its caption is the original's relation or attribute
swap): hard-negative images for ``train.hard_negatives.images: partners``.

Everything is deterministic by seed: the same arguments give bit-identical images and captions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import NonNegativeInt, PositiveInt

from cliplab.data.types import ImageTextPairs, LabelledImages, MultiLabelImages
from cliplab.errors import DataError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 64, 255), "yellow": (255, 255, 0),
    "purple": (160, 32, 240), "cyan": (0, 255, 255), "orange": (255, 140, 0),
    "white": (255, 255, 255),
}
BACKGROUND = (0, 0, 0)
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = ("small", "large")
KINDS = ("single", "relation", "count")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
_ROWS, _COLS = ("top", "", "bottom"), ("left", "", "right")
POSITIONS = tuple(" ".join(w for w in (r, c) if w) or "center" for r in _ROWS for c in _COLS)
MIN_IMAGE_SIZE = 32
_MAX_TRIES = 10_000


@dataclass
class ShapeObject:
    """One flat shape; ``x``, ``y`` are its centre pixel (column, row)."""

    shape: str
    color: str
    size: str
    x: int
    y: int


@dataclass
class Scene:
    """Objects on a square canvas of ``image_size`` pixels; ``kind`` is single|relation|count."""

    objects: list[ShapeObject]
    kind: str
    image_size: int = 64


def size_radius(size: str, image_size: int = 64) -> int:
    """Half-extent in pixels of a ``small`` or ``large`` object: its bounding box is 2r+1 wide."""
    _check_names([size], SIZES, "size")
    small = max(2, round(0.08 * image_size))
    return small if size == "small" else max(small + 2, round(0.16 * image_size))


def _check_names(names: Sequence[str], valid: Sequence[str], what: str) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    bad = [n for n in names if n not in valid]
    if bad:
        raise DataError(f"shapes: unknown {what} name{'s' * (len(bad) > 1)} "
                        f"{', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise DataError(f"shapes: image_size must be an int >= {MIN_IMAGE_SIZE}, "
                        f"got {image_size!r}")


def _margin(image_size: int) -> int:
    return max(2, image_size // 16)


def _gaps(a: ShapeObject, b: ShapeObject, image_size: int) -> tuple[int, int]:
    """Background pixels between the bounding boxes of ``a`` and ``b`` along x and along y."""
    reach = size_radius(a.size, image_size) + size_radius(b.size, image_size) + 1
    return _box_gaps(a.x, a.y, b.x, b.y, reach)


def _box_gaps(ax: int, ay: int, bx: int, by: int, reach: int) -> tuple[int, int]:
    """`_gaps` of boxes centred at (ax, ay) and (bx, by) whose radii and 1 sum to ``reach``."""
    return abs(bx - ax) - reach, abs(by - ay) - reach


def _relation(a: ShapeObject, b: ShapeObject, image_size: int) -> str | None:
    """The one relation "a REL b" that clearly holds (dominant axis, clear gap), else None."""
    dx, dy = b.x - a.x, b.y - a.y
    gap_x, gap_y = _gaps(a, b, image_size)
    if abs(dx) >= 2 * abs(dy) and gap_x >= _margin(image_size):
        return "left of" if dx > 0 else "right of"
    if abs(dy) >= 2 * abs(dx) and gap_y >= _margin(image_size):
        return "above" if dy > 0 else "below"
    return None


def position_name(obj: ShapeObject, image_size: int = 64) -> str:
    """The 3x3 grid cell holding the centre of ``obj``, e.g. "top left", "right", "center"."""
    return POSITIONS[3 * (obj.y * 3 // image_size) + obj.x * 3 // image_size]


def _random_object(rng: np.random.Generator, colors: list[str], shapes: list[str],
                   image_size: int) -> ShapeObject:
    """A random shape, colour and size, centred anywhere it fits inside the image."""
    shape, color = shapes[rng.integers(len(shapes))], colors[rng.integers(len(colors))]
    size = SIZES[rng.integers(len(SIZES))]
    r = size_radius(size, image_size)
    x, y = rng.integers(r, image_size - r, size=2)
    return ShapeObject(shape, color, size, int(x), int(y))


def _sample_single(rng, colors, shapes, size) -> Scene:
    obj = _random_object(rng, colors, shapes, size)
    r, m = size_radius(obj.size, size), _margin(size)
    row, col = rng.integers(3, size=2)
    coords = []
    for k in (col, row):  # centre well inside cell k (and the whole object inside the image)
        lo, hi = max(r, k * size // 3 + m), min(size - 1 - r, (k + 1) * size // 3 - 1 - m)
        coords.append(int(rng.integers(lo, hi + 1)))
    obj.x, obj.y = coords
    return Scene([obj], "single", size)


def _sample_relation(rng, colors, shapes, size) -> Scene:
    if len(colors) < 2:
        raise DataError("shapes: 'relation' scenes need at least two colours")
    target = RELATIONS[rng.integers(len(RELATIONS))]
    for _ in range(_MAX_TRIES):
        a = _random_object(rng, colors, shapes, size)
        b = _random_object(rng, [c for c in colors if c != a.color], shapes, size)
        if _relation(a, b, size) == target:
            return Scene([a, b], "relation", size)
    raise DataError(f"shapes: could not place a '{target}' scene in {size}x{size} pixels")


def _sample_count(rng, colors, shapes, size) -> Scene:
    n = int(rng.integers(min(COUNT_WORDS), max(COUNT_WORDS) + 1))
    first = _random_object(rng, colors, shapes, size)
    r = size_radius(first.size, size)
    # every two objects a clear band of background apart: tested on plain ints, the objects
    # built once, since a scene takes ~100 tries at 32 px
    reach, margin = 2 * r + 1, _margin(size)
    for _ in range(_MAX_TRIES):
        xy = rng.integers(r, size - r, size=(n, 2)).tolist()
        if all(max(_box_gaps(ax, ay, bx, by, reach)) >= margin
               for i, (ax, ay) in enumerate(xy) for bx, by in xy[i + 1:]):
            return Scene([ShapeObject(first.shape, first.color, first.size, x, y)
                          for x, y in xy], "count", size)
    raise DataError(f"shapes: could not place {n} objects in {size}x{size} pixels")


_SAMPLERS = {"single": _sample_single, "relation": _sample_relation, "count": _sample_count}


def sample_scenes(n: int, seed: int = 0, kinds: Sequence[str] = KINDS,
                  colors: Sequence[str] | None = None, shapes: Sequence[str] | None = None,
                  image_size: int = 64) -> list[Scene]:
    """``n`` random scenes, kinds taken in turn; objects never overlap, relations are clear.

    Deterministic by ``seed``, and the first ``k`` scenes do not depend on ``n``.
    """
    if n < 0:
        raise DataError(f"shapes: n must be >= 0, got {n}")
    _check_size(image_size)
    kinds = _check_names(kinds, KINDS, "kind")
    colors = _check_names(COLORS if colors is None else colors, COLORS, "colour")
    shapes = _check_names(SHAPES if shapes is None else shapes, SHAPES, "shape")
    if not kinds or not colors or not shapes:
        raise DataError("shapes: kinds, colors and shapes must not be empty")
    rng = np.random.default_rng(seed)
    return [_SAMPLERS[kinds[i % len(kinds)]](rng, colors, shapes, image_size) for i in range(n)]


def _mask(obj: ShapeObject, image_size: int) -> np.ndarray:
    r = size_radius(obj.size, image_size)
    ys, xs = np.ogrid[:image_size, :image_size]
    dx, dy = np.abs(xs - obj.x), ys - obj.y
    box = (dx <= r) & (np.abs(dy) <= r)
    if obj.shape == "square":
        return box
    if obj.shape == "circle":
        return dx ** 2 + dy ** 2 <= r * r + r
    if obj.shape == "triangle":  # apex up, base along the bottom of the box
        return box & (2 * dx <= dy + r)
    t = r // 4  # cross: two bars 2t+1 thick (1 px below r = 4)
    return box & ((dx <= t) | (np.abs(dy) <= t))


def render(scene: Scene, image_size: int | None = None) -> np.ndarray:
    """The scene drawn as a uint8 ``[H, W, 3]`` array (no anti-aliasing: exact palette colours)."""
    size = scene.image_size if image_size is None else image_size
    if size != scene.image_size:
        raise DataError(f"shapes: scene was laid out for {scene.image_size} px, not {size}")
    _check_size(size)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    for obj in scene.objects:
        _check_names([obj.shape], SHAPES, "shape")
        _check_names([obj.color], COLORS, "colour")
        image[_mask(obj, size)] = COLORS[obj.color]
    return image


def _phrase(obj: ShapeObject, with_size: bool) -> str:
    words = ([obj.size] if with_size else []) + [obj.color, obj.shape]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def object_phrase(obj: ShapeObject, with_size: bool = False) -> str:
    """The noun phrase captions use for ``obj``: "a red circle", "an orange square"."""
    return _phrase(obj, with_size)


def relation_of(a: ShapeObject, b: ShapeObject, image_size: int = 64) -> str | None:
    """"left of" / "right of" / "above" / "below" when ``a`` clearly stands so to ``b``."""
    return _relation(a, b, image_size)


def captions(scene: Scene) -> list[str]:
    """Equivalent exact captions of ``scene``, the canonical one (``caption``) first."""
    objs, size = scene.objects, scene.image_size
    if scene.kind == "single" and len(objs) == 1:
        at = f" at the {position_name(objs[0], size)}"
        return [_phrase(objs[0], True) + at, _phrase(objs[0], False) + at]
    if scene.kind == "relation" and len(objs) == 2:
        a, b = objs
        rel = _relation(a, b, size)
        if rel is None:
            raise DataError("shapes: the two objects of this relation scene are not clearly placed")
        return [f"{_phrase(a, s)} {rel} {_phrase(b, s)}" for s in (False, True)] + \
               [f"{_phrase(b, s)} {INVERSE[rel]} {_phrase(a, s)}" for s in (False, True)]
    if scene.kind == "count" and len(objs) in COUNT_WORDS:
        o = objs[0]
        if any((p.shape, p.color, p.size) != (o.shape, o.color, o.size) for p in objs):
            raise DataError("shapes: the objects of a count scene must be identical")
        word, plural = COUNT_WORDS[len(objs)], PLURALS[o.shape]
        return [f"{word} {o.color} {plural}", f"{word} {o.size} {o.color} {plural}"]
    raise DataError(f"shapes: cannot caption a {scene.kind!r} scene of {len(objs)} object(s); "
                    f"valid kinds are {list(KINDS)}")


def caption(scene: Scene) -> str:
    """The canonical exact caption, e.g. "a small red circle at the top left"."""
    return captions(scene)[0]


def render_all(scenes: Sequence[Scene], image_size: int) -> torch.Tensor:
    """uint8 ``[N, image_size, image_size, 3]`` of every scene rendered."""
    images = np.zeros((len(scenes), image_size, image_size, 3), np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = render(scene)
    return torch.from_numpy(images)


# Counterfactual twins: the image-side counterpart of a hard-negative caption (SyViC /
# COCO-Counterfactuals style), for ``train.hard_negatives.images: partners``.

def _fits(scene: Scene) -> bool:
    """Every object lies wholly inside the canvas."""
    size = scene.image_size
    return all(size_radius(o.size, size) <= v < size - size_radius(o.size, size)
               for o in scene.objects for v in (o.x, o.y))


def position_twin(scene: Scene) -> Scene | None:
    """The relation scene with its two objects' centres exchanged ("a red circle left of a blue
    square" -> "a blue square left of a red circle"); None where an object would leave the
    canvas (a large object moved to a small one's place near the edge)."""
    twin = copy.deepcopy(scene)
    a, b = twin.objects
    a.x, a.y, b.x, b.y = b.x, b.y, a.x, a.y
    return twin if _fits(twin) else None


def colour_twin(scene: Scene) -> Scene:
    """The relation scene with its two objects' colours exchanged ("a red circle left of a blue
    square" -> "a blue circle left of a red square")."""
    twin = copy.deepcopy(scene)
    a, b = twin.objects
    a.color, b.color = b.color, a.color
    return twin


def counterfactual_twin(scene: Scene, index: int) -> Scene | None:
    """The twin of the ``index``-th scene: position twins for even, colour twins for odd
    indices (a colour twin where the position twin does not fit); None for a scene that is not
    a two-object relation."""
    if scene.kind != "relation" or len(scene.objects) != 2:
        return None
    twin = position_twin(scene) if index % 2 == 0 else None
    return twin or colour_twin(scene)


def load_shapes_with_scenes(n: int = 2000, seed: int = 0, kinds: Sequence[str] = KINDS,
                            image_size: int = 64, colors: Sequence[str] | None = None,
                            shapes: Sequence[str] | None = None, counterfactuals: bool = False
                            ) -> tuple[ImageTextPairs, list[Scene]]:
    """``n`` rendered scenes as image-text pairs (captions = ``captions(scene)``), plus the scenes.

    ``groups`` joins images whose caption lists are identical (each one's texts fit the other).
    With ``counterfactuals`` every relation scene is followed by its counterfactual twin
    (`counterfactual_twin`: positions or colours exchanged) and the two are each other's
    ``partners``; the set then holds up to ``2 n`` images.
    """
    scenes = sample_scenes(n, seed, kinds, colors, shapes, image_size)
    partners = None
    if counterfactuals:
        scenes, partners = _with_twins(scenes)
    texts, group_ids = [], {}
    for scene in scenes:
        texts.append(captions(scene))
        group_ids.setdefault(tuple(texts[-1]), len(group_ids))
    groups = torch.tensor([group_ids[tuple(t)] for t in texts], dtype=torch.int64)
    return ImageTextPairs(render_all(scenes, image_size), texts, groups, name="shapes",
                          partners=partners), scenes


def _with_twins(scenes: list[Scene]) -> tuple[list[Scene], torch.Tensor]:
    """``scenes`` each followed by its twin (where it has one), and each image's partner index
    (-1: none)."""
    out: list[Scene] = []
    partners: list[int] = []
    for i, scene in enumerate(scenes):
        twin = counterfactual_twin(scene, i)
        out.append(scene)
        if twin is None:
            partners.append(-1)
            continue
        out.append(twin)
        partners += [len(out) - 1, len(out) - 2]
    return out, torch.tensor(partners, dtype=torch.int64)


def load_shapes(n: int = 2000, seed: int = 0, kinds: Sequence[str] = KINDS,
                image_size: int = 64, **kw) -> ImageTextPairs:
    """``n`` rendered scenes as image-text pairs; see ``load_shapes_with_scenes``."""
    return load_shapes_with_scenes(n, seed, kinds, image_size, **kw)[0]


_TEMPLATES = {
    "shape": ["a photo of a {}.", "a {} shape.", "a drawing of a {}.",
              "a {} on a black background."],
    "color": ["a {} shape.", "a {} object.", "a drawing of a {} shape.", "something coloured {}."],
}


def shapes_classification(n: int = 2000, seed: int = 0, attribute: str = "shape",
                          image_size: int = 64, colors: Sequence[str] | None = None,
                          shapes: Sequence[str] | None = None) -> LabelledImages:
    """Single-object scenes labelled by their ``shape`` or ``color`` (index into classnames)."""
    _check_names([attribute], tuple(_TEMPLATES), "attribute")
    scenes = sample_scenes(n, seed, ("single",), colors, shapes, image_size)
    if attribute == "color":
        classnames = _check_names(COLORS if colors is None else colors, COLORS, "colour")
    else:
        classnames = _check_names(SHAPES if shapes is None else shapes, SHAPES, "shape")
    labels = torch.tensor([classnames.index(getattr(s.objects[0], attribute)) for s in scenes],
                          dtype=torch.int64)
    return LabelledImages(render_all(scenes, image_size), labels, classnames,
                          list(_TEMPLATES[attribute]), name=f"shapes-{attribute}")


MULTILABEL_TEMPLATES = {"color": ["a {} shape.", "a {} object.", "something coloured {}."],
                        "shape": ["a {}.", "a {} shape.", "a drawing of a {}."]}


def shapes_multilabel(n: int = 1000, seed: int = 0, attribute: str = "color",
                      kinds: Sequence[str] = ("relation",), image_size: int = 64,
                      colors: Sequence[str] | None = None,
                      shapes: Sequence[str] | None = None) -> MultiLabelImages:
    """Scenes labelled by every ``attribute`` value (colour or shape) they show."""
    if attribute not in MULTILABEL_TEMPLATES:
        raise DataError(f"shapes: multi-label attribute must be one of "
                        f"{sorted(MULTILABEL_TEMPLATES)}, got {attribute!r}")
    scenes = sample_scenes(n, seed, kinds, colors, shapes, image_size)
    classnames = list(colors or COLORS) if attribute == "color" else list(shapes or SHAPES)
    targets = torch.zeros(n, len(classnames), dtype=torch.bool)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            targets[i, classnames.index(getattr(obj, attribute))] = True
    return MultiLabelImages(render_all(scenes, image_size), targets, classnames,
                            list(MULTILABEL_TEMPLATES[attribute]),
                            name=f"shapes-multi-{attribute}")


def shapes_source(attribute: Literal["shape", "color"] | None = None, multilabel: bool = False,
                  n: NonNegativeInt | None = None, seed: NonNegativeInt = 0,
                  kinds: Sequence[str] | None = None, image_size: PositiveInt = 64,
                  colors: Sequence[str] | None = None, shapes: Sequence[str] | None = None,
                  counterfactuals: bool = False
                  ) -> LabelledImages | ImageTextPairs | MultiLabelImages:
    """The ``shapes`` data source: scenes as pairs, as labelled images by ``attribute``
    (shape / color; single-object scenes, so ``kinds`` does not apply), or with
    ``multilabel: true`` as multi-label images (every colour/shape in a scene). ``n`` and
    ``kinds`` default to each form's own defaults."""
    kw: dict[str, Any] = {"seed": seed, "image_size": image_size, "colors": colors,
                          "shapes": shapes}
    if n is not None:
        kw["n"] = n
    if attribute is None and not multilabel:
        return load_shapes(**kw, **({"kinds": kinds} if kinds is not None else {}),
                           counterfactuals=counterfactuals)
    if counterfactuals:
        raise DataError("shapes: counterfactuals (twin scenes) are made for image-text pairs; "
                        "drop them, or drop attribute/multilabel")
    if kinds is not None and not multilabel:  # it was dropped unchecked
        raise DataError("shapes: kinds has no effect with attribute (its images hold one object "
                        "each); drop it")
    if multilabel:
        return shapes_multilabel(attribute=attribute or "color", **kw,
                                 **({"kinds": kinds} if kinds is not None else {}))
    return shapes_classification(attribute=attribute, **kw)
