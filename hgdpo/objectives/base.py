"""The objective protocol: what training asks of an objective, and what it hands one.

An objective is one class in one file of this package, listed in ``hgdpo.objectives.registry``. It says:

* its settings: ``Settings``, a dataclass of the train config's keys that are its own (``focus_*``,
  ``ospo_*``, ...), mixed into ``TrainConfig`` so the YAML keys stay flat; ``check`` refuses bad values;
* how it selects pairs from a pool: ``selection`` names the rule, ``pool_columns`` the pool columns it
  reads beyond the scores, ``choose`` the pairs of a row group, ``per_prompt`` how many a prompt gives;
* what the forward passes must give it: ``pairwise`` (the loser too), ``recording`` (a context the
  reference pass runs in, e.g. to capture cross-attention);
* its loss from the shared ``Predictions`` of a micro-batch: ``loss``;
* its picture for MLflow (``picture_name``, ``picture``), logged once at a run's first step.

Objectives of the Diffusion-DPO family (``dpo_family``) take the regularisers: statistic matching
(``lambda_stat``, ``hgdpo.objectives.stat_matching``) is added by the training step to any of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

from hgdpo.objectives.losses import per_sample_error, weighted_per_sample_error

PICTURE_TIMESTEPS = (100, 500, 900)  # a picture's low, middle and high noise (the default focus ramp: 600 to 300)
PICTURE_PAIRS = 4  # pairs in a picture


def choose_pair(scores: np.ndarray, n: int, loser_rank: int) -> tuple[int, int]:
    """(winner, loser) indices among the first ``n`` images, ranked by score (ties: lower index)."""
    order = np.argsort(-np.asarray(scores[:n]), kind="stable")
    return int(order[0]), int(order[loser_rank - 1])


@dataclass
class Predictions:
    """One micro-batch of m pairs, each noised with its own timestep and noise draw (shared by the pair's
    two images), and the UNet's noise predictions on it."""

    t: torch.Tensor  # (m,)
    noise: torch.Tensor  # (m, C, h, w): the target of every prediction
    lat_w: torch.Tensor  # (m, C, h, w): the clean latents
    lat_l: torch.Tensor
    policy: torch.Tensor  # (2m, C, h, w): the winners', then the losers' ((m, ...) for a winner-only objective)
    ref: torch.Tensor | None  # the same for the reference (adapters off, no grad); None when not run
    attention: Any = None  # what the objective's ``recording`` captured in the reference pass
    nouns: list | None = None  # per pair, its prompt's noun token groups (pools with them)

    @property
    def m(self) -> int:
        return len(self.t)

    def targets(self) -> torch.Tensor:
        """The noise, once per predicted image: (2m, C, h, w) (or (m, ...))."""
        return torch.cat([self.noise] * (len(self.policy) // self.m))

    def errors(self, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy, reference) per-image errors, (2m,) each; ``weight`` (2m, 1 or C, h, w) weighs each position."""
        noise = self.targets()
        if weight is None:
            return per_sample_error(noise, self.policy), per_sample_error(noise, self.ref)
        return weighted_per_sample_error(noise, self.policy, weight), weighted_per_sample_error(noise, self.ref, weight)


@dataclass(frozen=True)
class Chosen:
    """The pairs a selection takes from one row group of a pool part."""

    rows: np.ndarray  # (k,) row positions in the group; a row appears once per pair it gives
    pairs: list[tuple[int, int]]  # (winner, loser) image positions of each pair, in the pool's latent numbering
    scores: list[tuple[float, float]]  # the (winner, loser) scores that chose them


class Objective:
    """The base: Diffusion-DPO's interface with its defaults. A subclass overrides what differs."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line, for the ``objective`` setting's documentation
    Settings: ClassVar[type | None] = None  # its own train-config keys (a kw_only dataclass with TRAILING = True)
    selection: ClassVar[str] = "rank"  # the pool's ranking: the best and the loser_rank-th of the first n
    pool_columns: ClassVar[tuple[str, ...]] = ()  # pool columns ``choose`` reads besides ``scores``
    per_prompt: ClassVar[str] = "one"  # pairs a prompt gives: "one", "at most one" or "many"
    pairwise: ClassVar[bool] = True  # predictions on the loser as well as the winner
    dpo_family: ClassVar[bool] = True  # takes statistic matching (``lambda_stat``) as a regulariser
    default_lambda_stat: ClassVar[float] = 0.0  # ``lambda_stat`` when the config leaves it unset
    uses_beta: ClassVar[bool] = True
    needs_nouns: ClassVar[bool] = False  # the pair records carry each prompt's noun tokens (for masks)
    term: ClassVar[str] = "dpo"  # the metric of its own loss, shown in the console's step line
    picture_name: ClassVar[str | None] = None  # its MLflow artifact, e.g. "focus/weights.png"

    def __init__(self, cfg: Any):
        self.cfg = cfg  # the TrainConfig

    # -- settings ---------------------------------------------------------------------------
    @classmethod
    def own_fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls.Settings) if cls.Settings is not None else ()

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Refuse bad values of the objective's own settings (ConfigError naming the key)."""

    def check_model(self, unet_config: dict, model: str) -> None:
        """Refuse a base model the objective cannot train (HgdpoError naming the setting)."""

    def plan_margin(self) -> float:
        """The least margin the selection asks of a pair (a pair plan's ``margin``)."""
        return 0.0

    def check_pool(self, meta: dict) -> None:
        """Refuse a pool the objective cannot read (HgdpoError naming the setting)."""

    # -- pairs ------------------------------------------------------------------------------
    @classmethod
    def choose(cls, small: pa.Table, keep: np.ndarray, pool_size: int, loser_rank: int, margin: float) -> Chosen:
        """The pairs of the rows ``keep`` of a row group (``small``: its small columns): by score, the best and
        the ``loser_rank``-th of the first ``pool_size`` images (ties: the lower index)."""
        scores = small.column("scores").to_pylist()
        pairs = [choose_pair(np.asarray(scores[r]), pool_size, loser_rank) for r in keep]
        return Chosen(np.asarray(keep, np.int64), pairs, [(scores[r][w], scores[r][l]) for r, (w, l) in zip(keep, pairs)])

    # -- the step ---------------------------------------------------------------------------
    def recording(self, unet) -> contextlib.AbstractContextManager:
        """A context the reference pass runs in; what it yields becomes ``Predictions.attention``."""
        return contextlib.nullcontext()

    def loss(self, pred: Predictions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def picture(self, unet, noise_scheduler, lat_w: torch.Tensor, lat_l: torch.Tensor, emb: torch.Tensor,
                noise: torch.Tensor, nouns: list | None, autocast):
        """A PIL picture of the objective's weights on a few pairs (``noise``: each pair's draw of the step), or
        None. Reference passes only (no grad, adapters off, no random draw): training is unchanged."""
        return None


def reference_pass(unet, noisy: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The reference's noise prediction: the same UNet with its adapters disabled, no grad."""
    with torch.no_grad():
        unet.disable_adapters()
        try:
            return unet(noisy, t, encoder_hidden_states=emb).sample.float()
        finally:
            unet.enable_adapters()
