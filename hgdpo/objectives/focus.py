"""FocusDPO's adaptive-focus loss weight, adapted to text-to-image Diffusion-DPO on (winner, loser) pairs.

FocusDPO (Jin et al., "Dynamic Preference Optimization for Multi-Subject Personalized Image Generation
via Adaptive Focus", arXiv 2509.01181) weights the Diffusion-DPO error per region. Its paper describes
four ideas but publishes neither code nor equations, so the formulas below are ours, each built to
carry one of those ideas as directly as the pair pool allows:

1. **Semantic correspondence** (well-matched patches low priority, regions of difference high):
   the per-patch feature is the latent's channel vector averaged over a ``k x k`` patch (stride 1,
   'same' padding, borders averaged over the in-image pixels only), and the difference map is

       f_x = avgpool_k(lat_x)                                   # (B, C, h, w), x in {w, l}
       d   = (1 - cos(f_w, f_l)) / 2                            # (B, 1, h, w) in [0, 1]

   (cosine over the channel axis at each position; ``d = 0`` where the two features are equal, also
   when both are zero, and ``1/2`` where only one is zero: no direction to compare). Correspondence
   is a property of the pair, so there is one map for both latents.
2. **Supervision-image complexity** (information-rich patches rewarded): the local entropy of the
   Gaussian-smoothed winner (the image DPO pulls the policy towards). Each channel of
   ``blur_sigma(lat_w)`` is min-max normalised over the image and quantised into ``bins`` levels;
   in each ``k x k`` window (same padding and border rule) the levels' histogram ``p`` gives

       x = mean_C( -sum_b p_b log p_b ) / log(bins)             # (B, 1, h, w) in [0, 1]

   (the histogram is a one-hot of the levels, average-pooled). The smoothing suppresses the
   pixel-level noise of the VAE's latent, so that entropy measures structure, not jitter. With
   ``k^2 < bins`` the largest reachable value is ``log(k^2) / log(bins)`` (0.79 at the defaults); the
   min-max normalisation in the final weight removes that scale. A constant channel has entropy 0.
3. **Progression over noise timesteps** (the complexity term only at the later, less noisy steps):

       s(t) = clamp((t_hi - t) / (t_hi - t_lo), 0, 1)           # (B,): 0 for t >= t_hi, 1 for t <= t_lo

   At large ``t`` the noisy latent has lost the fine detail and the UNet decides the layout, so
   rewarding texture-rich patches there would weight what cannot yet be predicted; below ``t_hi``
   detail becomes learnable and the complexity term ramps in linearly, at full strength below
   ``t_lo`` (``t_lo == t_hi``: a step at ``t_lo``). The correspondence term applies at every ``t``:
   where the pair differs matters for the layout as much as for the detail.
4. **Low prediction confidence penalised**: the reference model's per-pixel error on the winner
   measures how uncertain the frozen model is there,

       e = mean_C (ref_w - eps)^2                               # (B, 1, h, w)
       c = 1 / (1 + e / mean_hw(e))                             # (B, 1, h, w) in (0, 1]

   ``c`` is 1 where the reference is exact, 1/2 at the image's mean error, and decays like
   ``mean(e) / e`` for outliers. The per-sample mean makes it relative within the image: the error's
   overall size changes by orders of magnitude with ``t``, which says nothing about where the model
   is unsure. We chose this rational form over ``exp(-e / mean)``: both are 1 at zero error and
   decreasing, but the exponential erases an outlier (``exp(-20)`` is 2e-9, and at 128x88 a
   one-pixel outlier can reach ``e / mean = h * w``, ``exp`` of which underflows to an exact 0 in
   float32) while ``c >= 1 / (1 + h * w)`` stays positive: a region the reference gets badly wrong
   is down-weighted but still takes part in the preference. ``gamma_c`` sharpens it.

Final weight (the same for the winner and the loser, and for the policy and the reference errors):

    W_raw = (1 + alpha_d * minmax(d) + alpha_c * s(t) * minmax(x)) * c ** gamma_c
    W     = W_raw / mean_hw(W_raw)                              # (B, 1, h, w), mean 1 per sample

``minmax`` is ``hgdpo.objectives.masks.minmax_normalise`` per sample (a constant map gives 0, so a pair with no
difference, or a flat winner, falls back to the other terms); it makes ``alpha_d`` and ``alpha_c``
the contrast between the sample's most and least emphasised positions whatever the raw maps' range.
``W > 0`` always: the bracket is ``>= 1`` and ``c > 0``; its smallest value is at least
``(1 + h*w) ** -gamma_c / (1 + alpha_d + alpha_c)`` (about 3.5e-5 at the defaults and 128x88; float32 holds
that for ``gamma_c`` up to about 9). ``W`` is detached. The mean normalisation keeps the loss scale
that of plain Diffusion-DPO: ``losses.weighted_per_sample_error`` already divides by ``sum(W)``, so
``beta`` keeps its meaning, and a mean of 1 makes the map itself readable (above 1: counted more
than plain DPO counts it) and keeps the scale if it is ever used in an unnormalised sum. With
``alpha_d = alpha_c = gamma_c = 0``, ``W = 1``: plain Diffusion-DPO.

**Latents, not images.** FocusDPO compares images (patch features of decoded pictures); decoding
both latents by the VAE in every micro-step would cost more than the UNet passes. SD's latent is
spatially aligned with the image at 1/8 resolution (one latent pixel is an 8x8 image patch, so the
weight lands on the positions whose noise it scales), and its 4 channels carry the patch's colour
and structure, so cosine similarity and entropy on the latent are a patch-level proxy for the same
maps on the image, at no decoding cost.

Use (in ``trainer.micro_step``, with the reference's predictions already computed)::

    weight = focus_weight(lat_w, lat_l, t, ref[:m], noise, settings)        # (m, 1, h, w)
    weight2 = torch.cat([weight, weight])                                   # winner and loser
    policy_err = losses.weighted_per_sample_error(noise2, policy, weight2)  # (2m,)
    ref_err = losses.weighted_per_sample_error(noise2, ref, weight2)        # (2m,)

Shapes: ``B`` pairs, latents ``(B, C, h, w)``; every map is ``(B, 1, h, w)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hgdpo.config.core import doc
from hgdpo.objectives.base import PICTURE_TIMESTEPS, Predictions, reference_pass
from hgdpo.objectives.dpo import DPO
from hgdpo.objectives.losses import _float, _require_same_shape
from hgdpo.objectives.masks import gaussian_blur, minmax_normalise
from hgdpo.report.pictures import weight_grid

__all__ = [
    "Focus",
    "FocusConfig",
    "FocusSettings",
    "difference_map",
    "complexity_map",
    "complexity_schedule",
    "confidence",
    "focus_weight",
]


@dataclass(frozen=True)
class FocusSettings:
    """The settings of FocusDPO's focus weight (see the module docstring for the formulas)."""

    alpha_d: float = 1.0
    """Weight of the pair's difference map (0: correspondence off); >= 0."""
    alpha_c: float = 0.5
    """Weight of the winner's complexity map at full strength (0: complexity off); >= 0."""
    gamma_c: float = 1.0
    """Exponent on the reference-confidence factor (0: confidence off); >= 0."""
    patch: int = 3
    """Patch (window) side k, in latent pixels, of the features and the local histograms; odd, >= 1."""
    bins: int = 16
    """Quantisation levels per channel for the complexity entropy; >= 2."""
    sigma: float = 1.0
    """Gaussian smoothing of the winner before the entropy, in latent pixels (0: none); >= 0."""
    complexity_t_hi: int = 600
    """Timestep at and above which the complexity term is off."""
    complexity_t_lo: int = 300
    """Timestep at and below which the complexity term is at full strength; 0 <= lo <= hi."""

    def __post_init__(self) -> None:
        for name in ("alpha_d", "alpha_c", "gamma_c", "sigma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0 (got {value})")
        if self.patch < 1 or self.patch % 2 == 0:
            raise ValueError(f"patch must be a positive odd number, so the window is centred (got {self.patch})")
        if self.bins < 2:
            raise ValueError(f"bins must be >= 2 (got {self.bins}): one level has no entropy")
        if self.complexity_t_lo < 0:
            raise ValueError(f"complexity_t_lo must be >= 0 (got {self.complexity_t_lo})")
        if self.complexity_t_lo > self.complexity_t_hi:
            raise ValueError(f"complexity_t_lo={self.complexity_t_lo} is larger than "
                             f"complexity_t_hi={self.complexity_t_hi}: the ramp runs from hi down to lo")


