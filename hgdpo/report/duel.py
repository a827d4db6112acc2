"""Duels: one adapter's images against another's, on the same prompts and seeds.

Every evaluation of a sweep (or any two evaluations made alike) holds A's images of the same
(prompt, seed) comparisons, so two of them can meet head to head without making an image:
``compare_outputs`` pairs the A images of two evaluation folders by (prompt, seed) and gives each
scorer's win rate with a bootstrap interval over prompts, and the figures of the scorers' report
hooks (``hgdpo.scorers.registry.report_hooks``: the judge's object-level rates), A's minus B's.
``head_to_head`` meets a sweep's finished trials two by two (``duel_pairs``), and ``duel_metrics``
names a duel's figures as the sweep's parent run records them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from hgdpo.evaluate.scores_file import read_scores
from hgdpo.pool.store import png_image
from hgdpo.report.winrates import WinRate, win_rate
from hgdpo.scorers.base import ReportHook
from hgdpo.scorers.registry import report_hooks
from hgdpo.sweep.config import Trial

ORDER = [("prompt_id", "ascending"), ("k", "ascending")]  # the comparisons of an evaluation, in one order


@dataclass
class Duel:
    """Trial ``a``'s adapter against trial ``b``'s, on the same prompts and seeds (their A sides)."""

    a: Trial
    b: Trial
    rates: dict[str, WinRate]  # scorer -> its win rate of A over B
    objects: dict[str, float] = field(default_factory=dict)  # the report hooks' rates (the judge's objects), A - B


def hook_reads(output: str, hook: ReportHook) -> tuple[list[str], list]:
    """The prompt of each (prompt, seed) comparison of the evaluation in ``output``, in ``a_scores``'s order,
    and what ``hook`` reads in its A image (the judge's: the world's object report)."""
    table = read_scores(output, columns=["prompt_id", "k", "prompt", "image_a"]).sort_by(ORDER)
    return table.column("prompt_id").to_pylist(), [
        hook.read(png_image(png), prompt)
        for png, prompt in zip(table.column("image_a").to_pylist(), table.column("prompt").to_pylist())]


def a_scores(output: str, scorers: list[str]) -> pa.Table:
    """The ids, seeds and A's scores of every (prompt, seed) comparison of the evaluation in ``output``."""
    columns = ["prompt_id", "k", "seed", *(f"score_a_{s}" for s in scorers)]
    return read_scores(output, columns=columns).sort_by(ORDER)


def compare_outputs(a: str, b: str, scorers: list[str], *, resamples: int = 2000, confidence: float = 0.95,
                    seed: int = 0, reads: dict | None = None) -> tuple[dict[str, WinRate], dict[str, float]] | None:
    """The A images of evaluation folder ``a`` against those of ``b``, paired by (prompt, seed): each
    scorer's win rate (``winrates.WinRate``) with a bootstrap interval over prompts and the figures of the
    report hooks ``scorers`` offer (the judge's object-level rates, A's minus B's). None when the two were
    not made on the same prompts and seeds. ``reads``: the hooks' reads by (kind, folder), filled here, so
    that a folder in several comparisons is read once."""
    sa, sb = a_scores(a, scorers), a_scores(b, scorers)
    if not all(sa.column(c).equals(sb.column(c)) for c in ("prompt_id", "k", "seed")):
        return None
    groups = sa.column("prompt_id").to_numpy()
    rates = {s: win_rate(sa.column(f"score_a_{s}").to_numpy(), sb.column(f"score_a_{s}").to_numpy(), groups,
                         resamples=resamples, confidence=confidence, seed=seed) for s in scorers}
    reads = {} if reads is None else reads
    figures: dict[str, float] = {}
    for hook in report_hooks(scorers):
        for output in (a, b):
            if (hook.kind, output) not in reads:
                reads[hook.kind, output] = hook_reads(output, hook)
        (prompts, ra), (_, rb) = reads[hook.kind, a], reads[hook.kind, b]
        figures.update(hook.summarize(ra, rb, prompts, resamples=resamples, confidence=confidence, seed=seed))
    return rates, figures


def duel_pairs(trials: list[Trial], named: list[list[str]] | None = None) -> list[tuple[Trial, Trial]]:
    """Which trials meet head to head: the ``named`` [A, B] pairs whose trials are both among ``trials``;
    by default each with the one before it in the sweep's order, and (with more than two) the last with
    the first: N-20 against N-2, the tables' extremes."""
    if named:
        by_name = {t.name: t for t in trials}
        return [(by_name[a], by_name[b]) for a, b in named if a in by_name and b in by_name]
    pairs = list(zip(trials[1:], trials[:-1]))
    return pairs + ([(trials[-1], trials[0])] if len(trials) > 2 else [])


def head_to_head(trials: list[Trial], named: list[list[str]] | None = None) -> list[Duel]:
    """The paired comparisons of finished trials (``duel_pairs``, ``compare_outputs``): every trial is
    evaluated on the same prompts and seeds, so the win rate of one adapter over another is measured on the
    same comparisons, with a bootstrap interval over prompts (the evaluate config's ``bootstrap``,
    ``confidence``, ``seed``). Trials evaluated on other prompts or seeds, or with no scorer in common, are
    not paired."""
    reads: dict[tuple[str, str], tuple[list[str], list]] = {}  # the hooks' reads by evaluation, made once
    duels = []
    for a, b in duel_pairs(trials, named):
        common = [s for s in a.evaluate.scorers if s in b.evaluate.scorers]
        ev = a.evaluate
        found = compare_outputs(a.evaluate.output, b.evaluate.output, common, resamples=ev.bootstrap,
                                confidence=ev.confidence, seed=ev.seed, reads=reads) if common else None
        if found is not None:
            duels.append(Duel(a, b, *found))
    return duels


def hook_rates(hook: ReportHook, figures: dict[str, float]) -> list[str]:
    """The rates of ``hook`` that a duel's ``figures`` hold."""
    return [rate for rate, _ in hook.rates if f"{rate}_diff" in figures]


def duel_metrics(duel: Duel) -> dict[str, float]:
    """A duel as the parent run's metrics: ``h2h_<a index>_over_<b index>_<scorer>`` and its ``_low`` / ``_high``;
    each report hook's rate as ``h2h_<a index>_over_<b index>_<kind>_<rate>`` (the judge's: ``..._objects_...``)."""
    out = {}
    prefix = f"h2h_{duel.a.index}_over_{duel.b.index}"
    for scorer, r in duel.rates.items():
        key = f"{prefix}_{scorer}"
        out.update({key: r.rate, f"{key}_low": r.low, f"{key}_high": r.high})
    for hook in report_hooks(list(duel.rates)):
        for rate in hook_rates(hook, duel.objects):
            key = f"{prefix}_{hook.kind}_{rate}"
            out.update({key: duel.objects[f"{rate}_diff"], f"{key}_low": duel.objects[f"{rate}_diff_low"],
                        f"{key}_high": duel.objects[f"{rate}_diff_high"]})
    return out
