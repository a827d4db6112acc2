"""HG-DPO losses against hand-computed values (arithmetic written out) and real DDPM / DDIM steps."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from hgdpo.objectives.losses import dpo_loss, per_sample_error, sft_loss, weighted_per_sample_error
from hgdpo.objectives.stat_matching import (ddim_eps_coefficient, ddpm_eps_coefficient, sampling_prev_timestep,
                                            stat_matching_loss, total_loss)


def neg_log_sigmoid(x: float) -> float:
    """-log sigmoid(x), written out the naive way (fine for the small x used here)."""
    return -math.log(1 / (1 + math.exp(-x)))


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sd15_ddpm(**overrides) -> DDPMScheduler:
    """The SD1.5 training scheduler (its scheduler_config.json has clip_sample false)."""
    kwargs = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", clip_sample=False)
    return DDPMScheduler(**(kwargs | overrides))


def sd15_ddim(num_inference_steps=50, **overrides) -> DDIMScheduler:
    """A DDIM sampler with the SD1.5 noise schedule, its timesteps set."""
    kwargs = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", clip_sample=False)
    scheduler = DDIMScheduler(**(kwargs | overrides))
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


# ---------------------------------------------------------------------------- per_sample_error

def test_per_sample_error_by_hand():
    # B=2, C=1, H=1, W=2: the mean runs over the 2 elements of each sample.
    eps = t64([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])
    eps_pred = t64([[[[0.0, 0.0]]], [[[3.0, -1.0]]]])
    # sample 0: ((1-0)^2 + (2-0)^2) / 2 = (1 + 4) / 2 = 2.5
    # sample 1: ((0-3)^2 + (0+1)^2) / 2 = (9 + 1) / 2 = 5.0
    err = per_sample_error(eps, eps_pred)
    assert err.shape == (2,)
    torch.testing.assert_close(err, t64([2.5, 5.0]))


def test_per_sample_error_upcasts_half_precision():
    eps = torch.ones(2, 4, 3, 3, dtype=torch.bfloat16)
    err = per_sample_error(eps, torch.zeros_like(eps))  # every element (1 - 0)^2 = 1
    assert err.dtype == torch.float32
    torch.testing.assert_close(err, torch.ones(2))


def test_per_sample_error_refuses_mismatched_or_unbatched_shapes():
    with pytest.raises(ValueError, match=r"eps has shape \(2, 1, 1, 2\) but eps_pred has shape \(1, 1, 1, 2\)"):
        per_sample_error(torch.zeros(2, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    with pytest.raises(ValueError, match="must be batched"):
        per_sample_error(torch.zeros(3), torch.zeros(3))


# ---------------------------------------------------------------------------- weighted_per_sample_error

# B=2, C=2, H=1, W=2; squared errors (eps - eps_pred)^2:
#   sample 0: eps = (1, 2 | 3, 0), eps_pred = 0            -> channel 0 (1, 4), channel 1 (9, 0)
#   sample 1: eps = 0, eps_pred = (2, 0 | 0, 1)            -> channel 0 (4, 0), channel 1 (0, 1)
WEIGHTED_EPS = t64([[[[1.0, 2.0]], [[3.0, 0.0]]], [[[0.0, 0.0]], [[0.0, 0.0]]]])
WEIGHTED_EPS_PRED = t64([[[[0.0, 0.0]], [[0.0, 0.0]]], [[[2.0, 0.0]], [[0.0, 1.0]]]])


def test_weighted_per_sample_error_one_map_broadcast_over_channels_by_hand():
    weight = t64([[[[1.0, 3.0]]], [[[0.5, 0.5]]]])  # (B, 1, H, W)
    # sample 0: num = 1*1 + 3*4 (channel 0) + 1*9 + 3*0 (channel 1) = 1 + 12 + 9 + 0 = 22
    #           den = (1 + 3) per channel * 2 channels = 8                 -> 22 / 8 = 2.75
    # sample 1: num = 0.5*4 + 0.5*0 + 0.5*0 + 0.5*1 = 2.5; den = (0.5 + 0.5) * 2 = 2 -> 2.5 / 2 = 1.25
    #           (a constant map: the plain mean (4 + 0 + 0 + 1) / 4 = 1.25)
    err = weighted_per_sample_error(WEIGHTED_EPS, WEIGHTED_EPS_PRED, weight)
    assert err.shape == (2,) and err.dtype == torch.float64
    torch.testing.assert_close(err, t64([2.75, 1.25]), rtol=1e-15, atol=0)


def test_weighted_per_sample_error_per_channel_weight_by_hand():
    weight = t64([[[[1.0, 0.0]], [[1.0, 2.0]]], [[[1.0, 1.0]], [[0.0, 4.0]]]])  # (B, C, H, W)
    # sample 0: num = 1*1 + 0*4 + 1*9 + 2*0 = 10; den = 1 + 0 + 1 + 2 = 4 -> 10 / 4 = 2.5
    # sample 1: num = 1*4 + 1*0 + 0*0 + 4*1 = 8;  den = 1 + 1 + 0 + 4 = 6 -> 8 / 6 = 4/3
    err = weighted_per_sample_error(WEIGHTED_EPS, WEIGHTED_EPS_PRED, weight)
    torch.testing.assert_close(err, t64([2.5, 4.0 / 3.0]), rtol=1e-15, atol=0)


def test_weighted_per_sample_error_with_unit_weight_is_per_sample_error_exactly():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps_pred = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    plain = per_sample_error(eps, eps_pred)
    # sum(1 * sq) / sum(1) = sum(sq) / (C*H*W) = mean(sq), bit for bit
    assert torch.equal(weighted_per_sample_error(eps, eps_pred, torch.ones(3, 1, 8, 8, dtype=torch.float64)), plain)
    assert torch.equal(weighted_per_sample_error(eps, eps_pred, torch.ones(3, 4, 8, 8, dtype=torch.float64)), plain)


def test_weighted_per_sample_error_ignores_zero_weight_pixels():
    eps = t64([[[[1.0, 0.0]]]])  # B=1, C=1, H=1, W=2
    weight = t64([[[[2.0, 0.0]]]])  # pixel 1 ignored
    # num = 2 * (1 - 0)^2 + 0 * (0 - x)^2 = 2; den = 2 + 0 = 2 -> 1, whatever the prediction at pixel 1
    for pixel_1 in (0.0, 5.0, -1e6):
        err = weighted_per_sample_error(eps, t64([[[[0.0, pixel_1]]]]), weight)
        assert err.item() == 1.0


def test_weighted_per_sample_error_is_invariant_to_the_weight_scale():
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps_pred = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    weight = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    # sum(3W * sq) / sum(3W) = 3 sum(W * sq) / (3 sum(W))
    torch.testing.assert_close(weighted_per_sample_error(eps, eps_pred, 3 * weight),
                               weighted_per_sample_error(eps, eps_pred, weight), rtol=1e-14, atol=0)


def test_weighted_per_sample_error_gradient_reaches_the_prediction_only():
    eps = t64([[[[1.0, 2.0]]]])  # B=1, C=1, H=1, W=2
    eps_pred = t64([[[[0.0, 0.0]]]]).requires_grad_()
    weight = t64([[[[1.0, 3.0]]]]).requires_grad_()
    err = weighted_per_sample_error(eps, eps_pred, weight)
    # err = (1 * 1^2 + 3 * 2^2) / (1 + 3) = 13 / 4 = 3.25
    assert err.item() == 3.25
    err.sum().backward()
    # d err / d pred_i = -2 * w_i * (eps_i - pred_i) / sum(w): -2 * 1 * 1 / 4 = -0.5, -2 * 3 * 2 / 4 = -3
    torch.testing.assert_close(eps_pred.grad, t64([[[[-0.5, -3.0]]]]))
    assert weight.grad is None


def test_weighted_per_sample_error_upcasts_half_precision():
    eps = torch.ones(2, 4, 3, 3, dtype=torch.bfloat16)
    weight = torch.ones(2, 1, 3, 3, dtype=torch.float16)
    err = weighted_per_sample_error(eps, torch.zeros_like(eps), weight)  # every element (1 - 0)^2 = 1
    assert err.dtype == torch.float32
    torch.testing.assert_close(err, torch.ones(2))


def test_weighted_per_sample_error_refuses_bad_shapes_and_weights():
    eps = torch.zeros(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"weight must have shape \(B, 1, H, W\) = \(2, 1, 3, 3\) or "
                                         r"\(B, C, H, W\) = \(2, 4, 3, 3\); got \(2, 3, 3\)"):
        weighted_per_sample_error(eps, eps, torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match=r"weight must have shape .*; got \(1, 1, 3, 3\)"):  # no batch broadcast
        weighted_per_sample_error(eps, eps, torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match=r"weight must have shape .*; got \(2, 2, 3, 3\)"):
        weighted_per_sample_error(eps, eps, torch.ones(2, 2, 3, 3))
    with pytest.raises(ValueError, match=r"eps has shape \(2, 4, 3, 3\) but eps_pred has shape \(1, 4, 3, 3\)"):
        weighted_per_sample_error(eps, eps[:1], torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"eps must be \(B, C, H, W\); got shape \(2, 9\)"):
        weighted_per_sample_error(eps.flatten(1)[:, :9], eps.flatten(1)[:, :9], torch.ones(2, 1, 3, 3))
    negative = torch.ones(2, 1, 3, 3)
    negative[1, 0, 2, 2] = -0.1  # refused even though the sample's sum stays positive
    with pytest.raises(ValueError, match="weight must be finite and >= 0 everywhere"):
        weighted_per_sample_error(eps, eps, negative)
    for bad in (float("nan"), float("inf")):
        w = torch.ones(2, 1, 3, 3)
        w[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="weight must be finite and >= 0 everywhere"):
            weighted_per_sample_error(eps, eps, w)
    zero_for_one = torch.ones(2, 4, 3, 3)
    zero_for_one[1] = 0.0
    with pytest.raises(ValueError, match=r"weight is 0 everywhere for sample\(s\) \[1\]"):
        weighted_per_sample_error(eps, eps, zero_for_one)


# ---------------------------------------------------------------------------- dpo_loss (eq. 3)

def test_dpo_loss_by_hand():
    beta = 2500.0
    policy_err_w, ref_err_w = t64([0.5002, 0.2000]), t64([0.5000, 0.2004])
    policy_err_l, ref_err_l = t64([0.4000, 0.7000]), t64([0.4000, 0.7000])
    # sample 0: inside = (0.5002 - 0.5000) - (0.4 - 0.4) = +0.0002; -beta * inside = -2500 * 0.0002 = -0.5
    # sample 1: inside = (0.2000 - 0.2004) - (0.7 - 0.7) = -0.0004; -beta * inside = -2500 * -0.0004 = +1.0
    loss_0 = -math.log(1 / (1 + math.exp(0.5)))   # -log sigmoid(-0.5) = 0.974077...
    loss_1 = -math.log(1 / (1 + math.exp(-1.0)))  # -log sigmoid(+1.0) = 0.313262...
    loss, stats = dpo_loss(policy_err_w, policy_err_l, ref_err_w, ref_err_l, beta)
    assert loss.shape == ()
    assert loss.item() == pytest.approx((loss_0 + loss_1) / 2, rel=1e-9)  # 0.643670...
    assert loss.item() == pytest.approx(0.6436697, abs=1e-6)
    # accuracy: sample 1 has inside < 0 (policy prefers the winner more than the reference), sample 0 not -> 1/2
    assert stats["accuracy"].item() == 0.5
    # reward margin: mean of -beta * inside = (-0.5 + 1.0) / 2 = 0.25
    assert stats["reward_margin"].item() == pytest.approx(0.25, rel=1e-9)
    # the four mean errors: (0.5002 + 0.2) / 2, (0.4 + 0.7) / 2, (0.5 + 0.2004) / 2, (0.4 + 0.7) / 2
    assert stats["policy_err_w"].item() == pytest.approx(0.3501)
    assert stats["policy_err_l"].item() == pytest.approx(0.55)
    assert stats["ref_err_w"].item() == pytest.approx(0.3502)
    assert stats["ref_err_l"].item() == pytest.approx(0.55)


def test_dpo_loss_salesforce_convention_is_the_same_loss():
    # Salesforce writes -0.5 * beta' * inside with beta' = 5000; ours is -beta * inside with beta = 2500.
    inside = 0.0003  # -0.5 * 5000 * 0.0003 = -2500 * 0.0003 = -0.75
    loss, _ = dpo_loss(t64([0.1 + inside]), t64([0.2]), t64([0.1]), t64([0.2]), beta=2500.0)
    assert loss.item() == pytest.approx(neg_log_sigmoid(-0.5 * 5000 * inside), rel=1e-6)
    assert loss.item() == pytest.approx(neg_log_sigmoid(-0.75), rel=1e-6)


def test_dpo_loss_at_initialisation_policy_equals_reference():
    # policy == reference: inside = 0 for every pair; loss = -log sigmoid(0) = -log(1/2) = log 2
    err_w, err_l = t64([0.3, 0.1]), t64([0.2, 0.4])
    loss, stats = dpo_loss(err_w, err_l, err_w.clone(), err_l.clone(), beta=2500.0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)
    assert stats["accuracy"].item() == 0.5  # every pair a tie: each counts 1/2
    assert stats["reward_margin"].item() == 0.0


def test_dpo_loss_accuracy_counts_wins_ties_and_losses():
    # inside per pair = policy_err_w - 0 - (0 - 0) = policy_err_w: [-1, -2, 0, +1]
    # wins (inside < 0): 2, ties: 1 (counts 1/2), losses: 1 -> (2 + 0.5 + 0) / 4 = 0.625
    zeros = t64([0.0, 0.0, 0.0, 0.0])
    _, stats = dpo_loss(t64([-1.0, -2.0, 0.0, 1.0]), zeros, zeros, zeros, beta=1.0)
    assert stats["accuracy"].item() == 0.625
    # all wins -> 1, all losses -> 0
    _, stats = dpo_loss(t64([-1.0, -1.0]), t64([0.0, 0.0]), t64([0.0, 0.0]), t64([0.0, 0.0]), beta=1.0)
    assert stats["accuracy"].item() == 1.0
    _, stats = dpo_loss(t64([1.0, 1.0]), t64([0.0, 0.0]), t64([0.0, 0.0]), t64([0.0, 0.0]), beta=1.0)
    assert stats["accuracy"].item() == 0.0


def test_dpo_loss_gradient_reaches_the_policy_only_and_stats_are_detached():
    beta = 2500.0
    policy_err_w = t64([0.3, 0.1]).requires_grad_()
    policy_err_l = t64([0.2, 0.4]).requires_grad_()
    ref_err_w = t64([0.3, 0.1]).requires_grad_()  # a caller that forgot no_grad on the reference pass
    ref_err_l = t64([0.2, 0.4]).requires_grad_()
    loss, stats = dpo_loss(policy_err_w, policy_err_l, ref_err_w, ref_err_l, beta)
    loss.backward()
    # loss = mean_i softplus(beta * inside_i); d/d policy_err_w_i = beta * sigmoid(beta * inside_i) / B
    # here inside_i = 0, sigmoid(0) = 1/2: 2500 * 0.5 / 2 = 625, and -625 for the loser
    torch.testing.assert_close(policy_err_w.grad, t64([625.0, 625.0]))
    torch.testing.assert_close(policy_err_l.grad, t64([-625.0, -625.0]))
    assert ref_err_w.grad is None and ref_err_l.grad is None
    assert all(not v.requires_grad for v in stats.values())


def test_dpo_loss_is_finite_at_beta_times_inside_1e4():
    # inside = +4 and -4 with beta = 2500: -beta * inside = -1e4 and +1e4
    with pytest.raises(OverflowError):  # the naive -log(1/(1+exp(-x))) cannot even be evaluated at x = -1e4
        neg_log_sigmoid(-1e4)
    policy_err_w = t64([4.0, -4.0]).requires_grad_()
    zeros = t64([0.0, 0.0])
    loss, stats = dpo_loss(policy_err_w, zeros, zeros, zeros, beta=2500.0)
    # -log sigmoid(-1e4) = 1e4 + log(1 + e^-1e4) = 1e4 (to double precision); -log sigmoid(1e4) = log(1 + e^-1e4) = 0
    # mean = (1e4 + 0) / 2 = 5000
    assert torch.isfinite(loss) and loss.item() == pytest.approx(5000.0, rel=1e-12)
    loss.backward()
    # d/d policy_err_w_i = beta * sigmoid(beta * inside_i) / 2: 2500 * 1 / 2 = 1250 and 2500 * sigmoid(-1e4) / 2 = 0
    torch.testing.assert_close(policy_err_w.grad, t64([1250.0, 0.0]))
    assert stats["accuracy"].item() == 0.5 and stats["reward_margin"].item() == 0.0
    # float32 as well (the training dtype of the errors)
    loss32, _ = dpo_loss(torch.tensor([4.0, -4.0]), torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=2500.0)
    assert torch.isfinite(loss32) and loss32.item() == pytest.approx(5000.0)


def test_dpo_loss_refuses_bad_beta_and_shapes():
    e = t64([0.1, 0.2])
    with pytest.raises(ValueError, match=r"beta must be positive \(got 0.0\)"):
        dpo_loss(e, e, e, e, beta=0.0)
    with pytest.raises(ValueError, match=r"policy_err_w has shape \(2,\) but ref_err_l has shape \(3,\)"):
        dpo_loss(e, e, e, t64([0.1, 0.2, 0.3]), beta=1.0)
    with pytest.raises(ValueError, match=r"must have shape \(B,\)"):
        dpo_loss(e[None], e[None], e[None], e[None], beta=1.0)


# ---------------------------------------------------------------------------- ddpm_eps_coefficient

def test_ddpm_eps_coefficient_by_hand_at_t0_and_t1():
    scheduler = sd15_ddpm()
    # scaled_linear: beta_t = (sqrt(0.00085) + t * (sqrt(0.012) - sqrt(0.00085)) / 999)^2
    beta_0 = 0.00085
    beta_1 = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2
    # t = 0: alphabar_0 = alpha_0 = 1 - beta_0,
    #        coef = beta_0 / (sqrt(1 - beta_0) * sqrt(beta_0)) = sqrt(beta_0 / (1 - beta_0))
    coef_0 = math.sqrt(0.00085 / (1 - 0.00085))  # 0.0291668
    assert coef_0 == pytest.approx(beta_0 / (math.sqrt(1 - beta_0) * math.sqrt(1 - (1 - beta_0))))
    # t = 1: alphabar_1 = (1 - beta_0) * (1 - beta_1)
    coef_1 = beta_1 / (math.sqrt(1 - beta_1) * math.sqrt(1 - (1 - beta_0) * (1 - beta_1)))
    coef = ddpm_eps_coefficient(scheduler, torch.tensor([0, 1]))
    assert coef.shape == (2,) and coef.dtype == torch.float32
    # rtol: the scheduler stores alphabar in float32; alphabar_0 = 0.99915 carries ~3e-8 of rounding,
    # which 1 - alphabar_0 = 8.5e-4 turns into ~3.5e-5 relative (halved by the square root).
    torch.testing.assert_close(coef, torch.tensor([coef_0, coef_1]), rtol=3e-5, atol=0)


def test_ddpm_eps_coefficient_refuses_schedulers_whose_step_is_not_affine_in_eps():
    t = torch.tensor([5])
    with pytest.raises(ValueError, match=r"scheduler.clip_sample=True"):
        ddpm_eps_coefficient(sd15_ddpm(clip_sample=True), t)
    with pytest.raises(ValueError, match=r"scheduler.thresholding=True"):
        ddpm_eps_coefficient(sd15_ddpm(thresholding=True), t)
    with pytest.raises(ValueError, match=r"scheduler.prediction_type='v_prediction'"):
        ddpm_eps_coefficient(sd15_ddpm(prediction_type="v_prediction"), t)
    with pytest.raises(ValueError, match=r"scheduler.variance_type='learned_range'"):
        ddpm_eps_coefficient(sd15_ddpm(variance_type="learned_range"), t)


def test_ddpm_eps_coefficient_refuses_bad_timesteps():
    scheduler = sd15_ddpm()
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\); got \[0, 1000\]"):
        ddpm_eps_coefficient(scheduler, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="integer tensor"):
        ddpm_eps_coefficient(scheduler, torch.tensor([3.0]))


# ---------------------------------------------------------------------------- stat_matching_loss (eq. 8)

def test_stat_matching_loss_by_hand():
    # B=2, C=2, H=1, W=2
    policy_eps_w = t64([[[[1.0, 3.0]], [[0.0, 0.0]]],    # channel means (2, 0)
                        [[[2.0, 2.0]], [[-1.0, 1.0]]]])  # channel means (2, 0)
    ref_eps_w = t64([[[[0.0, 0.0]], [[1.0, 1.0]]],       # channel means (0, 1)
                     [[[2.0, 2.0]], [[4.0, 0.0]]]])      # channel means (2, 2)
    coef = t64([0.5, 2.0])
    # sample 0: coef * (ref - policy) = 0.5 * (0 - 2, 1 - 0) = (-1, 0.5); sum of squares = 1 + 0.25 = 1.25
    # sample 1: coef * (ref - policy) = 2 * (2 - 2, 2 - 0) = (0, 4);     sum of squares = 0 + 16 = 16
    # mean over the batch: (1.25 + 16) / 2 = 8.625
    loss = stat_matching_loss(policy_eps_w, ref_eps_w, coef)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(8.625, rel=1e-12)


def test_stat_matching_loss_gradient_reaches_the_policy_only():
    policy_eps_w = t64([[[[1.0, 3.0]], [[0.0, 0.0]]]]).requires_grad_()  # B=1, C=2, H=1, W=2
    ref_eps_w = t64([[[[0.0, 0.0]], [[1.0, 1.0]]]]).requires_grad_()
    coef = t64([0.5]).requires_grad_()
    stat_matching_loss(policy_eps_w, ref_eps_w, coef).backward()
    # loss = sum_c (coef * (m_ref_c - m_pol_c))^2 with m = mean over the 2 pixels;
    # d loss / d policy pixel = 2 * coef * (m_ref_c - m_pol_c) * coef * (-1) * 1/2
    # channel 0: 2 * 0.5 * (0 - 2) * 0.5 * (-1) / 2 = 0.5 ; channel 1: 2 * 0.5 * (1 - 0) * 0.5 * (-1) / 2 = -0.25
    torch.testing.assert_close(policy_eps_w.grad, t64([[[[0.5, 0.5]], [[-0.25, -0.25]]]]))
    assert ref_eps_w.grad is None and coef.grad is None


def test_stat_matching_loss_mixed_precision_and_shape_checks():
    policy = torch.ones(2, 4, 3, 3, dtype=torch.bfloat16)
    ref = torch.zeros(2, 4, 3, 3, dtype=torch.bfloat16)
    # per sample: 4 channels of (coef * (0 - 1))^2 = 4 * (0.5 * -1)^2 = 4 * 0.25 = 1.0 (coef = 0.5)
    loss = stat_matching_loss(policy, ref, torch.tensor([0.5, 0.5]))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"coef must have shape \(B,\) = \(2,\); got \(1,\)"):
        stat_matching_loss(policy, ref, torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"policy_eps_w has shape"):
        stat_matching_loss(policy, ref[:1], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"must be \(B, C, H, W\)"):
        stat_matching_loss(policy[:, 0], ref[:, 0], torch.tensor([0.5, 0.5]))


def direct_eq8(scheduler, policy_eps_w, ref_eps_w, latent_t, timesteps, seed=1234, ref_seed=None):
    """Eq. 8 as the paper states it: one real DDPMScheduler.step per sample with the policy and
    with the reference (same sampler noise: same generator seed), then the channel means."""
    per_sample = []
    for i, t in enumerate(timesteps):
        g_policy = torch.Generator().manual_seed(seed)
        g_ref = torch.Generator().manual_seed(seed if ref_seed is None else ref_seed)
        l_tgt = scheduler.step(policy_eps_w[i:i + 1], t, latent_t[i:i + 1], generator=g_policy).prev_sample
        l_ref = scheduler.step(ref_eps_w[i:i + 1], t, latent_t[i:i + 1], generator=g_ref).prev_sample
        mean_tgt, mean_ref = l_tgt.mean(dim=(2, 3)), l_ref.mean(dim=(2, 3))  # (1, C)
        per_sample.append(((mean_tgt - mean_ref) ** 2).sum())
    return torch.stack(per_sample).mean()


# The edges: t=0 (the last step: alphabar_{-1} = 1 and no sampler noise) and t=999 (the first);
# t=1 is the last step that adds noise; and the middle.
TIMESTEPS = [0, 1, 2, 10, 250, 500, 998, 999]


def random_case(B, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, 4, 8, 8)
    latent_t = torch.randn(shape, generator=g, dtype=dtype)
    ref_eps_w = torch.randn(shape, generator=g, dtype=dtype)
    # a policy that differs from the reference, with a per-channel offset (the colour shift SML targets)
    policy_eps_w = ref_eps_w + 0.1 * torch.randn(shape, generator=g, dtype=dtype) + 0.05 * torch.randn(
        (B, 4, 1, 1), generator=g, dtype=dtype)
    return latent_t, policy_eps_w, ref_eps_w


def test_stat_matching_loss_equals_two_real_ddpm_steps():
    scheduler = sd15_ddpm()
    timesteps = torch.tensor(TIMESTEPS)
    latent_t, policy_eps_w, ref_eps_w = random_case(len(TIMESTEPS))
    direct = direct_eq8(scheduler, policy_eps_w, ref_eps_w, latent_t, TIMESTEPS)
    closed = stat_matching_loss(policy_eps_w, ref_eps_w, ddpm_eps_coefficient(scheduler, timesteps))
    # Tolerance: DDPMScheduler keeps its schedule in float32 and its step recomputes beta_t as
    # 1 - alphabar_t / alphabar_{t-1}, which loses ~4 digits when beta_t ~ 1e-3: the step's
    # effective coefficient differs from beta_t / (sqrt(alpha_t) sqrt(1 - alphabar_t)) by at most
    # 8.5e-5 relative over all 1000 t (measured), i.e. 1.7e-4 on the squared loss.
    torch.testing.assert_close(closed, direct, rtol=3e-4, atol=0)
    # and per sample, each timestep on its own
    for i, t in enumerate(TIMESTEPS):
        one = slice(i, i + 1)
        closed_t = stat_matching_loss(policy_eps_w[one], ref_eps_w[one], ddpm_eps_coefficient(scheduler, timesteps[one]))
        direct_t = direct_eq8(scheduler, policy_eps_w[one], ref_eps_w[one], latent_t[one], [t])
        torch.testing.assert_close(closed_t, direct_t, rtol=3e-4, atol=0, msg=f"t={t}")


def test_ddpm_step_at_t0_adds_no_noise_so_the_seed_does_not_matter():
    scheduler = sd15_ddpm()
    latent_t, policy_eps_w, ref_eps_w = random_case(1)
    # At t=0 DDPMScheduler.step draws no variance noise (`if t > 0`) and prev_sample is the
    # posterior mean (alphabar_{-1} = 1): the generator is untouched...
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    out = scheduler.step(policy_eps_w, 0, latent_t, generator=g)
    assert torch.equal(g.get_state(), state)
    # ... prev_sample = (l^0 - beta_0 / sqrt(1 - alphabar_0) * eps) / sqrt(alpha_0) with alphabar_0 = alpha_0
    beta_0 = scheduler.betas[0].double()
    mean = (latent_t - beta_0 / (1 - (1 - beta_0)).sqrt() * policy_eps_w) / (1 - beta_0).sqrt()
    torch.testing.assert_close(out.prev_sample, mean, rtol=1e-5, atol=1e-6)
    # ... so eq. 8 at t=0 holds even with different seeds for policy and reference
    closed = stat_matching_loss(policy_eps_w, ref_eps_w, ddpm_eps_coefficient(scheduler, torch.tensor([0])))
    direct = direct_eq8(scheduler, policy_eps_w, ref_eps_w, latent_t, [0], seed=1, ref_seed=2)
    torch.testing.assert_close(closed, direct, rtol=3e-4, atol=0)


def test_eq8_needs_the_same_sampler_noise_for_t_above_0():
    # With different seeds the noise sigma_t * z no longer cancels: the closed form is only eq. 8
    # for a shared noise draw (which is what the paper's l_tgt / l_ref comparison means).
    scheduler = sd15_ddpm()
    latent_t, policy_eps_w, ref_eps_w = random_case(1)
    closed = stat_matching_loss(policy_eps_w, ref_eps_w, ddpm_eps_coefficient(scheduler, torch.tensor([500])))
    direct = direct_eq8(scheduler, policy_eps_w, ref_eps_w, latent_t, [500], seed=1, ref_seed=2)
    assert abs(direct.item() / closed.item() - 1) > 0.5


def test_clip_sample_would_break_the_linearity():
    # diffusers' default DDPMScheduler clamps the predicted x0 to [-1, 1]. At t=999,
    # x0 = (l - sqrt(1 - alphabar) eps) / sqrt(alphabar) with sqrt(alphabar_999) ~ 0.068 is far
    # outside [-1, 1], so both steps clamp to nearly the same x0 and the eps difference is lost.
    clipped = sd15_ddpm(clip_sample=True)
    unclipped = sd15_ddpm()
    latent_t, policy_eps_w, ref_eps_w = random_case(1)
    closed = stat_matching_loss(policy_eps_w, ref_eps_w, ddpm_eps_coefficient(unclipped, torch.tensor([999])))
    direct_clipped = direct_eq8(clipped, policy_eps_w, ref_eps_w, latent_t, [999])
    assert abs(direct_clipped.item() / closed.item() - 1) > 0.5


def test_ddpm_step_difference_is_minus_coef_times_the_eps_difference():
    # eq. 8 element by element: x_prev(eps_a) - x_prev(eps_b) = -coef_t * (eps_a - eps_b) for two real
    # DDPMScheduler.step calls with the same sampler noise (same generator seed), i.e.
    # l_tgt - l_ref = coef_t * (eps_ref - eps_policy).
    scheduler = sd15_ddpm()
    x_t, eps_a, eps_b = random_case(1)
    coef = ddpm_eps_coefficient(scheduler, torch.tensor(TIMESTEPS)).double()
    for i, t in enumerate(TIMESTEPS):
        x_a = scheduler.step(eps_a, t, x_t, generator=torch.Generator().manual_seed(3)).prev_sample
        x_b = scheduler.step(eps_b, t, x_t, generator=torch.Generator().manual_seed(3)).prev_sample
        # rtol: the float32 schedule, see test_stat_matching_loss_equals_two_real_ddpm_steps (8.5e-5 measured)
        torch.testing.assert_close(x_a - x_b, -coef[i] * (eps_a - eps_b), rtol=1e-4, atol=1e-12, msg=f"t={t}")


# ---------------------------------------------------------------- sampling_prev_timestep, ddim_eps_coefficient

def test_sampling_prev_timestep_by_hand():
    scheduler = sd15_ddpm()
    # 50 steps: 1000 // 50 = 20: 981 - 20 = 961, 501 - 20 = 481, 19 - 20 = -1, 0 - 20 = -20
    prev = sampling_prev_timestep(scheduler, torch.tensor([981, 501, 19, 0]), 50)
    assert prev.tolist() == [961, 481, -1, -20] and prev.dtype == torch.int64
    # 30 steps: integer division, 1000 // 30 = 33 (not 33.3): 990 - 33 = 957
    assert sampling_prev_timestep(scheduler, torch.tensor([990]), 30).tolist() == [957]
    # 1000 steps: the training chain, t - 1
    assert sampling_prev_timestep(scheduler, torch.tensor([500, 0]), 1000).tolist() == [499, -1]


def test_sampling_prev_timestep_is_the_next_timestep_of_a_leading_ddim_schedule():
    for steps, offset in ((50, 0), (50, 1), (30, 1), (7, 0)):
        ddim = sd15_ddim(steps, steps_offset=offset)
        assert ddim.config.timestep_spacing == "leading"
        prev = sampling_prev_timestep(ddim, ddim.timesteps, steps)
        assert torch.equal(prev[:-1], ddim.timesteps[1:]), (steps, offset)
        assert prev[-1] < 0  # the last step goes to x0


def test_sampling_prev_timestep_refuses_bad_arguments():
    scheduler = sd15_ddpm()
    for steps in (0, 1001, 2.0, True):
        with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 1000\]"):
            sampling_prev_timestep(scheduler, torch.tensor([5]), steps)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\); got \[-1\]"):
        sampling_prev_timestep(scheduler, torch.tensor([-1]), 50)
    with pytest.raises(ValueError, match="integer tensor"):
        sampling_prev_timestep(scheduler, torch.tensor([5.0]), 50)


def test_ddim_eps_coefficient_by_hand():
    scheduler = sd15_ddpm()
    abar = scheduler.alphas_cumprod.double()
    # c = sqrt(a_p / a_t) * sqrt(1 - a_t) - sqrt(1 - a_p), from the scheduler's float32 alphabar
    a_t, a_p = abar[981].item(), abar[961].item()
    c_981 = math.sqrt(a_p / a_t) * math.sqrt(1 - a_t) - math.sqrt(1 - a_p)  # 0.12325
    # final step with set_alpha_to_one (a bare DDPMScheduler's config has no set_alpha_to_one: DDIM's
    # default True): a_p = 1, c = sqrt((1 - a_0) / a_0) with a_0 = 1 - beta_0:
    # sqrt(0.00085 / 0.99915) = 0.0291668, the DDPM coefficient at t=0 (both steps land on x0_hat)
    c_0 = math.sqrt(0.00085 / (1 - 0.00085))
    coef = ddim_eps_coefficient(scheduler, torch.tensor([981, 0]), torch.tensor([961, -20]))
    assert coef.shape == (2,) and coef.dtype == torch.float32
    # rtol: 1 - a_0 = 8.5e-4 from the float32 a_0, as in test_ddpm_eps_coefficient_by_hand_at_t0_and_t1
    torch.testing.assert_close(coef, torch.tensor([c_981, c_0]), rtol=3e-5, atol=0)
    # the DDPM one reads beta_0 = 0.00085 where this one reads 1 - alphabar_0: equal up to alphabar_0's float32 rounding
    torch.testing.assert_close(coef[1:], ddpm_eps_coefficient(scheduler, torch.tensor([0])), rtol=5e-5, atol=0)


def test_ddim_eps_coefficient_final_step_follows_set_alpha_to_one():
    # SD1.5's scheduler_config.json has set_alpha_to_one false and steps_offset 1; a DDPMScheduler
    # loaded from it keeps the key in its config, and the DDIM sampler built from that config uses
    # final_alpha_cumprod = alphabar_0.
    sd15_config = dict(sd15_ddpm().config) | {"set_alpha_to_one": False, "steps_offset": 1}
    ddpm = DDPMScheduler.from_config(sd15_config)
    # the hand values from the scheduler's float32 alphabar_0, alphabar_1 (c_1 below is a difference of
    # terms 3x larger: the float32 rounding of 1 - a_0 = 8.5e-4 would show in it at 1e-4 relative)
    a_0, a_1 = ddpm.alphas_cumprod.double()[:2].tolist()  # (1 - beta_0), (1 - beta_0) * (1 - beta_1)
    # t=1 -> -19 (SD1.5's last step): a_p = a_0: c = sqrt(a_0 / a_1) * sqrt(1 - a_1) - sqrt(1 - a_0)
    #   = 0.04131 - 0.02916 = 0.01214
    c_1 = math.sqrt(a_0 / a_1) * math.sqrt(1 - a_1) - math.sqrt(1 - a_0)
    # t=0 -> -20: a_p = a_0 = a_t: c = 0 (the final step leaves x_0 as it is)
    coef = ddim_eps_coefficient(ddpm, torch.tensor([1, 0]), torch.tensor([-19, -20]))
    torch.testing.assert_close(coef[0], torch.tensor(c_1, dtype=torch.float32), rtol=1e-6, atol=0)
    assert coef[1].item() == 0.0
    # with set_alpha_to_one (a_p = 1): t=1 -> c = sqrt((1 - a_1) / a_1) = 0.04131
    coef_one = ddim_eps_coefficient(sd15_ddpm(), torch.tensor([1]), torch.tensor([-19]))
    torch.testing.assert_close(coef_one, torch.tensor([math.sqrt((1 - a_1) / a_1)], dtype=torch.float32),
                               rtol=1e-6, atol=0)
    # the DDPM training scheduler and the DDIM sampler of one config give the same coefficients
    ddim = sd15_ddim(50, set_alpha_to_one=False, steps_offset=1)
    prev = sampling_prev_timestep(ddim, ddim.timesteps, 50)
    assert torch.equal(ddim_eps_coefficient(ddpm, ddim.timesteps, prev),
                       ddim_eps_coefficient(ddim, ddim.timesteps, prev))


@pytest.mark.parametrize("set_alpha_to_one, steps_offset", [(True, 0), (False, 1)])  # (False, 1): SD1.5's
def test_ddim_step_difference_is_minus_coef_times_the_eps_difference(set_alpha_to_one, steps_offset):
    # Every step of a real 50-step DDIM schedule (eta = 0), including the last one (prev < 0):
    # x_prev(eps_a) - x_prev(eps_b) = -c * (eps_a - eps_b) element by element, from the same x_t.
    ddim = sd15_ddim(50, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset)
    x_t, eps_a, eps_b = random_case(2)
    prev = sampling_prev_timestep(ddim, ddim.timesteps, 50)
    assert prev[-1] < 0
    coef = ddim_eps_coefficient(ddim, ddim.timesteps, prev).double()
    for i, t in enumerate(ddim.timesteps.tolist()):
        x_a = ddim.step(eps_a, t, x_t, eta=0.0).prev_sample
        x_b = ddim.step(eps_b, t, x_t, eta=0.0).prev_sample
        # rtol: the step's alphabar and its square roots are float32, and c is a difference of two
        # terms ~10x larger than c at high t: 1.3e-6 relative at worst over the schedule (measured).
        torch.testing.assert_close(x_a - x_b, -coef[i] * (eps_a - eps_b), rtol=3e-6, atol=1e-12, msg=f"t={t}")
    # and through stat_matching_loss: the channel means of the two steps, as eq. 8 takes them
    i = 25  # a mid timestep (481 or 480)
    t = ddim.timesteps[i].item()
    l_tgt = ddim.step(eps_a, t, x_t).prev_sample  # eps_a as the policy's prediction
    l_ref = ddim.step(eps_b, t, x_t).prev_sample
    direct = ((l_tgt.mean(dim=(2, 3)) - l_ref.mean(dim=(2, 3))) ** 2).sum(dim=1).mean()
    closed = stat_matching_loss(eps_a, eps_b, coef[i].expand(2))
    torch.testing.assert_close(closed, direct, rtol=1e-5, atol=0)


def test_ddim_coefficient_at_50_steps_is_about_ten_times_the_ddpm_one_mid_schedule():
    # Measured: c_DDIM(t -> t-20) / coef_DDPM(t) = 10.06 .. 10.29 for t = 201 .. 801 (and 10.46 at
    # t = 981, 14.7 at t = 21 (prev = 1), 2.0 at t = 1); so the same lambda_stat weighs the
    # stat-matching term about 100x more with a 50-step DDIM step than with the paper's DDPM step.
    scheduler = sd15_ddpm()
    t = torch.tensor([201, 301, 401, 501, 601, 701, 801])
    ratio = ddim_eps_coefficient(scheduler, t, sampling_prev_timestep(scheduler, t, 50)) / ddpm_eps_coefficient(
        scheduler, t)
    assert bool((ratio > 9).all()) and bool((ratio < 11).all()), ratio.tolist()


def test_ddim_eps_coefficient_refuses_schedulers_whose_step_is_not_affine_in_eps():
    t, prev = torch.tensor([500]), torch.tensor([480])
    with pytest.raises(ValueError, match=r"scheduler.clip_sample=True"):
        ddim_eps_coefficient(sd15_ddim(clip_sample=True), t, prev)
    with pytest.raises(ValueError, match=r"scheduler.clip_sample=True"):
        ddim_eps_coefficient(DDIMScheduler(), t, prev)  # diffusers' bare DDIMScheduler clips
    with pytest.raises(ValueError, match=r"scheduler.thresholding=True"):
        ddim_eps_coefficient(sd15_ddim(thresholding=True), t, prev)
    with pytest.raises(ValueError, match=r"scheduler.prediction_type='v_prediction'"):
        ddim_eps_coefficient(sd15_ddpm(prediction_type="v_prediction"), t, prev)
    # a zero-SNR schedule: alphabar_999 = 0, and x0_hat = (x_t - eps) / 0
    zero_snr = sd15_ddpm(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match=r"alphabar_t = 0 at timesteps \[999\]"):
        ddim_eps_coefficient(zero_snr, torch.tensor([500, 999]), torch.tensor([480, 979]))
    assert ddim_eps_coefficient(zero_snr, torch.tensor([998]), torch.tensor([978])).item() > 0


def test_ddim_eps_coefficient_refuses_bad_timesteps():
    scheduler = sd15_ddpm()
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\); got \[1000\]"):
        ddim_eps_coefficient(scheduler, torch.tensor([1000]), torch.tensor([980]))
    with pytest.raises(ValueError, match=r"prev_timesteps must be < timesteps .*prev_timesteps=\[480, 20\] "
                                         r"for timesteps=\[500, 20\]"):
        ddim_eps_coefficient(scheduler, torch.tensor([500, 20]), torch.tensor([480, 20]))
    with pytest.raises(ValueError, match=r"prev_timesteps must be an integer tensor of the shape of timesteps \(2,\)"):
        ddim_eps_coefficient(scheduler, torch.tensor([500, 20]), torch.tensor([480]))
    with pytest.raises(ValueError, match=r"prev_timesteps must be an integer tensor"):
        ddim_eps_coefficient(scheduler, torch.tensor([500]), torch.tensor([480.0]))


# ---------------------------------------------------------------------------- total_loss (eq. 9), sft_loss

def test_total_loss_by_hand():
    # L_DPO + lambda_stat * L_stat = 0.69 + 10000 * 2e-5 = 0.69 + 0.2 = 0.89
    torch.testing.assert_close(total_loss(t64(0.69), t64(2e-5)), t64(0.89))
    # lambda_stat = 3: 0.69 + 3 * 2e-5 = 0.69006
    torch.testing.assert_close(total_loss(t64(0.69), t64(2e-5), lambda_stat=3.0), t64(0.69006))
    # the DPO-only ablation: lambda_stat = 0 -> L_DPO
    torch.testing.assert_close(total_loss(t64(0.69), t64(2e-5), lambda_stat=0.0), t64(0.69))
    with pytest.raises(ValueError, match=r"lambda_stat must be >= 0 \(got -1.0\)"):
        total_loss(t64(0.69), t64(2e-5), lambda_stat=-1.0)


def test_sft_loss_by_hand():
    # the same numbers as test_per_sample_error_by_hand: per-sample errors 2.5 and 5.0 -> (2.5 + 5.0) / 2 = 3.75
    eps = t64([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])
    policy_eps_w = t64([[[[0.0, 0.0]]], [[[3.0, -1.0]]]]).requires_grad_()
    loss = sft_loss(policy_eps_w, eps)
    assert loss.item() == pytest.approx(3.75, rel=1e-12)
    # also the plain element-wise MSE: (1 + 4 + 9 + 1) / 4 = 15 / 4 = 3.75
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(policy_eps_w, eps).item())
    loss.backward()
    # d/d pred = 2 * (pred - eps) / 4:
    #   2 * (0 - 1) / 4 = -0.5, 2 * (0 - 2) / 4 = -1, 2 * (3 - 0) / 4 = 1.5, 2 * (-1 - 0) / 4 = -0.5
    torch.testing.assert_close(policy_eps_w.grad, t64([[[[-0.5, -1.0]]], [[[1.5, -0.5]]]]))
