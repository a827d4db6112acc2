"""The report hook a scorer may offer beside its scores, and the judge's: the world's object report.

A score says how good an image is; a report hook says what the scorer reads in it, and what that
comes to over many images of two models. Evaluation (``hgdpo.evaluate.eval_result``) and the duels
(``hgdpo.report.duel``) ask ``report_hook(name)`` of every scorer they ran and use whichever hooks
they get; they know nothing of the scorer behind one.

Only the judge has a hook: the miniature world's object-level report (``hgdpo.world.objects``): per
caption object whether its colour, shape, size and position are right, per relation whether it
holds, and attribute leakage, read off the judge's own decision. This module is the one way the
evaluation and reporting stages reach that report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from hgdpo.world.objects import object_report, summarize


@dataclass(frozen=True)
class ReportHook:
    """What a scorer reads in images beyond their scores.

    ``read(image, prompt)``: what it reads in one (H, W, 3) uint8 image of ``prompt``.
    ``summarize(reads_a, reads_b, groups, *, resamples, confidence, seed)``: A's reads against B's, paired
    one to one (``groups``: each pair's prompt), as flat figures: for each rate ``r`` of ``rates``,
    ``r_a``, ``r_b`` and ``r_diff`` (A - B), each with ``_low`` and ``_high`` (a bootstrap interval over
    prompts), and any counts the rates are fractions of.
    """

    kind: str  # what the figures are of; it names them in the duels' metrics (h2h_<a>_over_<b>_<kind>_<rate>)
    source: str  # who reads the images, as the tables say
    rates: tuple[tuple[str, str], ...]  # (figure, label) of each rate the tables show, in their order
    read: Callable[[Any, str], Any]
    summarize: Callable[..., dict[str, float]]


#: The judge's hook: the world's object report of each image, and its rates of A's images against B's.
JUDGE_REPORT = ReportHook(
    kind="objects", source="the world's judge",
    rates=(("object_colour_acc", "colour right"), ("object_shape_acc", "shape right"),
           ("object_size_acc", "size right (where stated)"),
           ("object_position_acc", "position right (where stated)"),
           ("relation_acc", "relation right"), ("leakage", "attribute leakage")),
    read=object_report, summarize=summarize)

_HOOKS = {"judge": JUDGE_REPORT}


def report_hook(scorer: str) -> ReportHook | None:
    """The report hook scorer ``scorer`` offers, or None (every scorer but the judge)."""
    return _HOOKS.get(scorer)


def report_hooks(scorers: list[str]) -> list[ReportHook]:
    """The hooks that the scorers ``scorers`` offer, in their order."""
    return [hook for hook in map(report_hook, scorers) if hook is not None]
