"""Perturbations of captions of the miniature world, made exactly on the scene spec (``hgdpo.world.scene``);
the pool reaches them through the judge scorer (``hgdpo.scorers.judge``), OSPO's negatives (``hgdpo.pool.perturb``).

replace: one ``mutate_spec`` change (colour, shape, size, position or relation); swap: the colours,
shapes or sizes of two objects exchanged (``swap_options``: only exchanges that make the caption false
of every scene the original describes); drop: one object removed, with the relation naming it. The
perturbed text is the grammar's own caption, so it parses again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hgdpo.pool.phrases import NounPhrase, Perturbation, word_spans
from hgdpo.world.mutate import SWAP_ATTRIBUTES, drop_spec, mutate_spec, swap_options, swap_spec
from hgdpo.world.scene import COLORS, SHAPES, SIZES, SceneSpec, caption_of_spec


def scene_objects(prompt: str, spec: SceneSpec) -> tuple[NounPhrase, ...]:
    """The object phrases ("a [size] colour shape") of a caption of the grammar, in order."""
    words = word_spans(prompt)
    w = [x[0].lower() for x in words]
    out, i = [], 0
    while i < len(w):
        j = i + 1 + (i + 1 < len(w) and w[i + 1] in SIZES)
        if w[i] == "a" and j + 1 < len(w) and w[j] in COLORS and w[j + 1] in SHAPES:
            c0, c1 = words[i][1], words[j + 1][2]
            out.append(NounPhrase(prompt[c0:c1], (i, j + 2), (c0, c1), j + 1))
            i = j + 2
        else:
            i += 1
    if len(out) != len(spec.objects):  # cannot happen for text parse_caption accepted
        raise RuntimeError(f"found {len(out)} object phrases in {prompt!r}, expected {len(spec.objects)}")
    return tuple(out)


def _replace_detail(old: SceneSpec, new: SceneSpec) -> str:
    for a, b in zip(old.objects, new.objects):
        for attr in ("color", "shape", "size", "position"):
            if getattr(a, attr) != getattr(b, attr):
                return f"{attr} {getattr(a, attr)}->{getattr(b, attr)}"
    for r, s in zip(old.relations, new.relations):
        if r.relation != s.relation:
            return f"relation {r.relation}->{s.relation}"
    raise RuntimeError("mutate_spec changed nothing")  # cannot happen


def _world_options(spec: SceneSpec, kind: str) -> dict:
    if kind == "replace":
        return {"mutate": [()]}  # mutate_spec always has a colour to change
    if kind == "swap":
        return swap_options(spec)
    return {"object": [(k,) for k in range(len(spec.objects))]} if len(spec.objects) >= 2 else {}


def scene_kinds(spec: SceneSpec, kinds: Sequence[str]) -> tuple[str, ...]:
    """The kinds of ``kinds`` that apply to a caption of scene ``spec``, in their order."""
    return tuple(k for k in kinds if _world_options(spec, k))


def scene_perturb(prompt: str, spec: SceneSpec, kind: str, rng: np.random.Generator) -> Perturbation:
    """One ``kind`` perturbation of ``prompt``, the caption of ``spec``, deterministic in ``rng``."""
    objects = scene_objects(prompt, spec)
    if kind != "replace" and len(spec.objects) < 2:
        raise ValueError(f"{kind} needs two objects; {prompt!r} has one")
    opts = _world_options(spec, kind)
    if not opts:
        raise ValueError(f"no {kind} of two objects of {prompt!r} changes what it states")
    if kind == "replace":
        new = mutate_spec(spec, rng)
        detail = _replace_detail(spec, new)
    elif kind == "swap":
        attrs = [a for a in SWAP_ATTRIBUTES if a in opts]
        attr = attrs[rng.integers(len(attrs))]
        i, j = opts[attr][rng.integers(len(opts[attr]))]
        new = swap_spec(spec, attr, i, j)
        detail = f"{attr} {getattr(spec.objects[i], attr)}<->{getattr(spec.objects[j], attr)}"
    else:
        k = int(rng.integers(len(spec.objects)))
        new = drop_spec(spec, k)
        detail = "object " + caption_of_spec(SceneSpec((spec.objects[k],)))
    return Perturbation(prompt, caption_of_spec(new), kind, detail, objects)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
