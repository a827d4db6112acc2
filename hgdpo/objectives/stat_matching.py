"""Statistic matching (HG-DPO arXiv 2405.20216 v1, eq. 8, 9): a regulariser for any Diffusion-DPO-family loss.

From the noisy winner, one sampler step with the policy and one with the reference differ by
``coef_t * (eps_ref - eps_policy)``; the loss is the squared distance of the two latents' channel means,
so it needs no UNet call beyond those the DPO term made:

    coef = ddpm_eps_coefficient(noise_scheduler, t)                       # (B,)
    loss_stat = stat_matching_loss(policy_eps_w, ref_eps_w, coef)
    loss = total_loss(loss_dpo, loss_stat, lambda_stat)

``ddim_eps_coefficient(noise_scheduler, t, sampling_prev_timestep(noise_scheduler, t, n))`` in place of
``ddpm_eps_coefficient`` takes eq. 8 for one step of an ``n``-step DDIM sampler rather than one DDPM step
``t -> t - 1``. Pure functions of tensors; the reference prediction and the coefficient are detached.
"""

from __future__ import annotations

import torch

from hgdpo.objectives.losses import _float, _require_same_shape

__all__ = ["ddpm_eps_coefficient", "ddim_eps_coefficient", "sampling_prev_timestep", "stat_matching_loss",
           "total_loss"]

LAMBDA_STAT = 10000.0  # the paper's weight (HG-DPO §4)


def _require_affine_in_eps(scheduler) -> None:
    """Refuse scheduler settings under which a sampler step is not affine in the noise prediction."""
    cfg = scheduler.config
    if cfg.prediction_type != "epsilon":
        raise ValueError(f"scheduler.prediction_type={cfg.prediction_type!r}: eq. 8's coefficient "
                         "is for an epsilon-prediction model (set prediction_type='epsilon')")
    if cfg.clip_sample or cfg.thresholding:
        setting = "clip_sample" if cfg.clip_sample else "thresholding"
        raise ValueError(f"scheduler.{setting}=True: clamping the predicted x0 makes the sampler step "
                         f"non-linear in the noise prediction, so eq. 8 is not coef*(eps_ref - "
                         f"eps_policy); use {setting}=False (as SD1.5's scheduler config does)")


def _require_timesteps(name: str, timesteps: torch.Tensor, num_train_timesteps: int) -> None:
    if timesteps.dim() != 1 or timesteps.is_floating_point():
        raise ValueError(f"{name} must be a (B,) integer tensor; got {tuple(timesteps.shape)} "
                         f"{timesteps.dtype}")
    if bool(((timesteps < 0) | (timesteps >= num_train_timesteps)).any()):
        raise ValueError(f"{name} must lie in [0, {num_train_timesteps}); got {timesteps.tolist()}")


