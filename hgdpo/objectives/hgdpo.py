"""HG-DPO (eq. 9): Diffusion-DPO with statistic matching on by default (``lambda_stat`` 10000, the paper's)."""

from __future__ import annotations

from hgdpo.objectives.dpo import DPO
from hgdpo.objectives.stat_matching import LAMBDA_STAT


class HGDPO(DPO):
    name = "hgdpo"
    summary = "Diffusion-DPO + statistic matching (eq. 9)"
    default_lambda_stat = LAMBDA_STAT