def _require_latent(name: str, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be (B, C, h, w); got shape {tuple(x.shape)}")


def _require_patch(patch: int) -> None:
    if patch < 1 or patch % 2 == 0:
        raise ValueError(f"patch must be a positive odd number (got {patch})")


def _box_mean(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean over the ``patch x patch`` window at each position, same size out; at the borders the mean
    of the in-image pixels only (no zeros from the padding)."""
    return F.avg_pool2d(x, patch, stride=1, padding=patch // 2, count_include_pad=False)


def difference_map(lat_w: torch.Tensor, lat_l: torch.Tensor, patch: int = 3) -> torch.Tensor:
    """Where the pair differs: ``d = (1 - cos(avgpool(lat_w), avgpool(lat_l))) / 2`` per position.

    Args:
        lat_w, lat_l: ``(B, C, h, w)`` clean latents of the winner and the loser.
        patch: odd side of the averaging window.

    Returns:
        ``(B, 1, h, w)`` in ``[0, 1]``: 0 where the patch features point the same way (equal patches
        included), 1 where opposite. Float32 (float64 for float64 input).
    """
    _require_latent("lat_w", lat_w)
    _require_same_shape("lat_w", lat_w, "lat_l", lat_l)
    _require_patch(patch)
    f_w = _box_mean(_float(lat_w), patch)  # (B, C, h, w)
    f_l = _box_mean(_float(lat_l), patch).to(f_w.dtype)  # (B, C, h, w)
    cos = F.cosine_similarity(f_w, f_l, dim=1).unsqueeze(1)  # (B, 1, h, w)
    # cosine_similarity gives 0 for a zero vector, so two equal zero features would read as half-different.
    same = (f_w == f_l).all(dim=1, keepdim=True)  # (B, 1, h, w)
    d = torch.where(same, torch.zeros_like(cos), (1.0 - cos) / 2)
    return d.clamp(0.0, 1.0)  # rounding can put |cos| a hair above 1


def _blur_size(sigma: float) -> int:
    """Gaussian kernel side for ``sigma``: out to 2 sigma each side (5 at sigma 1, as in ``hgdpo.objectives.masks``)."""
    return 2 * math.ceil(2 * sigma) + 1


def complexity_map(lat: torch.Tensor, patch: int = 3, bins: int = 16, sigma: float = 1.0) -> torch.Tensor:
    """Local entropy of the smoothed latent, averaged over channels, normalised by ``log(bins)``.

    Each channel of ``gaussian_blur(lat, sigma)`` is min-max normalised over the image and quantised
    into ``bins`` levels (level ``floor(v * bins)``, ``v = 1`` in the last); the levels' histogram in
    each ``patch x patch`` window (border windows hold only in-image pixels) gives the entropy.

    Args:
        lat: ``(B, C, h, w)`` a clean latent (the winner).
        patch: odd side of the histogram window.
        bins: quantisation levels, >= 2.
        sigma: Gaussian smoothing in latent pixels; 0: none.

    Returns:
        ``(B, 1, h, w)`` in ``[0, 1]``; 0 everywhere for a constant latent. Detached; float32 (float64
        for float64 input).
    """
    _require_latent("lat", lat)
    _require_patch(patch)
    if bins < 2:
        raise ValueError(f"bins must be >= 2 (got {bins})")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0 (got {sigma})")
    x = _float(lat.detach())
    if sigma > 0:
        x = gaussian_blur(x, _blur_size(sigma), sigma)  # (B, C, h, w)
    level = (minmax_normalise(x) * bins).floor().long().clamp(0, bins - 1)  # (B, C, h, w)
    B, C, h, w = level.shape
    one_hot = F.one_hot(level, bins).permute(0, 1, 4, 2, 3).to(x.dtype)  # (B, C, bins, h, w)
    p = _box_mean(one_hot.reshape(B, C * bins, h, w), patch).reshape(B, C, bins, h, w)
    plogp = torch.where(p > 0, p * p.clamp_min(torch.finfo(p.dtype).tiny).log(), torch.zeros_like(p))
    entropy = -plogp.sum(dim=2)  # (B, C, h, w)
    return (entropy.mean(dim=1, keepdim=True) / math.log(bins)).clamp(0.0, 1.0)  # (B, 1, h, w)


def complexity_schedule(t: torch.Tensor, t_lo: int = 300, t_hi: int = 600) -> torch.Tensor:
    """The complexity term's strength ``s(t)``: 0 for ``t >= t_hi``, 1 for ``t <= t_lo``, linear between.

    Args:
        t: ``(B,)`` timesteps.
        t_lo, t_hi: ``0 <= t_lo <= t_hi``; ``t_lo == t_hi`` is a step (1 at and below it, 0 above).

    Returns:
        ``(B,)`` float32 in ``[0, 1]``.
    """
    if t.dim() != 1:
        raise ValueError(f"t must be (B,); got shape {tuple(t.shape)}")
    if t_lo < 0:
        raise ValueError(f"t_lo must be >= 0 (got {t_lo})")
    if t_lo > t_hi:
        raise ValueError(f"t_lo={t_lo} is larger than t_hi={t_hi}")
    t = t.detach().to(torch.float32)
    if t_lo == t_hi:
        return (t <= t_lo).to(torch.float32)
    return ((t_hi - t) / (t_hi - t_lo)).clamp(0.0, 1.0)


def confidence(ref_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The reference model's confidence per pixel: ``c = 1 / (1 + e / mean_hw(e))``, ``e = mean_C (ref - eps)^2``.

    Args:
        ref_pred: ``(B, C, h, w)`` the reference's noise prediction (on the noisy winner).
        eps: ``(B, C, h, w)`` the forward-process noise.

    Returns:
        ``(B, 1, h, w)`` in ``(0, 1]``, 1/2 at the sample's mean error; 1 everywhere for an exact
        prediction. Detached; float32 (float64 for float64 input).
    """
    _require_latent("ref_pred", ref_pred)
    _require_same_shape("ref_pred", ref_pred, "eps", eps)
    e = ((_float(ref_pred.detach()) - _float(eps.detach())) ** 2).mean(dim=1, keepdim=True)  # (B, 1, h, w)
    mean = e.mean(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)  # (B, 1, 1, 1); 0 only if e == 0
    return 1.0 / (1.0 + e / mean)


def focus_weight(lat_w: torch.Tensor, lat_l: torch.Tensor, t: torch.Tensor, ref_w: torch.Tensor,
                 eps: torch.Tensor, settings: FocusSettings | None = None) -> torch.Tensor:
    """FocusDPO's loss weight of a pair: ``W = (1 + alpha_d d + alpha_c s(t) x) c^gamma_c``, mean 1 per sample.

    ``d``, ``x``: ``minmax_normalise`` of ``difference_map(lat_w, lat_l)`` and of
    ``complexity_map(lat_w)``; ``s``: ``complexity_schedule(t)``; ``c``: ``confidence(ref_w, eps)``.
    Pass the same weight to ``losses.weighted_per_sample_error`` for the winner and the loser, policy
    and reference.

    Args:
        lat_w, lat_l: ``(B, C, h, w)`` clean latents of the winner and the loser.
        t: ``(B,)`` the pair's timesteps.
        ref_w: ``(B, C, h, w)`` the reference's noise prediction on the noisy winner.
        eps: ``(B, C, h, w)`` the noise both latents were noised with.
        settings: ``FocusSettings()`` if ``None``.

    Returns:
        ``(B, 1, h, w)``, detached, strictly positive, mean 1 over ``(h, w)`` for each sample.
        Float32 (float64 for float64 latents).
    """
    s = settings if settings is not None else FocusSettings()
    _require_latent("lat_w", lat_w)
    for name, x in (("lat_l", lat_l), ("ref_w", ref_w), ("eps", eps)):
        _require_same_shape("lat_w", lat_w, name, x)
    if tuple(t.shape) != (lat_w.shape[0],):
        raise ValueError(f"t must have shape (B,) = ({lat_w.shape[0]},); got {tuple(t.shape)}")
    with torch.no_grad():
        lat_w, lat_l = _float(lat_w.detach()), _float(lat_l.detach())
        d = minmax_normalise(difference_map(lat_w, lat_l, s.patch))  # (B, 1, h, w)
        x = minmax_normalise(complexity_map(lat_w, s.patch, s.bins, s.sigma))  # (B, 1, h, w)
        ramp = complexity_schedule(t, s.complexity_t_lo, s.complexity_t_hi).to(device=d.device, dtype=d.dtype)
        c = confidence(ref_w, eps).to(d.dtype)  # (B, 1, h, w)
        raw = (1.0 + s.alpha_d * d + s.alpha_c * ramp[:, None, None, None] * x) * c**s.gamma_c
        return raw / raw.mean(dim=(2, 3), keepdim=True)  # (B, 1, h, w)


# ---------------------------------------------------------------------------------------------
# The objective: Diffusion-DPO with the focus weight on both errors

@dataclass(kw_only=True)
class FocusConfig:
    """The ``focus`` objective's keys of the train config."""

    TRAILING = True  # listed after the trainer's own settings

    focus_alpha_d: float = doc("focus: weight of the map of where winner and loser differ.", 1.0,
                               minimum=0, resume=True, sweep=True)
    focus_alpha_c: float = doc("focus: weight of the winner's local complexity, at low noise.", 0.5,
                               minimum=0, resume=True, sweep=True)
    focus_gamma_c: float = doc("focus: exponent of the reference's confidence (0: off).", 1.0, minimum=0, resume=True,
                               sweep=True)
    focus_t_lo: int = doc("focus: timestep at and below which the complexity term is at full strength.", 300,
                            minimum=0, maximum="focus_t_hi", resume=True, sweep=True)
    focus_t_hi: int = doc("focus: timestep at and above which the complexity term is off.", 600,
                          resume=True, sweep=True)


class Focus(DPO):
    name = "focus"
    summary = ("Diffusion-DPO with FocusDPO's region weight on both errors (where winner and loser differ, the "
               "winner's detail at low noise, less where the reference is unsure)")
    Settings = FocusConfig
    picture_name = "focus/weights.png"

    def settings(self) -> FocusSettings:
        c = self.cfg
        return FocusSettings(alpha_d=c.focus_alpha_d, alpha_c=c.focus_alpha_c, gamma_c=c.focus_gamma_c,
                             complexity_t_lo=c.focus_t_lo, complexity_t_hi=c.focus_t_hi)

    def loss(self, pred: Predictions):
        m = pred.m  # one weight per pair, on the winner's and the loser's errors alike
        weight = focus_weight(pred.lat_w, pred.lat_l, pred.t, pred.ref[:m], pred.noise, self.settings())
        return self.pair_loss(pred, *pred.errors(torch.cat([weight, weight])))

    def picture(self, unet, noise_scheduler, lat_w, lat_l, emb, noise, nouns, autocast):
        """The focus weight of each pair at ``PICTURE_TIMESTEPS``, with the pair's noise of the step."""
        weights = []
        for timestep in PICTURE_TIMESTEPS:
            t = torch.full((len(lat_w),), timestep, device=lat_w.device)
            with autocast:
                ref_w = reference_pass(unet, noise_scheduler.add_noise(lat_w, noise, t), t, emb)
            weights.append(focus_weight(lat_w, lat_l, t, ref_w, noise, self.settings())[:, 0])  # (m, h, w)
        return weight_grid(lat_w.cpu().numpy(), lat_l.cpu().numpy(), torch.stack(weights, dim=1).cpu().numpy(),
                           [f"W t={t}" for t in PICTURE_TIMESTEPS])
