"""The evaluation's statistics against hand-computed values, and the bootstrap interval's coverage."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from hgdpo.report.winrates import mean_hsv, outcomes, percent_change, rgb_to_hsv, win_rate


def test_outcomes_count_a_tie_as_half():
    assert outcomes([3.0, 1.0, 2.0, 0.2], [1.0, 1.0, 5.0, 0.1]).tolist() == [1.0, 0.5, 0.0, 1.0]


def test_win_rate_by_hand():
    # prompt p: A wins 2 of 2; prompt q: a tie and a loss; prompt r: one loss -> (2 + 0.5) / 5
    a, b = [2, 2, 1, 0, 0], [1, 1, 1, 1, 1]
    wr = win_rate(a, b, ["p", "p", "q", "q", "r"], resamples=500)
    assert wr.rate == pytest.approx(0.5)
    assert (wr.wins, wr.ties, wr.losses, wr.prompts, wr.comparisons) == (2, 1, 2, 3, 5)
    assert 0.0 <= wr.low <= wr.rate <= wr.high <= 1.0 and wr.low < wr.high


def test_all_wins_give_a_degenerate_interval():
    wr = win_rate(np.ones(10), np.zeros(10), np.arange(10))
    assert (wr.rate, wr.low, wr.high) == (1.0, 1.0, 1.0)


def test_swapping_a_and_b_mirrors_rate_and_interval():
    rng = np.random.default_rng(1)
    a, b, groups = rng.normal(size=60), rng.normal(size=60), np.repeat(np.arange(20), 3)
    ab, ba = win_rate(a, b, groups, seed=3), win_rate(b, a, groups, seed=3)
    assert ab.rate + ba.rate == pytest.approx(1.0)
    assert ab.low == pytest.approx(1 - ba.high) and ab.high == pytest.approx(1 - ba.low)


def test_interval_is_over_prompts_not_seeds():
    """Seeds of a prompt that always agree add no information: the interval must not shrink."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=50), rng.normal(size=50)
    one = win_rate(a, b, np.arange(50), seed=0)
    many = win_rate(np.repeat(a, 4), np.repeat(b, 4), np.repeat(np.arange(50), 4), seed=0)
    assert one.rate == many.rate
    assert (many.high - many.low) == pytest.approx(one.high - one.low, rel=0.15)


def test_interval_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true, prompts, hits, trials = 0.6, 200, 0, 200
    for t in range(trials):
        wins = rng.random(prompts) < true
        wr = win_rate(wins.astype(float), np.full(prompts, 0.5), np.arange(prompts), resamples=500, seed=t)
        hits += wr.low <= true <= wr.high
    assert 0.88 <= hits / trials <= 0.99


def test_rgb_to_hsv_matches_colorsys():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(500, 3), dtype=np.uint8)
    pixels[:3] = [[0, 0, 0], [255, 255, 255], [90, 90, 90]]  # black, white, grey: no hue
    ours = rgb_to_hsv(pixels)
    ref = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in pixels])
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_mean_hsv_per_image_and_percent_change():
    red = np.zeros((2, 4, 4, 3), np.uint8)
    red[..., 0] = 255
    red[1, :2] = 0  # half black: value 0.5, saturation 0.5 (black has no saturation), hue 0
    np.testing.assert_allclose(mean_hsv(red), [[0, 1, 1], [0, 0.5, 0.5]])
    np.testing.assert_allclose(percent_change([0.55, 0.4, 0.5], [0.5, 0.5, 0.5]), [10.0, -20.0, 0.0])
