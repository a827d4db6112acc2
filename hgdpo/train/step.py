"""One micro-batch's forward passes and loss, for any objective (``hgdpo.objectives``).

Winner and loser are noised with one timestep and one noise draw per pair (``pair_noise``: a function of
seed, step and pair alone, so the draw does not depend on how a batch is split over workers), then run
through the reference (the same UNet, adapters disabled, no grad) and the policy as one batch. The
objective takes its loss from those ``Predictions``; for an objective of the Diffusion-DPO family,
statistic matching (eq. 8, 9: ``hgdpo.objectives.stat_matching``) is added from the same predictions when
its weight (``TrainConfig.stat_weight``) is above 0, or always measured for an objective that defines it
(hgdpo).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from hgdpo.objectives import stat_matching
from hgdpo.objectives.base import PICTURE_PAIRS, Objective, Predictions, reference_pass
from hgdpo.objectives.registry import OBJECTIVES
from hgdpo.pool.ospo import decode_nouns


def pair_noise(seed: int, step: int, index: int, shape: tuple[int, ...], timesteps: tuple[int, int]):
    """The timestep (uniform in ``timesteps``, [low, high)) and noise of pair ``index`` at ``step``: a
    function of (seed, step, index) only."""
    digest = hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    t = torch.randint(timesteps[0], timesteps[1], (1,), generator=gen)
    return t, torch.randn(shape, generator=gen)


def stat_coefficient(cfg, noise_scheduler, t: torch.Tensor) -> torch.Tensor:
    """(m,) the noise prediction's coefficient in eq. 8's sampler step (``cfg.stat_step``): one step of the
    training DDPM schedule, or one deterministic DDIM step of the sampling schedule."""
    if cfg.stat_step == "ddpm":
        return stat_matching.ddpm_eps_coefficient(noise_scheduler, t)
    prev = stat_matching.sampling_prev_timestep(noise_scheduler, t, cfg.stat_sampler_steps)
    return stat_matching.ddim_eps_coefficient(noise_scheduler, t, prev)


def measures_stat(cfg, objective: type[Objective] | Objective) -> bool:
    """Whether the step computes the statistic-matching term: on (weight above 0), or the objective's own (hgdpo)."""
    return objective.dpo_family and (cfg.stat_weight() > 0 or objective.default_lambda_stat > 0)


def grad_norm_ratio(a: torch.Tensor, b: torch.Tensor, params) -> torch.Tensor:
    """``||d a / d params|| / ||d b / d params||``, leaving the graph for the step's own backward pass
    (two extra backward passes: taken only at a metrics step). Under fp16 autocast the unscaled
    gradients can underflow: the ratio is then rough."""
    def norm(loss):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
    return (norm(a) / norm(b).clamp_min(1e-30)).detach()


def predict(objective: Objective, model, unet, noise_scheduler, emb, lat_w, lat_l, t, noise, autocast,
            nouns=None) -> Predictions:
    """The forward passes ``objective`` needs: the policy on the noisy winners (and losers), and the reference
    on both, in the objective's ``recording``."""
    if not objective.pairwise:
        with autocast:
            policy = model(noise_scheduler.add_noise(lat_w, noise, t), t, encoder_hidden_states=emb).sample.float()
        return Predictions(t, noise, lat_w, lat_l, policy, None, nouns=nouns)
    noise2, t2, emb2 = torch.cat([noise, noise]), torch.cat([t, t]), torch.cat([emb, emb])
    noisy = noise_scheduler.add_noise(torch.cat([lat_w, lat_l]), noise2, t2)  # winner and loser: (2m, C, h, w)
    with autocast, objective.recording(unet) as recorded:
        ref = reference_pass(unet, noisy, t2, emb2)
    with autocast:
        policy = model(noisy, t2, encoder_hidden_states=emb2).sample.float()
    return Predictions(t, noise, lat_w, lat_l, policy, ref, recorded, nouns)


def micro_step(cfg, model, unet, noise_scheduler, emb, lat_w, lat_l, t, noise, autocast, probe=None, nouns=None,
               objective: Objective | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch of m pairs. ``lat_*``, ``noise``: (m, C, h, w); ``t``: (m,); ``emb``:
    (m, L, D) the prompts' text-encoder hidden states (``pair_data.encode_prompts``); ``model``: ``unet``
    or its DDP wrapper; ``autocast``: a fresh ``Precision.autocast()``. ``probe``: the LoRA parameters, to
    measure the ratio of the weighted statistic-matching term's gradient norm to the objective's,
    ``stat_dpo_grad_ratio``: how much eq. 9's second term steers the update. ``nouns``: per pair, its
    prompt's noun token groups (objectives that weigh by object masks)."""
    objective = objective or OBJECTIVES[cfg.objective](cfg)
    pred = predict(objective, model, unet, noise_scheduler, emb, lat_w, lat_l, t, noise, autocast, nouns)
    loss, stats = objective.loss(pred)
    if measures_stat(cfg, objective):
        m, weight = pred.m, cfg.stat_weight()
        coef = stat_coefficient(cfg, noise_scheduler, t).to(lat_w.device)
        loss_stat = stat_matching.stat_matching_loss(pred.policy[:m], pred.ref[:m], coef)
        stats["stat"] = loss_stat.detach()
        if probe is not None:
            stats["stat_dpo_grad_ratio"] = grad_norm_ratio(weight * loss_stat, loss, probe)
        loss = stat_matching.total_loss(loss, loss_stat, weight)
    stats["loss"] = loss.detach()
    return loss, stats


def first_picture(cfg, objective: Objective, unet, noise_scheduler, batch, index: np.ndarray, step: int,
                  device: torch.device, autocast):
    """The objective's picture (``Objective.picture``) of the first ``PICTURE_PAIRS`` pairs of a worker's
    ``batch`` at ``step`` (``index``: their pair indices), each with its noise of that step."""
    m = min(len(index), PICTURE_PAIRS)
    lat_w, lat_l, emb = (torch.from_numpy(x[:m]).to(device, torch.float32)
                         for x in (batch.latents_w, batch.latents_l, batch.hidden))  # (m, C, h, w), (m, L, D)
    timesteps = cfg.timesteps(noise_scheduler.config.num_train_timesteps)
    noise = torch.stack([pair_noise(cfg.seed, step, int(i), tuple(lat_w.shape[1:]), timesteps)[1]
                         for i in index[:m]]).to(device)
    nouns = None if batch.nouns is None else [decode_nouns(x) for x in batch.nouns[:m]]
    return objective.picture(unet, noise_scheduler, lat_w, lat_l, emb, noise, nouns, autocast)