def ddpm_eps_coefficient(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """``coef_t = beta_t / (sqrt(alpha_t) * sqrt(1 - alphabar_t))`` for each timestep.

    The coefficient of the noise prediction in the DDPM posterior mean
    ``mu(l^t, eps) = (l^t - beta_t / sqrt(1 - alphabar_t) * eps) / sqrt(alpha_t)``, i.e. of one
    ``DDPMScheduler.step`` from ``t`` to ``t - 1`` (the training schedule: 1000 steps, no
    ``set_timesteps``). Read from the scheduler's own ``betas``, ``alphas`` and
    ``alphas_cumprod`` (computed in float64, returned as float32). At ``t = 0``
    (``alphabar_0 = alpha_0``) it is ``sqrt(beta_0 / alpha_0)``, the same formula.

    Only schedulers whose step is affine in the noise prediction are accepted, because
    ``stat_matching_loss`` relies on ``step(eps_ref) - step(eps_policy) = coef_t * (eps_ref -
    eps_policy)`` (eq. 8). Refused, each with the setting to change:

    - ``prediction_type`` other than ``"epsilon"`` (the model output is not eps);
    - ``clip_sample=True`` or ``thresholding=True``: the step clamps the predicted ``x0``,
      a non-linear map; wherever it is active the two steps no longer differ by
      ``coef_t * (eps_ref - eps_policy)`` (and the clamp has zero gradient there). SD1.5's
      scheduler config has both off; diffusers' bare ``DDPMScheduler()`` has ``clip_sample=True``;
    - ``variance_type`` ``"learned"``/``"learned_range"``: the sampler noise's scale would
      depend on the model output, so it no longer cancels between policy and reference.

    Args:
        scheduler: a diffusers ``DDPMScheduler`` (the training noise scheduler).
        timesteps: ``(B,)`` integer timesteps in ``[0, num_train_timesteps)``.

    Returns:
        ``(B,)`` float32 on ``timesteps.device``.
    """
    _require_affine_in_eps(scheduler)
    cfg = scheduler.config
    if cfg.variance_type in ("learned", "learned_range"):
        raise ValueError(f"scheduler.variance_type={cfg.variance_type!r}: a learned variance does not "
                         "cancel between policy and reference; use a fixed variance type")
    _require_timesteps("timesteps", timesteps, scheduler.betas.shape[0])
    t = timesteps.to(scheduler.betas.device)
    beta_t = scheduler.betas.double()[t]  # (B,)
    alpha_t = scheduler.alphas.double()[t]  # (B,)
    alphabar_t = scheduler.alphas_cumprod.double()[t]  # (B,)
    coef = beta_t / (alpha_t.sqrt() * (1.0 - alphabar_t).sqrt())  # (B,)
    return coef.to(device=timesteps.device, dtype=torch.float32)


def sampling_prev_timestep(scheduler, timesteps: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
    """The timestep one step of a ``num_inference_steps``-step DDIM sampler goes to from ``t``.

        t_prev = t - num_train_timesteps // num_inference_steps

    exactly what ``DDIMScheduler.step`` (diffusers 0.42) takes as ``prev_timestep``, whatever the
    config's ``timestep_spacing``. With ``"leading"`` spacing (the default, and SD1.5's) it is the
    next timestep of ``set_timesteps(num_inference_steps)``'s schedule; ``t`` need not lie on that
    schedule (training draws ``t`` uniformly). ``t_prev < 0`` (every ``t`` below the step size)
    means the sampler's final step, to ``x0``: see ``ddim_eps_coefficient``.

    Args:
        scheduler: a diffusers ``DDPMScheduler`` or ``DDIMScheduler``; only
            ``config.num_train_timesteps`` is read.
        timesteps: ``(B,)`` integer timesteps in ``[0, num_train_timesteps)``.
        num_inference_steps: the sampler's step count, in ``[1, num_train_timesteps]`` (the range
            ``DDIMScheduler.set_timesteps`` accepts).

    Returns:
        ``(B,)`` integer tensor like ``timesteps``; may be negative.
    """
    n = scheduler.config.num_train_timesteps
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or not (
            1 <= num_inference_steps <= n):
        raise ValueError(f"num_inference_steps must be an integer in [1, {n}]; got {num_inference_steps!r}")
    _require_timesteps("timesteps", timesteps, n)
    return timesteps - n // num_inference_steps


def ddim_eps_coefficient(scheduler, timesteps: torch.Tensor, prev_timesteps: torch.Tensor) -> torch.Tensor:
    """The coefficient of the noise prediction in one deterministic DDIM step ``t -> t_prev``.

    DDIM (Song et al. 2021, eq. 12 with ``eta = 0``), as ``DDIMScheduler.step`` computes it, with
    ``a_t = alphabar_t`` and ``a_p = alphabar_{t_prev}``:

        x0_hat = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
        x_prev = sqrt(a_p) * x0_hat + sqrt(1 - a_p) * eps
               = sqrt(a_p / a_t) * x_t - (sqrt(a_p) * sqrt(1 - a_t) / sqrt(a_t) - sqrt(1 - a_p)) * eps
               = sqrt(a_p / a_t) * x_t - c * eps,

        c = sqrt(a_p) * (sqrt((1 - a_t) / a_t) - sqrt((1 - a_p) / a_p))

    (``sqrt(a_p) * sqrt((1 - a_p) / a_p) = sqrt(1 - a_p)``). The step is affine in ``eps`` and
    ``x_t`` cancels between two steps from the same ``x_t``:

        x_prev(eps_policy) - x_prev(eps_ref) = c * (eps_ref - eps_policy)

    the sign convention of ``ddpm_eps_coefficient`` (whose step is ``mu = (x_t - beta_t /
    sqrt(1 - a_t) * eps) / sqrt(alpha_t)``, also "eps-free part ``- coef * eps``"), so
    ``stat_matching_loss`` takes either coefficient unchanged (``l_tgt - l_ref = coef * (eps_ref -
    eps_policy)``; it squares the result anyway). ``c > 0`` for ``t_prev < t``: the noise-to-signal
    ratio ``sqrt((1 - a) / a)`` grows with the timestep.

    ``t_prev < 0`` is the final step, to ``x0``: there ``a_p`` is the DDIM scheduler's
    ``final_alpha_cumprod``, ``1.0`` if ``set_alpha_to_one`` (then ``c = sqrt((1 - a_t) / a_t)``
    and the step returns ``x0_hat``) else ``alphabar_0``. It is read from
    ``DDIMScheduler.from_config(scheduler.config)``, the sampler ``hgdpo.models.sampling`` would build:
    a config loaded from SD1.5's ``scheduler_config.json`` keeps its ``set_alpha_to_one=False`` even
    in a ``DDPMScheduler``; a bare ``DDPMScheduler(...)`` has none, so DDIM's default ``True``
    applies. ``alphabar`` itself is the scheduler's own ``alphas_cumprod`` (computed in float64,
    returned as float32).

    Size: at 50-step spacing (``t_prev = t - 20``) ``c`` is about 10 times ``ddpm_eps_coefficient``
    at mid timesteps, so the stat-matching loss is about 100 times larger and ``lambda_stat`` must
    shrink accordingly for the same balance against the DPO term.

    Refused like ``ddpm_eps_coefficient``: ``prediction_type`` other than ``"epsilon"``,
    ``clip_sample=True``, ``thresholding=True`` (a clamped ``x0_hat`` is not affine in ``eps``); and
    timesteps with ``alphabar_t = 0`` (``rescale_betas_zero_snr``'s last timestep: the step divides
    by ``sqrt(alphabar_t)``).

    Args:
        scheduler: a diffusers ``DDPMScheduler`` (the training noise scheduler) or
            ``DDIMScheduler`` of the model's noise schedule.
        timesteps: ``(B,)`` integer timesteps in ``[0, num_train_timesteps)``.
        prev_timesteps: ``(B,)`` integer, each ``< timesteps``; negative for the final step
            (e.g. ``sampling_prev_timestep(scheduler, timesteps, num_inference_steps)``).

    Returns:
        ``(B,)`` float32 on ``timesteps.device``.
    """
    _require_affine_in_eps(scheduler)
    n = scheduler.alphas_cumprod.shape[0]
    _require_timesteps("timesteps", timesteps, n)
    if prev_timesteps.shape != timesteps.shape or prev_timesteps.is_floating_point():
        raise ValueError(f"prev_timesteps must be an integer tensor of the shape of timesteps "
                         f"{tuple(timesteps.shape)}; got {tuple(prev_timesteps.shape)} {prev_timesteps.dtype}")
    if bool((prev_timesteps >= timesteps).any()):
        raise ValueError(f"prev_timesteps must be < timesteps (a step towards x0); got prev_timesteps="
                         f"{prev_timesteps.tolist()} for timesteps={timesteps.tolist()}")
    alphas_cumprod = scheduler.alphas_cumprod.double()
    t = timesteps.to(alphas_cumprod.device)
    t_prev = prev_timesteps.to(alphas_cumprod.device)
    a_t = alphas_cumprod[t]  # (B,)
    if bool((a_t <= 0).any()):
        raise ValueError(f"alphabar_t = 0 at timesteps {t[a_t <= 0].tolist()} (a zero-SNR schedule's last "
                         "timestep): the DDIM step divides by sqrt(alphabar_t)")
    # DDIMScheduler's final_alpha_cumprod (its set_alpha_to_one defaults to True)
    final = torch.ones((), dtype=torch.float64, device=alphas_cumprod.device) \
        if scheduler.config.get("set_alpha_to_one", True) else alphas_cumprod[0]
    a_p = torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)], final)  # (B,)
    coef = a_p.sqrt() * (((1.0 - a_t) / a_t).sqrt() - ((1.0 - a_p) / a_p).sqrt())  # (B,)
    return coef.to(device=timesteps.device, dtype=torch.float32)


