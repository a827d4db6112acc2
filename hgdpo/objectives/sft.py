"""The paper's SFT baseline: the noise-prediction loss on the winners alone (no reference, no loser)."""

from __future__ import annotations

import torch

from hgdpo.objectives.base import Objective, Predictions
from hgdpo.objectives.losses import sft_loss


class SFT(Objective):
    name = "sft"
    summary = "the noise-prediction loss on winners (the paper's SFT baseline)"
    pairwise = False
    dpo_family = False
    term = "sft"
    uses_beta = False

    def loss(self, pred: Predictions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = sft_loss(pred.policy, pred.noise)
        return loss, {"sft": loss.detach()}
