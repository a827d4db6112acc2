"""Hard negatives of the miniature world: a caption's spec with one stated thing changed.

``mutate_spec``/``mutate_caption`` change one attribute (colour, shape, size, position or relation):
the negatives of the judge's measurement (``hgdpo.world.measure``) and of the public set.
``swap_spec`` exchanges an attribute of two objects and ``drop_spec`` removes one, with the relations
naming it: OSPO's negatives on the world's grammar (``hgdpo.world.perturb``). Each result is false of
every scene of which the original is true, given the sampler's margins (``hgdpo.world.scene.place``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np

from hgdpo.world.scene import (
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Relation,
    SceneSpec,
    caption_of_spec,
    parse_caption,
)

MUTATION_KINDS: tuple[str, ...] = ("color", "shape", "size", "position", "relation")


def mutation_options(spec: SceneSpec) -> dict[str, list]:
    """For each kind of single-attribute change, the (target, new value) pairs possible."""
    used = {o.color for o in spec.objects}
    opts: dict[str, list] = {k: [] for k in MUTATION_KINDS}
    for i, o in enumerate(spec.objects):
        opts["color"] += [(i, c) for c in COLORS if c not in used]
        opts["shape"] += [(i, s) for s in SHAPES if s != o.shape]
        if o.size:
            opts["size"] += [(i, s) for s in SIZES if s != o.size]
        if o.position:
            opts["position"] += [(i, p) for p in POSITIONS if p != o.position]
    for k, r in enumerate(spec.relations):
        opts["relation"] += [(k, rel) for rel in RELATIONS if rel != r.relation]
    return {k: v for k, v in opts.items() if v}


def mutate_spec(spec: SceneSpec, rng: np.random.Generator, kind: Optional[str] = None) -> SceneSpec:
    """``spec`` with exactly one stated attribute changed.

    The kind (colour, shape, size, position, relation) is drawn uniformly among those the spec
    states (or forced with ``kind``), then the target and the new value uniformly.  A new colour
    is never one already used by another object.
    """
    opts = mutation_options(spec)
    if kind is None:
        kinds = sorted(opts)
        kind = kinds[rng.integers(len(kinds))]
    if kind not in opts:
        raise ValueError(f"caption states no {kind} to mutate: {caption_of_spec(spec)!r}")
    target, value = opts[kind][rng.integers(len(opts[kind]))]
    objs = list(spec.objects)
    rels = list(spec.relations)
    if kind == "relation":
        rels[target] = replace(rels[target], relation=value)
    else:
        objs[target] = replace(objs[target], **{kind: value})
    return SceneSpec(tuple(objs), tuple(rels))


def mutate_caption(text: str, rng: np.random.Generator, kind: Optional[str] = None) -> str:
    """The same caption with exactly one attribute (colour, shape, size, position or relation)
    changed: a hard negative.  The result always differs from ``text`` and is false of any
    image of which ``text`` is true (given the sampler's margins)."""
    return caption_of_spec(mutate_spec(parse_caption(text), rng, kind))


SWAP_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size")


def swap_options(spec: SceneSpec) -> dict[str, list[tuple[int, int]]]:
    """For each attribute, the object pairs ``(i, j)``, ``i < j``, whose exchange is a hard negative.

    An exchange counts only if the swapped caption is false of every scene of which ``spec`` is
    true (colours are distinct, so each object is known by its colour):

    - shape: the two shapes differ;
    - size: both sizes are stated and differ (swapping a stated size with an unstated one can
      leave a scene true of both captions);
    - color: the objects differ otherwise, i.e. their shapes differ, or both sizes are stated and
      differ, or a relation names one of them ("a red circle and a blue circle" swapped is a
      paraphrase; "a red circle above a blue circle" swapped is not).
    """
    objs = spec.objects
    opts: dict[str, list[tuple[int, int]]] = {a: [] for a in SWAP_ATTRIBUTES}
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            sizes_differ = a.size is not None and b.size is not None and a.size != b.size
            related = any({r.subject, r.object} & {i, j} for r in spec.relations)
            if a.shape != b.shape:
                opts["shape"].append((i, j))
            if sizes_differ:
                opts["size"].append((i, j))
            if a.shape != b.shape or sizes_differ or related:
                opts["color"].append((i, j))
    return {k: v for k, v in opts.items() if v}


def swap_spec(spec: SceneSpec, attribute: str, i: int, j: int) -> SceneSpec:
    """``spec`` with ``attribute`` (one of SWAP_ATTRIBUTES) of objects ``i`` and ``j`` exchanged."""
    if attribute not in SWAP_ATTRIBUTES:
        raise ValueError(f"attribute must be one of {SWAP_ATTRIBUTES}, got {attribute!r}")
    n = len(spec.objects)
    if not (0 <= i < n and 0 <= j < n) or i == j:
        raise ValueError(f"cannot swap objects {i} and {j} of a {n}-object caption: {caption_of_spec(spec)!r}")
    objs = list(spec.objects)
    vi, vj = getattr(objs[i], attribute), getattr(objs[j], attribute)
    objs[i], objs[j] = replace(objs[i], **{attribute: vj}), replace(objs[j], **{attribute: vi})
    return SceneSpec(tuple(objs), spec.relations)


def drop_spec(spec: SceneSpec, index: int) -> SceneSpec:
    """``spec`` without object ``index`` and without the relations that name it."""
    n = len(spec.objects)
    if n < 2:
        raise ValueError(f"dropping an object needs two objects: {caption_of_spec(spec)!r}")
    if not 0 <= index < n:
        raise ValueError(f"no object {index} in a {n}-object caption: {caption_of_spec(spec)!r}")

    def shift(k: int) -> int:
        return k - 1 if k > index else k

    objs = spec.objects[:index] + spec.objects[index + 1:]
    rels = tuple(
        Relation(shift(r.subject), r.relation, shift(r.object))
        for r in spec.relations
        if index not in (r.subject, r.object)
    )
    return SceneSpec(objs, rels)