def stat_matching_loss(policy_eps_w: torch.Tensor, ref_eps_w: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Statistic-matching loss, HG-DPO eq. 8.

    From the noisy winner latent ``l^t``, one DDPM sampler step with the policy and with the
    reference (no CFG, the same sampler noise ``z``) gives

        l_tgt^{t-1} = mu(l^t, eps_policy) + sigma_t z,   l_ref^{t-1} = mu(l^t, eps_ref) + sigma_t z,
        l_tgt^{t-1} - l_ref^{t-1} = coef_t * (eps_ref - eps_policy)

    (``l^t`` and ``sigma_t z`` cancel; ``coef_t`` from ``ddpm_eps_coefficient``). The loss is
    the squared L2 distance between the two latents' channel-wise means (mean over H, W: one
    C-vector per sample), summed over C and averaged over the batch:

        loss = mean_B sum_C ( coef_t * mean_HW(eps_ref - eps_policy) )^2

    so it needs no UNet call beyond those the DPO term already made. The channel-wise mean is
    linear, so it is taken before the difference. The paper's step is one (unclipped) DDPM step
    ``t -> t - 1`` (``coef`` from ``ddpm_eps_coefficient``, which lists the schedulers it
    refuses). One deterministic DDIM step ``t -> t_prev`` of a sampler works the same way, with
    no sampler noise at all: pass ``ddim_eps_coefficient`` instead, which has the same sign
    convention (each step is "``eps``-free part ``- coef * eps``").

    Args:
        policy_eps_w: ``(B, C, H, W)`` the policy's noise prediction on the noisy winner.
        ref_eps_w: ``(B, C, H, W)`` the reference's; a constant (detached here).
        coef: ``(B,)`` ``coef_t`` per sample; a constant (detached here).

    Returns:
        A scalar.
    """
    _require_same_shape("policy_eps_w", policy_eps_w, "ref_eps_w", ref_eps_w)
    if policy_eps_w.dim() != 4:
        raise ValueError(f"noise predictions must be (B, C, H, W); got {tuple(policy_eps_w.shape)}")
    if coef.shape != policy_eps_w.shape[:1]:
        raise ValueError(f"coef must have shape (B,) = ({policy_eps_w.shape[0]},); got {tuple(coef.shape)}")
    policy_mean = _float(policy_eps_w).mean(dim=(2, 3))  # (B, C)
    ref_mean = _float(ref_eps_w.detach()).mean(dim=(2, 3))  # (B, C)
    diff = coef.detach().to(policy_mean.dtype)[:, None] * (ref_mean - policy_mean)  # (B, C)
    return (diff**2).sum(dim=1).mean()


def total_loss(loss_dpo: torch.Tensor, loss_stat: torch.Tensor, lambda_stat: float = LAMBDA_STAT) -> torch.Tensor:
    """HG-DPO eq. 9: ``L_DPO + lambda_stat * L_stat`` (paper: ``lambda_stat = 10000``).

    ``lambda_stat = 0`` is the DPO-only ablation. Both inputs are scalars.
    """
    if lambda_stat < 0:
        raise ValueError(f"lambda_stat must be >= 0 (got {lambda_stat})")
    return loss_dpo + lambda_stat * loss_stat
