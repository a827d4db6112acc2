"""Diffusion-DPO (HG-DPO eq. 3): the winner's error should fall against the reference more than the loser's."""

from __future__ import annotations

import torch

from hgdpo.objectives.base import Objective, Predictions
from hgdpo.objectives.losses import dpo_loss


class DPO(Objective):
    name = "dpo"
    summary = "Diffusion-DPO (eq. 3) on the pool's best and loser_rank-th images"

    def loss(self, pred: Predictions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.pair_loss(pred, *pred.errors())

    def pair_loss(self, pred: Predictions, policy_err: torch.Tensor, ref_err: torch.Tensor):
        """eq. 3 on per-image errors (2m,) each: the winners', then the losers'."""
        m = pred.m
        loss, stats = dpo_loss(policy_err[:m], policy_err[m:], ref_err[:m], ref_err[m:], beta=self.cfg.beta)
        return loss, dict(stats, dpo=loss.detach())
