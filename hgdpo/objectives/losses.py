"""The Diffusion-DPO family's losses (HG-DPO arXiv 2405.20216 v1, eq. 3) and the SFT baseline.

Pure functions of tensors: no model calls, no module state. The trainer runs the UNet once
with the policy (LoRA on) and once with the reference (LoRA off, ``no_grad``) on the winner
and the loser latents noised with one timestep ``t`` and one noise draw ``eps``, then:

    policy_err = per_sample_error(eps, policy_eps_pred)                   # (2B,) -> _w, _l
    ref_err = per_sample_error(eps, ref_eps_pred)                         # (2B,) -> _w, _l
    loss_dpo, stats = dpo_loss(policy_err_w, policy_err_l, ref_err_w, ref_err_l, beta)

and HG-DPO adds statistic matching (eq. 8, 9: ``hgdpo.objectives.stat_matching``).

Variants: ``weighted_per_sample_error(eps, eps_pred, weight)`` in place of ``per_sample_error``
(a region-weighted error, the same weight for the policy and the reference call).

Shapes: ``B`` pairs, latents ``(B, C, H, W)``.

Reference inputs are constants of the objective: every function here detaches them (and the
schedule coefficient), so a caller that forgets ``no_grad`` on the reference pass still gets
gradients for the policy only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "per_sample_error",
    "weighted_per_sample_error",
    "dpo_loss",
    "sft_loss",
]

# The paper's default (HG-DPO §4 / the diffusers Diffusion-DPO example).
BETA_DPO = 2500.0


def _float(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32 (mixed precision); leave float32/float64 alone."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _require_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    # Broadcasting two differently shaped noise tensors would silently give a wrong loss.
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")


def per_sample_error(eps: torch.Tensor, eps_pred: torch.Tensor) -> torch.Tensor:
    """Noise-prediction error of each sample: ``mean over (C, H, W) of (eps - eps_pred)^2``.

    The ``||eps - eps_theta(x_t, t)||^2`` terms inside HG-DPO eq. 3 (a mean rather than a sum:
    the constant ``C*H*W`` is absorbed into beta, as in the diffusers and Salesforce code).

    Args:
        eps: ``(B, C, H, W)`` the forward-process noise.
        eps_pred: ``(B, C, H, W)`` a model's noise prediction.

    Returns:
        ``(B,)`` in float32 (or float64 for float64 inputs).
    """
    _require_same_shape("eps", eps, "eps_pred", eps_pred)
    if eps.dim() < 2:
        raise ValueError(f"eps must be batched (B, C, H, W); got shape {tuple(eps.shape)}")
    sq = (_float(eps) - _float(eps_pred)) ** 2  # (B, C, H, W)
    return sq.mean(dim=tuple(range(1, sq.dim())))  # (B,)


def weighted_per_sample_error(eps: torch.Tensor, eps_pred: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Region-weighted noise-prediction error of each sample: ``sum(W * (eps - eps_pred)^2) / sum(W)``.

    Both sums run over ``(C, H, W)`` of one sample, with ``W`` the weight broadcast to
    ``(B, C, H, W)``; a weighted mean, so the error is invariant to the weight's scale and equals
    ``per_sample_error`` for a constant weight (exactly so for ``W = 1``). This is the per-sample
    error of region-weighted Diffusion-DPO variants (OSPO / FocusDPO style): pixels with more
    weight count more, pixels with weight 0 are ignored.

    The weight is a constant of the objective (detached here). The caller passes the same weight
    to the policy and the reference call of one latent, so each ``policy_err - ref_err`` in
    ``dpo_loss`` compares the two models on the same weighted metric; ``dpo_loss`` is unchanged.
    (The winner and the loser are separate latents and may each have their own weight.)

    Args:
        eps: ``(B, C, H, W)`` the forward-process noise.
        eps_pred: ``(B, C, H, W)`` a model's noise prediction.
        weight: ``(B, 1, H, W)`` (one map per sample, the same for every channel) or
            ``(B, C, H, W)``; finite, ``>= 0`` everywhere, and with a positive sum for every
            sample. Any other shape is refused (no broadcasting over the batch).

    Returns:
        ``(B,)`` in float32 (or float64 for float64 ``eps`` / ``eps_pred``).
    """
    _require_same_shape("eps", eps, "eps_pred", eps_pred)
    if eps.dim() != 4:
        raise ValueError(f"eps must be (B, C, H, W); got shape {tuple(eps.shape)}")
    B, C, H, W = eps.shape
    if tuple(weight.shape) not in ((B, 1, H, W), (B, C, H, W)):
        raise ValueError(f"weight must have shape (B, 1, H, W) = {(B, 1, H, W)} or (B, C, H, W) = "
                         f"{(B, C, H, W)}; got {tuple(weight.shape)}")
    sq = (_float(eps) - _float(eps_pred)) ** 2  # (B, C, H, W)
    w = _float(weight.detach()).to(sq.dtype).expand_as(sq)  # (B, C, H, W)
    if not bool((torch.isfinite(w) & (w >= 0)).all()):
        raise ValueError("weight must be finite and >= 0 everywhere; got a negative, NaN or infinite entry")
    total = w.sum(dim=(1, 2, 3))  # (B,)
    if not bool((total > 0).all()):
        zero = (total <= 0).nonzero().flatten().tolist()
        raise ValueError(f"weight is 0 everywhere for sample(s) {zero}: each sample needs a positive weight "
                         "somewhere")
    return (w * sq).sum(dim=(1, 2, 3)) / total  # (B,)


