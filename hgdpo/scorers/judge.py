"""The miniature world's judge (``hgdpo.world.judge``) as a scorer, and the one door from the product's
stages to the world (with the embedded model loader, ``hgdpo.models.embedded``).

The judge is a program, not a model, scoring in [0, 1] how well an image shows its caption. It reads
only captions of the world's grammar (``hgdpo.world.scene``) and refuses other prompts before any work
(``check_prompts``). What else a stage needs of the world goes through this module, so that the world
can be left out of a deployment by leaving out its scorer:

* the judge's **report hook** (``JudgeScorer.report``): the world's object-level report
  (``hgdpo.world.objects``): per caption object whether its colour, shape, size and position are right,
  per relation whether it holds, and attribute leakage, read off the judge's own decision. Evaluation
  and the duels find it with ``hgdpo.scorers.registry.report_hooks``;
* the **captions it reads**, for OSPO's negatives (``hgdpo.pool.perturb``): ``parse_caption`` tells a
  world caption from free text, and ``scene_kinds``/``scene_objects``/``scene_perturb``
  (``hgdpo.world.perturb``) perturb one exactly on its scene spec, so the judge knows the negative false;
* ``judge_details``: the judge's decision on one image (its unmet constraints), for the runbook's
  Fig. 5a (``hgdpo.replication``).
"""

from __future__ import annotations

import numpy as np

from hgdpo.scorers.base import ReportHook, Scorer, ScorerError, ScorerSpec
from hgdpo.world.judge import judge_batch, judge_details
from hgdpo.world.objects import object_report, summarize
from hgdpo.world.perturb import scene_kinds, scene_objects, scene_perturb
from hgdpo.world.scene import SceneSpec, parse_caption

__all__ = ["JUDGE_REPORT", "JudgeScorer", "SceneSpec", "judge_details", "parse_caption", "scene_kinds",
           "scene_objects", "scene_perturb"]

#: The judge's hook: the world's object report of each image, and its rates of A's images against B's.
JUDGE_REPORT = ReportHook(
    kind="objects", source="the world's judge",
    rates=(("object_colour_acc", "colour right"), ("object_shape_acc", "shape right"),
           ("object_size_acc", "size right (where stated)"),
           ("object_position_acc", "position right (where stated)"),
           ("relation_acc", "relation right"), ("leakage", "attribute leakage")),
    read=object_report, summarize=summarize)


class JudgeScorer(Scorer):
    """The world's programmatic judge; loads no model, scores every image at once."""

    name = "judge"
    batch = None
    report = JUDGE_REPORT

    @classmethod
    def check(cls, spec: ScorerSpec, allow_pickle: bool = False) -> None:
        for field in ("model", "processor"):
            if getattr(spec, field) is not None:
                raise cls.error(field, "the judge is a program and loads no model; leave it unset")

    @classmethod
    def check_prompts(cls, prompts: list[str]) -> None:
        """Every prompt must be a caption of the world's grammar; raises naming the first that is not."""
        for i, prompt in enumerate(prompts):
            try:
                parse_caption(prompt)
            except ValueError:
                raise ScorerError(cls.name, None, f"prompt {i + 1} ({prompt!r}) is not a caption of the miniature "
                                                  f"world's grammar, the only prompts the judge can read; choose "
                                                  f"another scorer for other prompts") from None

    @classmethod
    def load(cls, spec: ScorerSpec, *, allow_pickle: bool = False, device: str = "cpu", dtype=None,
             attention: str | None = None) -> JudgeScorer:
        cls.check(spec, allow_pickle)
        return cls()

    def score_batch(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        return judge_batch(images, prompts)
