"""The miniature world's rater: how well does an image show what a caption says?

``judge(image, caption) -> float in [0, 1]`` plays the human rater of HG-DPO's preference data
(and the evaluation metric) for the miniature world.  It needs only the image and the caption
(any caption of the grammar in scene.py), never the scene that produced the image.  Pure numpy,
deterministic, a few milliseconds per 64x64 image.

Steps 1 and 2 (finding the objects) are ``hgdpo.world.segmentation``'s (``detect``).

3. Matching.  Every injective assignment of caption objects to blobs (or to "missing") is tried
   (at most 9*8*7 for 3 objects and the 8 largest blobs); the one with the least violation is
   kept.  Violation ``V`` is a weighted sum of unmet constraints:

   ====================================  ======================================================
   caption object matched to a blob      ``1.5 * [colour wrong] + 1 * (1 - P(shape))``
                                         ``+ 1 * (1 - s_size)``
                                         ``+ 1 * (1 - s_pos)``   (position stated)
   caption object missing                ``1 + 1.5 + 1 + [1 if size stated] + [1 if position``
                                         ``stated]`` (all of the above fully unmet, plus 1)
   relation                              ``1 * (1 - s_rel)``, or 1 if either object is missing
   blob matched to no caption object     ``1 * min(1, area / area of a small circle)``
   cleanliness                           ``1 * (1 - Q)``
   ====================================  ======================================================

   with soft satisfactions (``sig`` is the logistic function, lengths in image sides):

   - ``s_size`` = plausible * sig(+-ln(extent / 0.268) / 0.05) (+ for large; 0.268 is
     sqrt(0.20 * 0.36)), with plausible = sig(ln(0.5 / extent) / 0.05) * sig(ln(extent / 0.12) /
     0.05), the only factor when no size is stated (a frame-filling colour field is no object),
   - ``s_pos`` for a side position = sig(min(along - across, along - 0.08) / 0.02), where
     (along, across) are the box centre's offset from the image centre along / across the named
     direction; "in the center": sig((0.10 - max(|dx|, |dy|)) / 0.02),
   - ``s_rel`` = sig((along - across) / 0.016), the offset of the subject from the object,
   - ``Q`` = (mean blob quality) * clip(1 - stray pixels / area of a small circle), stray
     pixels being junk pixels and those of dropped specks.

4. Score ``= exp(-ln(3) * V)``: a perfect image scores ~1, each fully unmet constraint divides
   the score by 3 (a wrong shape, size, position or relation: ~0.33; a wrong colour: ~0.19), a
   missing single object leaves < 0.05, so a blank image scores near 0.  Partial credit stays
   graded (one of two objects right beats none right), which is what pairwise preference
   needs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from hgdpo.world.scene import (
    DIRECTION,
    EXTENT,
    SIZE_THRESHOLD,
    SceneSpec,
    parse_caption,
)
from hgdpo.world.segmentation import MAX_BLOBS, Blob, detect

# ---- weights of the violation sum ---------------------------------------------------------
W_COLOR = 1.5
W_SHAPE = 1.0
W_SIZE = 1.0
W_POS = 1.0
W_REL = 1.0
W_MISSING = 1.0
W_EXTRA = 1.0
W_CLEAN = 1.0
LAMBDA = math.log(3.0)

# ---- soft-threshold scales (image sides) ---------------------------------------------------
SIZE_TAU = 0.05
#: Extents outside [EXTENT_MIN, EXTENT_MAX] are not plausible objects of the world (a speck, or
#: a colour field filling the frame), whatever size the caption states or leaves unstated.
EXTENT_MIN = 0.12
EXTENT_MAX = 0.50
POS_OFFCENTRE = 0.08
POS_TAU = 0.02
CENTRE_MAX = 0.10
REL_TAU = 0.016
_SMALL_CIRCLE_AREA = math.pi * (EXTENT["small"] / 2) ** 2




def _sig(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass
class Judgement:
    """Everything ``judge`` decided; ``score`` is what ``judge`` returns."""

    score: float
    violation: float
    terms: dict  # name -> violation contributed
    assignment: tuple  # per caption object: blob index or None
    blobs: list
    cleanliness: float
    stray_pixels: int
    blur: float


# --------------------------------------------------------------------------------------------
# Constraint satisfaction
# --------------------------------------------------------------------------------------------


def _size_sat(extent: float, size: Optional[str]) -> float:
    """Satisfaction of a stated size (None: only plausibility) times plausibility."""
    le = math.log(max(extent, 1e-6))
    plausible = _sig((math.log(EXTENT_MAX) - le) / SIZE_TAU) * _sig((le - math.log(EXTENT_MIN)) / SIZE_TAU)
    if size is None:
        return plausible
    z = (le - math.log(SIZE_THRESHOLD)) / SIZE_TAU
    return plausible * _sig(z if size == "large" else -z)


def _along_across(dx: float, dy: float, direction: str) -> tuple[float, float]:
    ux, uy = DIRECTION[direction]
    return dx * ux + dy * uy, abs(dx * uy - dy * ux)


def _position_sat(b: Blob, position: str) -> float:
    dx, dy = b.x - 0.5, b.y - 0.5
    if position == "in the center":
        return _sig((CENTRE_MAX - max(abs(dx), abs(dy))) / POS_TAU)
    along, across = _along_across(dx, dy, position)
    return _sig(min(along - across, along - POS_OFFCENTRE) / POS_TAU)


def _relation_sat(a: Blob, rel: str, b: Blob) -> float:
    along, across = _along_across(a.x - b.x, a.y - b.y, rel)
    return _sig((along - across) / REL_TAU)


def size_satisfaction(blob: Blob, size: Optional[str]) -> float:
    """``s_size`` of the module docstring: how well ``blob`` has the stated ``size`` (None: only
    plausibility), in [0, 1].  The value the matching charges ``1 - s`` for."""
    return _size_sat(blob.extent, size)


def position_satisfaction(blob: Blob, position: str) -> float:
    """``s_pos`` of the module docstring: how well ``blob`` is at ``position``, in [0, 1]."""
    return _position_sat(blob, position)


def relation_satisfaction(subject: Blob, relation: str, obj: Blob) -> float:
    """``s_rel`` of the module docstring: how well ``subject`` is ``relation`` ``obj``, in [0, 1]."""
    return _relation_sat(subject, relation, obj)


def _object_cost(o, b: Optional[Blob]) -> float:
    if b is None:
        return W_MISSING + W_COLOR + W_SHAPE + (W_SIZE if o.size else 0.0) + (W_POS if o.position else 0.0)
    c = W_COLOR * (b.color != o.color) + W_SHAPE * (1.0 - b.shape_prob[o.shape])
    c += W_SIZE * (1.0 - _size_sat(b.extent, o.size))
    if o.position:
        c += W_POS * (1.0 - _position_sat(b, o.position))
    return c


def judge_details(image, caption: str | SceneSpec) -> Judgement:
    """The full judgement of ``image`` against ``caption`` (see the module docstring)."""
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    det = detect(image)
    blobs, stray = det.blobs, det.stray_pixels
    img_area = float(np.asarray(image).shape[0] * np.asarray(image).shape[1])
    small_area_px = _SMALL_CIRCLE_AREA * img_area

    q_blobs = float(np.mean([b.quality for b in blobs])) if blobs else 1.0
    q_stray = min(1.0, max(0.0, 1.0 - stray / small_area_px))
    cleanliness = q_blobs * q_stray
    clean_cost = W_CLEAN * (1.0 - cleanliness)

    cand = blobs[:MAX_BLOBS]
    extra_cost = [W_EXTRA * min(1.0, b.area / small_area_px) for b in blobs]
    always_extra = sum(extra_cost[MAX_BLOBS:])
    n, m = len(spec.objects), len(cand)
    obj_cost = [[_object_cost(o, b) for b in cand] + [_object_cost(o, None)] for o in spec.objects]
    rel_cache: dict = {}

    best = None
    options = list(range(m)) + [None]
    for assign in itertools.product(options, repeat=n):
        used = [a for a in assign if a is not None]
        if len(set(used)) != len(used):
            continue
        c_obj = sum(obj_cost[i][m if a is None else a] for i, a in enumerate(assign))
        c_rel = 0.0
        for r in spec.relations:
            a, b = assign[r.subject], assign[r.object]
            if a is None or b is None:
                c_rel += W_REL
            else:
                key = (a, r.relation, b)
                if key not in rel_cache:
                    rel_cache[key] = W_REL * (1.0 - _relation_sat(cand[a], r.relation, cand[b]))
                c_rel += rel_cache[key]
        usedset = set(used)
        c_extra = sum(extra_cost[j] for j in range(m) if j not in usedset)
        total = c_obj + c_rel + c_extra
        if best is None or total < best[0] - 1e-12:
            best = (total, assign, c_obj, c_rel, c_extra)
    total, assign, c_obj, c_rel, c_extra = best
    v = total + always_extra + clean_cost
    terms = {"objects": c_obj, "relations": c_rel, "extra": c_extra + always_extra, "clean": clean_cost}
    return Judgement(
        score=float(math.exp(-LAMBDA * v)),
        violation=float(v),
        terms=terms,
        assignment=tuple(assign),
        blobs=blobs,
        cleanliness=float(cleanliness),
        stray_pixels=int(stray),
        blur=det.blur,
    )


def judge(image, caption: str | SceneSpec) -> float:
    """Score in [0, 1] of how well ``image`` (H, W, 3 RGB: uint8 0-255, or float in [0, 1], or
    float in [-1, 1] if it has negative values) shows
    ``caption`` (any caption of the miniature-world grammar).  See the module docstring."""
    return judge_details(image, caption).score


def judge_batch(images: Sequence | np.ndarray, captions: Sequence[str]) -> np.ndarray:
    """``judge`` of each (image, caption) pair, as a float64 array."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    return np.array([judge(im, c) for im, c in zip(images, captions)], np.float64)