def dpo_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float = BETA_DPO,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss, HG-DPO eq. 3.

        inside = (policy_err_w - ref_err_w) - (policy_err_l - ref_err_l)      # (B,)
        loss   = mean_B( -log sigmoid(-beta * inside) )

    Convention: ``beta = 2500`` as in the paper and the diffusers Diffusion-DPO example.
    Salesforce's DiffusionDPO code writes ``beta = 5000`` with a factor ``0.5`` inside
    (``-0.5 * beta * inside``): the same loss. The paper's ``T * omega(lambda_t)`` weight is
    folded into beta. ``-log sigmoid`` is computed with ``F.logsigmoid`` (finite for any
    ``beta * inside``, no ``exp`` overflow).

    The winner and the loser must have been noised with the same ``t`` and the same noise.

    Args:
        policy_err_w, policy_err_l: ``(B,)`` ``per_sample_error`` of the policy on winner / loser.
        ref_err_w, ref_err_l: ``(B,)`` the same for the reference model; treated as constants
            (detached here).
        beta: KL-regularisation strength, > 0.

    Returns:
        ``(loss, stats)``: ``loss`` a scalar; ``stats`` detached 0-dim tensors:

        - ``accuracy``: implicit preference accuracy, the fraction of pairs with
          ``inside < 0`` (the policy lowered the winner's error relative to the reference by
          more than the loser's, i.e. it prefers the winner more than the reference does);
          a pair with ``inside == 0`` (e.g. every pair at step 0, policy == reference)
          counts half, like a tie in evaluation.
        - ``reward_margin``: ``mean_B(reward_w - reward_l) = mean_B(-beta * inside)`` with the
          implicit reward ``reward_x = -beta * (policy_err_x - ref_err_x)``.
        - ``policy_err_w``, ``policy_err_l``, ``ref_err_w``, ``ref_err_l``: batch means.
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive (got {beta})")
    shape = policy_err_w.shape
    if len(shape) != 1:
        raise ValueError(f"per-sample errors must have shape (B,); got {tuple(shape)}")
    for name, err in (("policy_err_l", policy_err_l), ("ref_err_w", ref_err_w), ("ref_err_l", ref_err_l)):
        _require_same_shape("policy_err_w", policy_err_w, name, err)
    ref_err_w, ref_err_l = ref_err_w.detach(), ref_err_l.detach()

    policy_diff = policy_err_w - policy_err_l  # (B,)
    ref_diff = ref_err_w - ref_err_l  # (B,)
    inside = policy_diff - ref_diff  # (B,)
    logits = -beta * inside  # (B,)
    loss = -F.logsigmoid(logits).mean()

    with torch.no_grad():
        inside = inside.detach()
        accuracy = (inside < 0).float().mean() + 0.5 * (inside == 0).float().mean()
        stats = {
            "accuracy": accuracy,
            "reward_margin": logits.detach().mean(),
            "policy_err_w": policy_err_w.detach().mean(),
            "policy_err_l": policy_err_l.detach().mean(),
            "ref_err_w": ref_err_w.mean(),
            "ref_err_l": ref_err_l.mean(),
        }
    return loss, stats


def sft_loss(policy_eps_w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The paper's SFT baseline: the noise-prediction MSE on winners only.

    ``mean_B per_sample_error(eps, policy_eps_w)``, i.e. the mean of ``(eps - eps_pred)^2``
    over every element (the usual diffusion training loss).

    Args:
        policy_eps_w: ``(B, C, H, W)`` the policy's noise prediction on the noisy winner.
        eps: ``(B, C, H, W)`` the forward-process noise.

    Returns:
        A scalar.
    """
    return per_sample_error(eps, policy_eps_w).mean()
