"""The miniature world: scenes of 1-3 coloured shapes, their captions, and caption parsing.

A *scene* is a layout (concrete shape, colour, size and position of each object) together with
the *spec* its caption states.  A :class:`SceneSpec` is exactly what a caption says, nothing
more: per object its shape and colour, its size only if the caption names it, its position only
if the caption names it, and pairwise relations ("above", "left of", ...).  ``caption`` turns a
spec into text, ``parse_caption`` turns text back into the spec, so the judge can score any image
against any caption of the grammar without knowing the scene that produced the image.

Grammar (every caption is lower case, no trailing period)::

    object   := "a " [size " "] color " " shape
    size     := "small" | "large"
    color    := "red" | "yellow" | "green" | "blue" | "purple" | "black"
    shape    := "circle" | "square" | "triangle"
    position := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"
    relation := "above" | "below" | "left of" | "right of"

    caption  := object [" " position]                  e.g. "a large red circle on the left"
              | object " " relation " " object         e.g. "a blue square above a yellow triangle"
              | object " and " object                  e.g. "a red circle and a small green square"
              | object ", " object " and " object      e.g. "a red circle, a blue square and a black triangle"

Objects in one caption always have distinct colours (so "the red one" is never ambiguous).

Geometry (shared with the renderer and the judge): coordinates are normalised to [0, 1], x to the
right, y *down*.  An object's (x, y) is the centre of its bounding box and ``extent`` the side of
that box: a circle's diameter, a square's side, a triangle's base (= its height; triangles point
up).  Small objects have extent ~0.20 of the image side, large ones ~0.36.

The meaning of positions and relations is "dominant direction": with (dx, dy) the offset of the
object from the image centre (positions) or from the other object (relations), "on the left" /
"left of" means -dx exceeds |dy| (and, for positions, the object is clearly off-centre);
"in the center" means max(|dx|, |dy|) is small.  :func:`place` samples layouts that satisfy the
stated constraints with a margin (rejection sampling), so a render of the scene makes its caption
true even after the blur and noise a small diffusion model adds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Vocabulary and geometry constants
# --------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: RGB of each named colour.  Chosen so that every blend of a colour with the background is
#: nearer (as a point on the background->colour segment) to its own colour than to any other,
#: with a margin of >= 48 RGB units: see segmentation.py.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (240, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "black": (25, 25, 25),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (200, 200, 200)
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")

#: Nominal extent (bounding-box side, fraction of the image side) of each size, and the
#: multiplicative jitter applied when sampling.
EXTENT: dict[str, float] = {"small": 0.20, "large": 0.36}
EXTENT_JITTER = 0.06
#: Boundary between small and large used by the judge (geometric mean of the nominal extents).
SIZE_THRESHOLD = float(np.sqrt(EXTENT["small"] * EXTENT["large"]))

#: Direction of each position / relation as a unit vector (x right, y down).
DIRECTION: dict[str, tuple[float, float]] = {
    "on the left": (-1.0, 0.0),
    "on the right": (1.0, 0.0),
    "at the top": (0.0, -1.0),
    "at the bottom": (0.0, 1.0),
    "left of": (-1.0, 0.0),
    "right of": (1.0, 0.0),
    "above": (0.0, -1.0),
    "below": (0.0, 1.0),
}

# Margins the sampler enforces (the judge's thresholds sit well inside these).
_PAD = 0.03  # objects stay this far from the image border
_GAP = 0.05  # bounding boxes of two objects are at least this far apart (along some axis)
_POS_DOMINANCE = 0.10  # stated position: along - across >= this
_POS_OFFCENTRE = 0.17  # stated side position: along >= this
_CENTRE_MAX = 0.03  # "in the center": max(|dx|, |dy|) <= this
_REL_DOMINANCE = 0.08  # relation: along - across >= this


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption states about one object (``size``/``position`` None when not stated)."""

    shape: str
    color: str
    size: Optional[str] = None
    position: Optional[str] = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.color not in PALETTE:
            raise ValueError(f"unknown color {self.color!r}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")


@dataclass(frozen=True)
class Relation:
    """``objects[subject]`` is ``relation`` ``objects[object]`` (e.g. 0 "above" 1)."""

    subject: int
    relation: str
    object: int

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}")


