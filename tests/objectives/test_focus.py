"""FocusDPO's focus weight (hgdpo.objectives.focus) on small hand-built latents, the arithmetic written out."""

from __future__ import annotations

import math

import pytest
import torch

from hgdpo.objectives.focus import (
    FocusSettings,
    complexity_map,
    complexity_schedule,
    confidence,
    difference_map,
    focus_weight,
)
from hgdpo.objectives.losses import per_sample_error, weighted_per_sample_error

B, C, H, W = 2, 4, 16, 16
REGION = (slice(None), slice(None), slice(5, 10), slice(6, 11))  # a 5x5 block of every sample


def latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def changed_in_region(lat_w: torch.Tensor) -> torch.Tensor:
    """The winner with the block replaced by its negative (opposite patch features there)."""
    lat_l = lat_w.clone()
    lat_l[REGION] = -lat_w[REGION]
    return lat_l


def in_region(mask_shape) -> torch.Tensor:
    inside = torch.zeros(mask_shape, dtype=torch.bool)
    inside[REGION] = True
    return inside


# ---------------------------------------------------------------------------- difference_map

def test_difference_map_identical_pair_is_zero_everywhere():
    lat = latents()
    assert torch.equal(difference_map(lat, lat.clone(), patch=3), torch.zeros(B, 1, H, W))


def test_difference_map_zero_latents_are_not_different():
    # cosine of two zero vectors is undefined; equal features count as matched.
    zero = torch.zeros(1, C, 4, 4)
    assert torch.equal(difference_map(zero, zero), torch.zeros(1, 1, 4, 4))


def test_difference_map_one_pixel_by_hand():
    # patch 1: the feature is the pixel's channel vector. Winner (1, 0, 0, 0) everywhere; the loser has
    # (0, 1, 0, 0) at (0, 0): cos 0, d = (1 - 0) / 2 = 0.5; and (-1, 0, 0, 0) at (1, 1): cos -1, d = 1.
    lat_w = torch.zeros(1, C, 3, 3)
    lat_w[:, 0] = 1.0
    lat_l = lat_w.clone()
    lat_l[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    lat_l[0, :, 1, 1] = torch.tensor([-1.0, 0.0, 0.0, 0.0])
    expected = torch.zeros(1, 1, 3, 3)
    expected[0, 0, 0, 0] = 0.5
    expected[0, 0, 1, 1] = 1.0
    torch.testing.assert_close(difference_map(lat_w, lat_l, patch=1), expected)


def test_difference_map_highest_where_only_the_loser_changed():
    lat_w = latents()
    d = difference_map(lat_w, changed_in_region(lat_w), patch=3)
    inside = in_region(d.shape)
    for b in range(B):
        assert d[b][inside[b]].max() > d[b][~inside[b]].max()
    # Inside the block, one pixel in from its edge, every 3x3 window is all-negated: features opposite, d = 1.
    torch.testing.assert_close(d[:, :, 6:9, 7:10], torch.ones(B, 1, 3, 3))
    # Two or more pixels outside the block the windows do not reach it: d = 0.
    assert torch.equal(d[:, :, :3], torch.zeros(B, 1, 3, W))


# ---------------------------------------------------------------------------- complexity_map

def test_complexity_of_a_flat_latent_is_zero():
    flat = torch.full((B, C, H, W), 0.7)
    assert torch.equal(complexity_map(flat), torch.zeros(B, 1, H, W))


def test_complexity_high_in_a_noisy_patch():
    lat = torch.zeros(1, C, H, W)
    lat[:, :, 4:12, 4:12] = torch.randn(1, C, 8, 8, generator=torch.Generator().manual_seed(1))
    x = complexity_map(lat, patch=3, bins=16, sigma=1.0)
    assert x[0, 0, 6:10, 6:10].min() > 0.3  # many levels in every window of the noise
    assert torch.equal(x[0, 0, :1], torch.zeros(1, W))  # far from it: all the same level
    assert x[0, 0, 6:10, 6:10].mean() > 10 * x[0, 0, :2].mean()


def test_complexity_checkerboard_by_hand():
    # sigma 0 (no smoothing), bins 2: one channel a 0/1 checkerboard (levels 0 and 1), three constant
    # channels (all level 0, entropy 0). An interior 3x3 window holds 5 of one level and 4 of the other:
    #   H = -(5/9 ln 5/9 + 4/9 ln 4/9);  x = (H + 0 + 0 + 0) / 4 / ln 2.
    # A corner window (2x2 in the image) holds 2 and 2: H = ln 2, x = 1/4.
    lat = torch.zeros(1, C, 6, 6)
    lat[0, 0] = ((torch.arange(6)[:, None] + torch.arange(6)[None, :]) % 2).float()
    x = complexity_map(lat, patch=3, bins=2, sigma=0.0)
    h_interior = -(5 / 9 * math.log(5 / 9) + 4 / 9 * math.log(4 / 9))
    torch.testing.assert_close(x[0, 0, 1:5, 1:5], torch.full((4, 4), h_interior / 4 / math.log(2)))
    torch.testing.assert_close(x[0, 0, 0, 0], torch.tensor(0.25))


def test_complexity_is_in_unit_range_and_detached():
    lat = latents().requires_grad_()
    x = complexity_map(lat, patch=3, bins=16, sigma=1.0)
    assert x.shape == (B, 1, H, W) and not x.requires_grad
    assert bool(((x >= 0) & (x <= 1)).all())


# ---------------------------------------------------------------------------- complexity_schedule

def test_schedule_values():
    # lo 300, hi 600: s = (600 - t) / 300 between; t = 450 is the midpoint, s = 150 / 300 = 0.5.
    t = torch.tensor([0, 300, 450, 600, 999])
    torch.testing.assert_close(complexity_schedule(t, 300, 600), torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]))


