"""The miniature world's judge (``hgdpo.world.judge``): a program, not a model, scoring in [0, 1] how
well an image shows its caption. It reads only captions of the world's grammar (``hgdpo.world.scene``),
and refuses other prompts before any work (``check_prompts``)."""

from __future__ import annotations

import numpy as np

from hgdpo.scorers.base import Scorer, ScorerError, ScorerSpec
from hgdpo.world.judge import judge_batch
from hgdpo.world.scene import parse_caption


class JudgeScorer(Scorer):
    """The world's programmatic judge; loads no model, scores every image at once."""

    name = "judge"
    batch = None

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