@dataclass(frozen=True)
class SceneSpec:
    """The constraints a caption states: objects in caption order, and pairwise relations."""

    objects: tuple[ObjectSpec, ...]
    relations: tuple[Relation, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 3:
            raise ValueError("a scene has 1 to 3 objects")
        colors = [o.color for o in self.objects]
        if len(set(colors)) != len(colors):
            raise ValueError("objects of one scene must have distinct colours")
        for r in self.relations:
            if not (0 <= r.subject < len(self.objects) and 0 <= r.object < len(self.objects)) or r.subject == r.object:
                raise ValueError(f"bad relation {r}")


@dataclass(frozen=True)
class Object:
    """A concrete object of a scene: everything needed to draw it."""

    shape: str
    color: str
    size: str  # always concrete, stated or not
    x: float  # bounding-box centre, normalised, x right
    y: float  # bounding-box centre, normalised, y down
    extent: float  # bounding-box side, normalised

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.extent / 2
        return (self.x - h, self.y - h, self.x + h, self.y + h)


@dataclass(frozen=True)
class Scene:
    """A layout of objects (same order as ``spec.objects``) and the spec its caption states."""

    objects: tuple[Object, ...]
    spec: SceneSpec = field(repr=False)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _object_phrase(o: ObjectSpec) -> str:
    return "a " + (o.size + " " if o.size else "") + o.color + " " + o.shape


def caption_of_spec(spec: SceneSpec) -> str:
    """Text of a spec.  Raises ValueError for specs the grammar cannot express."""
    objs = spec.objects
    n = len(objs)
    if n > 1 and any(o.position for o in objs):
        raise ValueError("positions are only expressible for single-object captions")
    if n == 1:
        if spec.relations:
            raise ValueError("a single object has no relations")
        o = objs[0]
        return _object_phrase(o) + (" " + o.position if o.position else "")
    if n == 2:
        if not spec.relations:
            return _object_phrase(objs[0]) + " and " + _object_phrase(objs[1])
        if len(spec.relations) != 1 or (spec.relations[0].subject, spec.relations[0].object) != (0, 1):
            raise ValueError("two-object captions state at most one relation, first object to second")
        return _object_phrase(objs[0]) + " " + spec.relations[0].relation + " " + _object_phrase(objs[1])
    if spec.relations:
        raise ValueError("three-object captions state no relations")
    return f"{_object_phrase(objs[0])}, {_object_phrase(objs[1])} and {_object_phrase(objs[2])}"


def caption(scene: Scene | SceneSpec) -> str:
    """The caption of a scene (or of a spec)."""
    return caption_of_spec(scene.spec if isinstance(scene, Scene) else scene)


_OBJ_RE = "a (?:(small|large) )?(" + "|".join(COLORS) + ") (" + "|".join(SHAPES) + ")"
_POS_RE = "|".join(POSITIONS)
_REL_RE = "|".join(RELATIONS)
_SINGLE = re.compile(f"^{_OBJ_RE}(?: ({_POS_RE}))?$")
_PAIR_REL = re.compile(f"^{_OBJ_RE} ({_REL_RE}) {_OBJ_RE}$")
_PAIR_AND = re.compile(f"^{_OBJ_RE} and {_OBJ_RE}$")
_TRIPLE = re.compile(f"^{_OBJ_RE}, {_OBJ_RE} and {_OBJ_RE}$")


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def parse_caption(text: str) -> SceneSpec:
    """The constraints a caption of the grammar states.  Raises ValueError for other text.

    Tolerates case, surrounding whitespace, repeated spaces and a trailing period.
    """
    t = _normalise(text)

    def obj(g: Sequence[Optional[str]], position: Optional[str] = None) -> ObjectSpec:
        size, color, shape = g
        return ObjectSpec(shape=shape, color=color, size=size, position=position)

    if m := _SINGLE.match(t):
        g = m.groups()
        return SceneSpec((obj(g[:3], g[3]),))
    if m := _PAIR_REL.match(t):
        g = m.groups()
        return SceneSpec((obj(g[0:3]), obj(g[4:7])), (Relation(0, g[3], 1),))
    if m := _PAIR_AND.match(t):
        g = m.groups()
        return SceneSpec((obj(g[0:3]), obj(g[3:6])))
    if m := _TRIPLE.match(t):
        g = m.groups()
        return SceneSpec((obj(g[0:3]), obj(g[3:6]), obj(g[6:9])))
    raise ValueError(f"not a caption of the miniature-world grammar: {text!r}")


_REL_INVERSE = {"below": "above", "right of": "left of"}


def canonical_key(spec_or_caption: SceneSpec | str) -> str:
    """A string equal for captions that state the same thing in different words.

    "a b and a c" == "a c and a b"; "A below B" == "B above A"; "A right of B" == "B left of A".
    Used to split prompts into train/test so that no test prompt is a paraphrase of a train one.
    """
    spec = parse_caption(spec_or_caption) if isinstance(spec_or_caption, str) else spec_or_caption
    objs = [_object_phrase(o) + ("@" + o.position if o.position else "") for o in spec.objects]
    if not spec.relations:
        return " & ".join(sorted(objs))
    parts = []
    for r in spec.relations:
        a, rel, b = objs[r.subject], r.relation, objs[r.object]
        if rel in _REL_INVERSE:
            a, rel, b = b, _REL_INVERSE[rel], a
        parts.append(f"{a} {rel} {b}")
    return " ; ".join(sorted(parts))


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def sample_spec(
    rng: np.random.Generator,
    n_objects: Optional[int] = None,
    p_size: float = 0.6,
    p_position: float = 0.7,
    p_relation: float = 0.65,
) -> SceneSpec:
    """A random caption-level spec: 1-3 objects (35/40/25 %), distinct colours."""
    n = int(n_objects) if n_objects else int(rng.choice([1, 2, 3], p=[0.35, 0.40, 0.25]))
    colors = rng.choice(len(COLORS), size=n, replace=False)
    objs = []
    for i in range(n):
        size = SIZES[rng.integers(2)] if rng.random() < p_size else None
        objs.append(ObjectSpec(shape=SHAPES[rng.integers(3)], color=COLORS[colors[i]], size=size))
    rels: tuple[Relation, ...] = ()
    if n == 1 and rng.random() < p_position:
        objs[0] = replace(objs[0], position=POSITIONS[rng.integers(len(POSITIONS))])
    if n == 2 and rng.random() < p_relation:
        rels = (Relation(0, RELATIONS[rng.integers(len(RELATIONS))], 1),)
    return SceneSpec(tuple(objs), rels)


def _position_ok(o: Object, position: str) -> bool:
    dx, dy = o.x - 0.5, o.y - 0.5
    if position == "in the center":
        return max(abs(dx), abs(dy)) <= _CENTRE_MAX
    ux, uy = DIRECTION[position]
    along, across = dx * ux + dy * uy, abs(dx * uy - dy * ux)
    return along >= _POS_OFFCENTRE and along - across >= _POS_DOMINANCE


def _relation_ok(a: Object, rel: str, b: Object) -> bool:
    ux, uy = DIRECTION[rel]
    dx, dy = a.x - b.x, a.y - b.y
    along, across = dx * ux + dy * uy, abs(dx * uy - dy * ux)
    return along - across >= _REL_DOMINANCE


def _apart(a: Object, b: Object) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return bx0 - ax1 >= _GAP or ax0 - bx1 >= _GAP or by0 - ay1 >= _GAP or ay0 - by1 >= _GAP


def place(spec: SceneSpec, rng: np.random.Generator, max_tries: int = 2000) -> Scene:
    """A layout that makes ``spec`` true with margin (rejection sampling on sizes and positions).

    Unstated sizes are drawn uniformly; extents get a +-6 % jitter; objects never overlap and
    stay inside the image.  Raises RuntimeError if no layout is found (does not happen for specs
    of the grammar).
    """
    sizes = [o.size or SIZES[rng.integers(2)] for o in spec.objects]
    for attempt in range(max_tries):
        if attempt and attempt % 200 == 0:  # re-draw unstated sizes if stuck
            sizes = [o.size or SIZES[rng.integers(2)] for o in spec.objects]
        objs: list[Object] = []
        for o, size in zip(spec.objects, sizes):
            extent = EXTENT[size] * float(rng.uniform(1 - EXTENT_JITTER, 1 + EXTENT_JITTER))
            lo, hi = _PAD + extent / 2, 1 - _PAD - extent / 2
            if o.position == "in the center":
                x, y = 0.5 + rng.uniform(-_CENTRE_MAX, _CENTRE_MAX, size=2)
            else:
                x, y = rng.uniform(lo, hi, size=2)
            objs.append(Object(o.shape, o.color, size, float(x), float(y), extent))
        if not all(_PAD + ob.extent / 2 - 1e-9 <= c <= 1 - _PAD - ob.extent / 2 + 1e-9 for ob in objs for c in (ob.x, ob.y)):
            continue
        if not all(_position_ok(ob, o.position) for ob, o in zip(objs, spec.objects) if o.position):
            continue
        if not all(_apart(objs[i], objs[j]) for i in range(len(objs)) for j in range(i + 1, len(objs))):
            continue
        if not all(_relation_ok(objs[r.subject], r.relation, objs[r.object]) for r in spec.relations):
            continue
        return Scene(tuple(objs), spec)
    raise RuntimeError(f"could not place {caption_of_spec(spec)!r}")


def sample_scene(rng: np.random.Generator, **kwargs) -> Scene:
    """A random scene: a random spec (see :func:`sample_spec`) placed so its caption is true."""
    return place(sample_spec(rng, **kwargs), rng)


def scene_from_caption(text: str, rng: np.random.Generator) -> Scene:
    """A random layout of which ``text`` is a true caption."""
    return place(parse_caption(text), rng)
