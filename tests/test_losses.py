"""HG-DPO losses against hand-computed values (arithmetic written out) and real DDPM steps."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from hgdpo.losses import (
    ddpm_eps_coefficient,
    dpo_loss,
    per_sample_error,
    sft_loss,
    stat_matching_loss,
    total_loss,
)


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
    beta, B = 2500.0, 2
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
