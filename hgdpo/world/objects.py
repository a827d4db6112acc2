"""Object-level errors of miniature-world images, for comparing preference objectives.

The judge's score says *how much* an image is wrong; this report says *what* is wrong, object by
object, so that two models (A, B) can be compared on object-centric errors: wrong colours, wrong
shapes, missing objects, and attribute leakage (one object drawn in another's colour).

``object_report(image, caption)`` reads everything off the judge's own decision
(:func:`hgdpo.world.judge.judge_details`): its blobs and its matching of caption objects to blobs.
Nothing is detected or matched again here, so the report can never disagree with the score.
Per caption object:

- *matched*: the judge assigned it a blob (else it is missing, and every attribute of it counts
  as wrong, including a stated size or position);
- *colour*: the blob's colour is the caption's;
- *shape*: the blob's most probable shape is the caption's;
- *size* (only when the caption states one) and *position* (only when stated): the judge's soft
  satisfaction ``s_size`` / ``s_pos`` is at least ``SATISFIED`` = 0.5;
- *leak*: the blob's colour is that of *another* object of the same caption (so not its own).
  An off-palette-for-this-caption colour (say purple where no object is purple) is a colour error
  but no leak.

Per relation: satisfied when both objects are matched and the judge's ``s_rel >= SATISFIED``.

Why 0.5: every soft satisfaction of the judge is a logistic of a signed margin, so 0.5 is the
judge's own decision boundary (extent at the small/large threshold ``SIZE_THRESHOLD``; along =
across for a direction; the off-centre and centre limits), and the matching charges ``1 - s`` per
constraint, so ``s >= 0.5`` is "less than half violated".  Plausibility (a speck or a frame-filling
field) multiplies ``s_size``, so an implausibly sized blob fails a stated size too.

Note that the matching minimises the judge's violation, in which a wrong colour (1.5) costs more
than a wrong shape (1): if a red circle and a blue square are drawn as a blue circle and a red
square, the judge reads two wrong shapes, not two leaks.  Leakage here counts the cases where
the judge's own reading is "this object, in that object's colour".

``summarize(reports_a, reports_b, groups)`` pools the counts of many images (rates are ratios
of sums: per-object accuracy over all objects, size accuracy over the objects whose size is
stated, ...) and gives each rate, per side and as the paired difference A - B, a bootstrap
interval over prompts: the same resampling as :func:`hgdpo.report.winrates.win_rate` (draw as many
prompts as there are, with replacement, with ``numpy.random.default_rng(seed).integers``;
percentile method), the same draws for A, B and the difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from hgdpo.world.judge import (
    Judgement,
    judge_details,
    position_satisfaction,
    relation_satisfaction,
    size_satisfaction,
)
from hgdpo.world.scene import ObjectSpec, Relation, SceneSpec, caption_of_spec, parse_caption

#: A soft satisfaction of the judge counts as met from this value on (its logistic midpoint).
SATISFIED = 0.5


@dataclass(frozen=True)
class ObjectResult:
    """What became of one caption object in an image."""

    spec: ObjectSpec
    blob: Optional[int]  # index into the judgement's blobs; None: missing
    colour_ok: bool
    shape_ok: bool
    size_ok: Optional[bool]  # None: the caption states no size
    position_ok: Optional[bool]  # None: the caption states no position
    leak_from: Optional[int]  # the other caption object whose colour this one was drawn in
    size_satisfaction: Optional[float] = None  # the judge's s_size (stated size, matched only)
    position_satisfaction: Optional[float] = None  # the judge's s_pos (stated position, matched)

    @property
    def matched(self) -> bool:
        return self.blob is not None

    @property
    def leak(self) -> bool:
        return self.leak_from is not None


@dataclass(frozen=True)
class RelationResult:
    relation: Relation
    satisfied: bool
    satisfaction: Optional[float]  # the judge's s_rel; None when an object of it is missing


@dataclass(frozen=True)
class ObjectReport:
    """Object-level errors of one image against its caption; the counts are properties."""

    caption: str
    per_object: tuple[ObjectResult, ...]
    per_relation: tuple[RelationResult, ...]
    score: float  # the judge's score, for reference

    @property
    def objects(self) -> int:
        return len(self.per_object)

    @property
    def matched(self) -> int:
        return sum(o.matched for o in self.per_object)

    @property
    def colour_ok(self) -> int:
        return sum(o.colour_ok for o in self.per_object)

    @property
    def shape_ok(self) -> int:
        return sum(o.shape_ok for o in self.per_object)

    @property
    def size_ok(self) -> int:
        return sum(o.size_ok is True for o in self.per_object)

    @property
    def size_stated(self) -> int:
        return sum(o.size_ok is not None for o in self.per_object)

    @property
    def position_ok(self) -> int:
        return sum(o.position_ok is True for o in self.per_object)

    @property
    def position_stated(self) -> int:
        return sum(o.position_ok is not None for o in self.per_object)

    @property
    def relations_ok(self) -> int:
        return sum(r.satisfied for r in self.per_relation)

    @property
    def relations(self) -> int:
        return len(self.per_relation)

    @property
    def leaks(self) -> int:
        return sum(o.leak for o in self.per_object)

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTS}


#: The counts of an ObjectReport, by name.
COUNTS: tuple[str, ...] = ("objects", "matched", "colour_ok", "shape_ok", "size_ok", "size_stated", "position_ok",
                           "position_stated", "relations_ok", "relations", "leaks")


def report_of_judgement(judgement: Judgement, caption: str | SceneSpec) -> ObjectReport:
    """The object report of an image the judge has already judged against ``caption``."""
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    if len(judgement.assignment) != len(spec.objects):
        raise ValueError(f"the judgement matches {len(judgement.assignment)} objects but "
                         f"{caption_of_spec(spec)!r} has {len(spec.objects)}")
    blobs = judgement.blobs
    colour_of = {o.color: i for i, o in enumerate(spec.objects)}
    per_object = []
    for i, (o, j) in enumerate(zip(spec.objects, judgement.assignment)):
        if j is None:
            per_object.append(ObjectResult(o, None, False, False, False if o.size else None,
                                           False if o.position else None, None))
            continue
        b = blobs[j]
        s_size = size_satisfaction(b, o.size) if o.size else None
        s_pos = position_satisfaction(b, o.position) if o.position else None
        other = colour_of.get(b.color)
        per_object.append(ObjectResult(
            spec=o,
            blob=j,
            colour_ok=b.color == o.color,
            shape_ok=b.shape == o.shape,
            size_ok=None if s_size is None else s_size >= SATISFIED,
            position_ok=None if s_pos is None else s_pos >= SATISFIED,
            leak_from=other if other is not None and other != i else None,
            size_satisfaction=s_size,
            position_satisfaction=s_pos,
        ))
    per_relation = []
    for r in spec.relations:
        a, b = judgement.assignment[r.subject], judgement.assignment[r.object]
        s = None if a is None or b is None else relation_satisfaction(blobs[a], r.relation, blobs[b])
        per_relation.append(RelationResult(r, s is not None and s >= SATISFIED, s))
    return ObjectReport(caption_of_spec(spec), tuple(per_object), tuple(per_relation), float(judgement.score))


def object_report(image, caption: str | SceneSpec) -> ObjectReport:
    """Per caption object: matched, colour, shape, size, position, leak; per relation: satisfied.

    ``image``: anything :func:`hgdpo.world.judge.judge` accepts.  See the module docstring.
    """
    return report_of_judgement(judge_details(image, caption), caption)


#: Each rate of ``summarize``: name -> (count of successes, count it is a fraction of).
RATES: dict[str, tuple[str, str]] = {
    "object_found": ("matched", "objects"),
    "object_colour_acc": ("colour_ok", "objects"),
    "object_shape_acc": ("shape_ok", "objects"),
    "object_size_acc": ("size_ok", "size_stated"),
    "object_position_acc": ("position_ok", "position_stated"),
    "relation_acc": ("relations_ok", "relations"),
    "leakage": ("leaks", "objects"),
}


def summarize(reports_a: Sequence[ObjectReport], reports_b: Sequence[ObjectReport], groups: Sequence, *,
              resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Object-level rates of sides A and B and their paired difference, with bootstrap intervals.

    ``reports_a[i]`` and ``reports_b[i]`` are the same comparison (prompt and seed; their captions
    must agree); ``groups[i]`` its prompt (any labels).  Each rate is a ratio of sums over all
    images (see ``RATES``).  Returns a flat dict of floats: for each rate ``r``, ``r_a``,
    ``r_a_low``, ``r_a_high``, the same for ``b``, and ``r_diff`` (A - B), ``r_diff_low``,
    ``r_diff_high``; plus the denominators (``objects``, ``objects_size_stated``,
    ``objects_position_stated``, ``relations``).  A rate whose denominator is 0 (no caption
    states a size, say) is left out; a resample in which it is 0 is left out of that rate's
    interval.
    """
    n = len(reports_a)
    if n == 0:
        raise ValueError("summarize: no reports")
    if len(reports_b) != n or len(groups) != n:
        raise ValueError(f"summarize: {n} reports of A, {len(reports_b)} of B and {len(groups)} groups; "
                         "they must be paired one to one")
    for i, (ra, rb) in enumerate(zip(reports_a, reports_b)):
        if ra.caption != rb.caption:
            raise ValueError(f"summarize: comparison {i} pairs {ra.caption!r} (A) with {rb.caption!r} (B)")
    if resamples < 1:
        raise ValueError(f"summarize: resamples={resamples} must be at least 1")
    if not 0 < confidence < 1:
        raise ValueError(f"summarize: confidence={confidence} must be in (0, 1)")

    _, index = np.unique(np.asarray(groups), return_inverse=True)
    k = int(index.max()) + 1

    def per_prompt(reports: Sequence[ObjectReport], name: str) -> np.ndarray:  # (k,)
        return np.bincount(index, weights=[getattr(r, name) for r in reports], minlength=k)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, k, size=(resamples, k))  # as win_rate draws prompts
    tail = (1 - confidence) / 2
    out: dict[str, float] = {}
    for count, key in (("objects", "objects"), ("size_stated", "objects_size_stated"),
                       ("position_stated", "objects_position_stated"), ("relations", "relations")):
        out[key] = float(sum(getattr(r, count) for r in reports_a))
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, (num, den) in RATES.items():
            d = per_prompt(reports_a, den)
            if d.sum() == 0:
                continue
            a, b = per_prompt(reports_a, num), per_prompt(reports_b, num)
            d_star = d[draws].sum(axis=1)  # (resamples,)
            a_star, b_star = a[draws].sum(axis=1) / d_star, b[draws].sum(axis=1) / d_star
            for side, rate, star in (("a", a.sum() / d.sum(), a_star), ("b", b.sum() / d.sum(), b_star),
                                     ("diff", (a.sum() - b.sum()) / d.sum(), a_star - b_star)):
                low, high = np.nanquantile(star, [tail, 1 - tail])
                out.update({f"{name}_{side}": float(rate), f"{name}_{side}_low": float(low),
                            f"{name}_{side}_high": float(high)})
    return out