def test_schedule_with_lo_equal_hi_is_a_step():
    t = torch.tensor([299, 300, 301])
    torch.testing.assert_close(complexity_schedule(t, 300, 300), torch.tensor([1.0, 1.0, 0.0]))


def test_schedule_refuses_lo_above_hi():
    with pytest.raises(ValueError, match="t_lo=700 is larger than t_hi=600"):
        complexity_schedule(torch.tensor([0]), 700, 600)


# ---------------------------------------------------------------------------- confidence

def test_confidence_by_hand():
    # 2x2, C = 4: the reference is off by 2 in every channel at (0, 0), exact elsewhere.
    # e = 4 at (0, 0), 0 elsewhere; mean(e) = 4 / 4 = 1; c = 1 / (1 + 4 / 1) = 0.2 there, 1 / (1 + 0) = 1 elsewhere.
    eps = torch.zeros(1, C, 2, 2)
    ref = eps.clone()
    ref[0, :, 0, 0] = 2.0
    torch.testing.assert_close(confidence(ref, eps), torch.tensor([[[[0.2, 1.0], [1.0, 1.0]]]]))


def test_confidence_lower_where_the_reference_error_is_larger():
    eps = latents(1)
    ref = eps + 0.1 * latents(2)
    ref[REGION] += 3.0  # the reference is badly wrong in the block
    c = confidence(ref, eps)
    inside = in_region(c.shape)
    for b in range(B):
        assert c[b][inside[b]].max() < c[b][~inside[b]].min()
    assert bool(((c > 0) & (c <= 1)).all())


def test_confidence_of_an_exact_reference_is_one():
    eps = latents()
    assert torch.equal(confidence(eps.clone(), eps), torch.ones(B, 1, H, W))


# ---------------------------------------------------------------------------- focus_weight

def pair(seed: int = 0):
    lat_w = latents(seed)
    lat_l = changed_in_region(lat_w)
    eps = latents(seed + 10)
    ref_w = eps + 0.3 * latents(seed + 20)
    return lat_w, lat_l, eps, ref_w


def test_focus_weight_positive_mean_one_detached():
    lat_w, lat_l, eps, ref_w = pair()
    lat_w.requires_grad_()
    ref_w.requires_grad_()
    weight = focus_weight(lat_w, lat_l, torch.tensor([100, 800]), ref_w, eps, FocusSettings())
    assert weight.shape == (B, 1, H, W)
    assert not weight.requires_grad and weight.grad_fn is None
    assert bool((weight > 0).all())
    torch.testing.assert_close(weight.mean(dim=(1, 2, 3)), torch.ones(B))


def test_focus_weight_all_terms_off_is_one():
    lat_w, lat_l, eps, ref_w = pair()
    off = FocusSettings(alpha_d=0.0, alpha_c=0.0, gamma_c=0.0)
    weight = focus_weight(lat_w, lat_l, torch.tensor([0, 500]), ref_w, eps, off)
    torch.testing.assert_close(weight, torch.ones(B, 1, H, W))


def test_focus_weight_difference_only_highest_in_the_changed_region():
    lat_w, lat_l, eps, ref_w = pair()
    weight = focus_weight(lat_w, lat_l, torch.tensor([0, 999]), ref_w, eps,
                          FocusSettings(alpha_d=1.0, alpha_c=0.0, gamma_c=0.0))
    inside = in_region(weight.shape)
    for b in range(B):
        assert weight[b][inside[b]].max() > weight[b][~inside[b]].max()


def test_focus_weight_difference_only_by_hand():
    # patch 1, 4x4: one pixel flipped in the loser, d = 1 there and 0 elsewhere (min-max keeps that).
    # raw = 1 + alpha_d * 1 = 2 there, 1 at the other 15; mean = 17 / 16; W = 2 * 16 / 17 = 32/17 and 16/17.
    lat_w = torch.ones(1, C, 4, 4)
    lat_l = lat_w.clone()
    lat_l[0, :, 2, 1] = -1.0
    eps = torch.zeros(1, C, 4, 4)
    s = FocusSettings(alpha_d=1.0, alpha_c=0.0, gamma_c=0.0, patch=1)
    weight = focus_weight(lat_w, lat_l, torch.tensor([0]), eps.clone(), eps, s)
    expected = torch.full((1, 1, 4, 4), 16 / 17)
    expected[0, 0, 2, 1] = 32 / 17
    torch.testing.assert_close(weight, expected)


