"""The evaluation's statistics (paper §4): win rates with bootstrap intervals, and colour (Table 2).

Pure numpy, so each figure can be checked by hand.

* A comparison is one (prompt, seed): A wins it when its score is higher, a tie counts half.
  The win rate is the mean over comparisons; its interval comes from resampling *prompts* with
  replacement (the seeds of a prompt are not independent of each other), percentile method.
* Colour: the mean hue, saturation and value of a model's images (each in [0, 1]), and A's
  percent change against the target model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def outcomes(score_a: np.ndarray, score_b: np.ndarray) -> np.ndarray:
    """Per comparison: 1 if A scores higher, 0.5 on a tie, 0 if B scores higher."""
    a, b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


@dataclass(frozen=True)
class WinRate:
    rate: float  # mean outcome over all comparisons
    low: float  # the bootstrap interval
    high: float
    wins: int
    ties: int
    losses: int
    prompts: int

    @property
    def comparisons(self) -> int:
        return self.wins + self.ties + self.losses


def win_rate(score_a: np.ndarray, score_b: np.ndarray, groups: np.ndarray, *, resamples: int = 2000,
             confidence: float = 0.95, seed: int = 0) -> WinRate:
    """Win rate of A over B with a bootstrap interval over prompts.

    ``score_a``, ``score_b``: one score per comparison; ``groups``: the prompt of each comparison
    (any hashable labels). Each resample draws as many prompts as there are, with replacement,
    and takes the mean outcome of all their comparisons.
    """
    out = outcomes(score_a, score_b)
    if out.size == 0:
        raise ValueError("win_rate: no comparisons")
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    k = int(index.max()) + 1
    sums = np.bincount(index, weights=out, minlength=k)  # per prompt: sum of outcomes, count
    counts = np.bincount(index, minlength=k).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, k, size=(resamples, k))
    rates = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(rates, [tail, 1 - tail])
    return WinRate(float(out.mean()), float(low), float(high), int((out == 1).sum()), int((out == 0.5).sum()),
                   int((out == 0).sum()), k)


def rgb_to_hsv(images: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (..., 3) float64 HSV, each in [0, 1] (hue 0 for grey pixels)."""
    rgb = np.asarray(images, dtype=np.float64) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    delta = v - rgb.min(axis=-1)
    s = np.where(v > 0, delta / np.where(v > 0, v, 1), 0.0)
    d = np.where(delta > 0, delta, 1)
    h = np.where(v == r, (g - b) / d % 6, np.where(v == g, (b - r) / d + 2, (r - g) / d + 4))
    h = np.where(delta > 0, h / 6.0, 0.0)
    return np.stack([h, s, v], axis=-1)


def mean_hsv(images: np.ndarray) -> np.ndarray:
    """Per image (B, H, W, 3) uint8 -> (B, 3): its mean hue, saturation and value."""
    return rgb_to_hsv(images).mean(axis=(1, 2))


def percent_change(value: np.ndarray, target: np.ndarray) -> np.ndarray:
    """100 * (value - target) / target: the paper's Table 2 figure of a model against the target model."""
    value, target = np.asarray(value, dtype=np.float64), np.asarray(target, dtype=np.float64)
    return 100.0 * (value - target) / target
