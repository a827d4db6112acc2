"""Diffusion-KTO (Li et al., "Aligning Diffusion Models by Optimizing Human Utility", arXiv 2404.04465):
learning from a label per image, desirable or undesirable, instead of from pairs.

**The data.** Every image of a pool's prompt is labelled against the others of its prompt: among the
first n (``pool_size``), those scored above the prompt's median are desirable, those below undesirable,
and an image at the median is neither. So all n images teach, where DPO uses two. The trainer reads
pairs, so ``choose`` deals each prompt's labelled images into records of one desirable and one
undesirable image (the best desirable with the best undesirable, and so on): about n/2 records a prompt.
A record's two images are noised alike, but the loss treats them one by one: nothing compares them.

**The loss.** With ``e`` an image's denoising error (``per_sample_error``) under the policy and under the
reference, the implicit reward is ``r = e_ref - e_policy``, the Gaussian log-likelihood ratio of the
policy's reverse step over the reference's, up to the per-timestep factor folded into ``beta`` (as in
Diffusion-DPO, eq. 3). Kahneman-Tversky's value is taken against a reference point ``z``, an estimate of
the policy's divergence from the reference: the batch's mean reward, floored at 0 and held constant.
Per image, with ``y = +1`` (desirable) or ``-1`` (undesirable):

    v = sigmoid(beta * y * (r - z)),       loss = mean over images of  lambda_y * (1 - v)

The loss falls when a desirable image's reward rises above the reference point, or an undesirable one's
falls below it. ``lambda_d`` and ``lambda_u`` weigh the two kinds (``kto_lambda_d``, ``kto_lambda_u``;
the paper's default is 1 each, and the labels here are balanced). ``z`` is the micro-batch's mean, so it
depends on ``micro_batch``; the paper averages it over every device's batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from hgdpo.config.core import doc
from hgdpo.errors import ConfigError, HgdpoError
from hgdpo.objectives.base import Chosen, Objective, Predictions


@dataclass(kw_only=True)
class KtoConfig:
    """The ``kto`` objective's keys of the train config."""

    TRAILING = True  # listed after the trainer's own settings

    kto_lambda_d: float = doc("kto: weight of a desirable image's loss (an image above its prompt's median score).",
                              1.0, above=0, resume="if-set", sweep=True)
    kto_lambda_u: float = doc("kto: weight of an undesirable image's loss (below its prompt's median score).", 1.0,
                              above=0, resume="if-set", sweep=True)


def utility_labels(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(desirable, undesirable) image positions of one prompt's ``scores``: above and below their median, each
    best first (ties: the lower index)."""
    scores = np.asarray(scores, np.float64)
    median = np.median(scores)
    order = np.argsort(-scores, kind="stable")
    return order[scores[order] > median], order[scores[order] < median]


def kto_loss(policy_err: torch.Tensor, ref_err: torch.Tensor, desirable: torch.Tensor, beta: float,
             lambda_d: float = 1.0, lambda_u: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-KTO's loss of ``k`` images (see the module docstring).

    Args:
        policy_err, ref_err: ``(k,)`` each image's denoising error under the policy and the reference
            (the reference's is a constant: detached here).
        desirable: ``(k,)`` bool, the image's label.
        beta: > 0, in Diffusion-DPO's convention (``hgdpo.objectives.losses.dpo_loss``).

    Returns:
        ``(loss, stats)``: ``stats`` detached: ``accuracy`` (images on the right side of the reference point; at
        it, half), ``kl`` (the reference point ``z``), ``reward_d`` and ``reward_u`` (mean reward of each kind).
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive (got {beta})")
    if policy_err.dim() != 1 or policy_err.shape != ref_err.shape or desirable.shape != policy_err.shape:
        raise ValueError(f"errors and labels must have one shape (k,); got {tuple(policy_err.shape)}, "
                         f"{tuple(ref_err.shape)}, {tuple(desirable.shape)}")
    reward = ref_err.detach() - policy_err  # (k,)
    z = reward.detach().mean().clamp_min(0)  # the reference point: a constant of the loss
    sign = desirable.to(reward.dtype) * 2 - 1  # +1 desirable, -1 undesirable
    inside = beta * sign * (reward - z)  # (k,)
    weight = torch.where(desirable, torch.as_tensor(lambda_d, dtype=reward.dtype),
                         torch.as_tensor(lambda_u, dtype=reward.dtype)).to(reward.device)
    loss = (weight * (1 - torch.sigmoid(inside))).mean()
    with torch.no_grad():
        inside = inside.detach()
        stats = {"accuracy": (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean(), "kl": z,
                 "reward_d": reward.detach()[desirable].mean(), "reward_u": reward.detach()[~desirable].mean()}
    return loss, stats


class KTO(Objective):
    name = "kto"
    summary = ("Diffusion-KTO: every image above its prompt's median score is desirable, every one below it "
               "undesirable, each learnt alone (all n images of a prompt, where DPO uses two)")
    Settings = KtoConfig
    selection = "utility"
    per_prompt = "many"
    term = "kto"

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.objective == cls.name and cfg.loser_rank is not None:
            raise ConfigError(f"{cfg.SECTION}.loser_rank: kto labels every image by its prompt's median score and "
                              f"picks no loser; remove it")

    def check_pool(self, meta: dict) -> None:
        if meta["config"].get("keep") == "pair":
            raise HgdpoError(f"train.objective: kto learns from every image of a prompt, but the pool "
                             f"{meta['config']['output']} keeps only its winner and loser latents (keep: pair); "
                             f"build one with keep: all")

    @classmethod
    def choose(cls, small: pa.Table, keep: np.ndarray, pool_size: int, loser_rank: int, margin: float) -> Chosen:
        scores = small.column("scores").to_pylist()
        rows, pairs = [], []
        for r in keep:
            good, bad = utility_labels(scores[r][:pool_size])
            for w, u in zip(good, bad):
                rows.append(r)
                pairs.append((int(w), int(u)))
        return Chosen(np.asarray(rows, np.int64), pairs, [(scores[r][w], scores[r][u]) for r, (w, u) in zip(rows, pairs)])

    def loss(self, pred: Predictions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy_err, ref_err = pred.errors()  # (2m,): the desirable images, then the undesirable
        desirable = torch.arange(len(policy_err), device=policy_err.device) < pred.m
        loss, stats = kto_loss(policy_err, ref_err, desirable, self.cfg.beta, self.cfg.kto_lambda_d,
                               self.cfg.kto_lambda_u)
        return loss, dict(stats, kto=loss.detach())
