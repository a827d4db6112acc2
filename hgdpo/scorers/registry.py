"""The scorers by name, and the interface the pool and the evaluation use.

Each scorer is one class in its own module of ``hgdpo.scorers`` (``hgdpo.scorers.base.Scorer``): its
name, defaults, files, checks, loading and scores. A new scorer is that module and its line in
``SCORERS``; the evaluation's settings of its files come from its ``model_setting`` and
``processor_setting`` (``hgdpo.evaluate.config``), and a pool may rank by it (``pool.scorer``).

=============  ==========================================  =========================================
name           model (default)                             processor (default)
=============  ==========================================  =========================================
judge          none: the miniature world's program         none
pickscore      CLIP folder or hub id (``embedded``)        processor folder or hub id (the model's)
clip           CLIP folder or hub id (``embedded``)        the model's own
aesthetic      LAION aesthetic MLP weights, required       the CLIP it reads (ViT-L/14)
hpsv2          HPSv2 checkpoint, required                  open_clip architecture or .json (ViT-H-14)
imagereward    ImageReward checkpoint or folder, required  BERT tokenizer (beside it, else the hub's)
=============  ==========================================  =========================================

Scores: judge in [0, 1]; PickScore ``logit_scale * cos``; CLIP score ``100 * max(cos, 0)``; the
aesthetic MLP's rating; HPSv2's cosine; ImageReward's normalised reward. Win rates and a pool's ranking
need only the order within a scorer.

A scorer may also offer a **report hook** (``Scorer.report``, ``hgdpo.scorers.base.ReportHook``): what it
reads in an image beyond its score, and what that comes to over two models' images. Evaluation
(``hgdpo.evaluate.eval_result``) and the duels (``hgdpo.report.duel``) ask ``report_hooks`` of the
scorers they ran and use whichever hooks they get, knowing nothing of the scorer behind one. Only the
judge has one (the world's object report).
"""

from __future__ import annotations

from hgdpo.scorers.aesthetic import AestheticScorer
from hgdpo.scorers.base import ReportHook, Scorer, ScorerError, ScorerSpec
from hgdpo.scorers.clip import ClipScorer
from hgdpo.scorers.hpsv2 import HPSv2Scorer
from hgdpo.scorers.imagereward import ImageRewardScorer
from hgdpo.scorers.judge import JudgeScorer
from hgdpo.scorers.pickscore import PickScoreScorer

SCORERS: dict[str, type[Scorer]] = {
    "judge": JudgeScorer,
    "pickscore": PickScoreScorer,
    "clip": ClipScorer,
    "aesthetic": AestheticScorer,
    "hpsv2": HPSv2Scorer,
    "imagereward": ImageRewardScorer,
}
SCORER_NAMES = tuple(SCORERS)


def scorer_class(name: str) -> type[Scorer]:
    """The class of scorer ``name``; refuses an unknown name."""
    if name not in SCORERS:
        raise ScorerError(name, "name", f"unknown scorer; known: {', '.join(SCORER_NAMES)}")
    return SCORERS[name]


def check_scorer(spec: ScorerSpec, *, allow_pickle: bool = False) -> None:
    """Fast check before any work: the name is known, the paths exist and look like that scorer,
    a pickle file is refused unless ``allow_pickle``, a checkpoint's keys and shapes fit its scorer. Raises
    ``ScorerError`` naming the scorer and the field/file. Loads configs and headers, not weights."""
    scorer_class(spec.name).check(spec, allow_pickle)


def check_prompts(spec: ScorerSpec, prompts: list[str]) -> None:
    """Refuse prompts the scorer cannot read (the judge reads only the world's captions), naming the first."""
    scorer_class(spec.name).check_prompts(prompts)


def load_scorer(spec: ScorerSpec, *, allow_pickle: bool = False, device: str = "cpu", dtype=None,
                attention: str | None = None) -> Scorer:
    """Load a scorer on ``device`` (``Scorer.load``): ``scorer(prompts, images)`` -> (B,) float64, higher =
    better; ``scorer.rank_scores(prompt, images)`` -> (N,) float32."""
    return scorer_class(spec.name).load(spec, allow_pickle=allow_pickle, device=device, dtype=dtype,
                                        attention=attention)


def report_hook(name: str) -> ReportHook | None:
    """The report hook scorer ``name`` offers, or None (every scorer but the judge)."""
    return scorer_class(name).report


def report_hooks(scorers: list[str]) -> list[ReportHook]:
    """The hooks that the scorers ``scorers`` offer, in their order."""
    return [hook for hook in map(report_hook, scorers) if hook is not None]