def test_focus_weight_confidence_only_by_hand():
    # The confidence case above: c = [[0.2, 1], [1, 1]]; gamma_c 1; mean = 3.2 / 4 = 0.8;
    # W = 0.2 / 0.8 = 0.25 at the wrong pixel, 1 / 0.8 = 1.25 elsewhere.
    lat = torch.ones(1, C, 2, 2)
    eps = torch.zeros(1, C, 2, 2)
    ref = eps.clone()
    ref[0, :, 0, 0] = 2.0
    s = FocusSettings(alpha_d=0.0, alpha_c=0.0, gamma_c=1.0)
    weight = focus_weight(lat, lat.clone(), torch.tensor([0]), ref, eps, s)
    torch.testing.assert_close(weight, torch.tensor([[[[0.25, 1.25], [1.25, 1.25]]]]))


def test_focus_weight_complexity_only_at_low_timesteps():
    lat_w, lat_l, eps, ref_w = pair()
    with_c = FocusSettings(alpha_d=1.0, alpha_c=0.5)
    without_c = FocusSettings(alpha_d=1.0, alpha_c=0.0)
    noisy = torch.tensor([600, 900])  # t >= complexity_t_hi: s = 0
    torch.testing.assert_close(focus_weight(lat_w, lat_l, noisy, ref_w, eps, with_c),
                               focus_weight(lat_w, lat_l, noisy, ref_w, eps, without_c))
    clean = torch.tensor([0, 300])  # t <= complexity_t_lo: s = 1
    assert not torch.allclose(focus_weight(lat_w, lat_l, clean, ref_w, eps, with_c),
                              focus_weight(lat_w, lat_l, clean, ref_w, eps, without_c))


def test_focus_weight_half_precision_inputs_give_float32():
    lat_w, lat_l, eps, ref_w = pair()
    weight = focus_weight(lat_w.half(), lat_l.half(), torch.tensor([100, 400]), ref_w.half(), eps.half())
    assert weight.dtype == torch.float32 and bool((weight > 0).all())


def test_focus_weight_refuses_mismatched_shapes():
    lat_w, lat_l, eps, ref_w = pair()
    with pytest.raises(ValueError, match="ref_w"):
        focus_weight(lat_w, lat_l, torch.tensor([0, 0]), ref_w[:, :3], eps)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        focus_weight(lat_w, lat_l, torch.tensor([0]), ref_w, eps)


def test_focus_weight_in_weighted_per_sample_error():
    # The trainer's layout: winner and loser in one (2B) batch, the pair's weight repeated for both.
    lat_w, lat_l, eps, ref_w = pair()
    weight = focus_weight(lat_w, lat_l, torch.tensor([100, 700]), ref_w, eps)  # (B, 1, H, W)
    weight2 = torch.cat([weight, weight])  # (2B, 1, H, W)
    eps2 = torch.cat([eps, eps])
    policy = eps2 + 0.2 * torch.cat([latents(30), latents(31)])
    err = weighted_per_sample_error(eps2, policy, weight2)
    assert err.shape == (2 * B,) and bool(torch.isfinite(err).all())
    # With every term off the weight is 1: plain per_sample_error.
    off = focus_weight(lat_w, lat_l, torch.tensor([100, 700]), ref_w, eps,
                       FocusSettings(alpha_d=0.0, alpha_c=0.0, gamma_c=0.0))
    torch.testing.assert_close(weighted_per_sample_error(eps2, policy, torch.cat([off, off])),
                               per_sample_error(eps2, policy))


# ---------------------------------------------------------------------------- FocusSettings

def test_settings_defaults():
    s = FocusSettings()
    assert (s.alpha_d, s.alpha_c, s.gamma_c, s.patch, s.bins) == (1.0, 0.5, 1.0, 3, 16)
    assert (s.complexity_t_lo, s.complexity_t_hi) == (300, 600)
    with pytest.raises(AttributeError):
        s.alpha_d = 2.0  # frozen


@pytest.mark.parametrize("field, value", [
    ("alpha_d", -0.1), ("alpha_c", -1.0), ("gamma_c", -0.5), ("sigma", -1.0), ("alpha_d", math.nan),
    ("patch", 4), ("patch", 0), ("bins", 1), ("complexity_t_lo", -1),
])
def test_settings_refuse_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FocusSettings(**{field: value})


def test_settings_refuse_lo_above_hi():
    with pytest.raises(ValueError, match="complexity_t_lo=700 is larger than complexity_t_hi=600"):
        FocusSettings(complexity_t_lo=700, complexity_t_hi=600)
