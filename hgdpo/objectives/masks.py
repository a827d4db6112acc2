"""OSPO's object masks and loss weights from cross-attention maps (``hgdpo.models.attention``).

Pure functions of tensors. From the maps of a prompt's tokens (``Capture.mean``, ``(B, T, H, W)``):

    nouns = noun_maps(maps, [[2], [5, 6]], tokens=cap.tokens)   # (B, N, H, W) one map per noun
    mask = object_mask(nouns, otsu_scale=0.8)                    # (B, 1, H, W) binary, OR over nouns
    weight = mask_weight(mask, alpha=1.0, gamma_m=1.0)           # (B, 1, H, W) in [1, 1 + alpha]
    weight = resize_to_latent(weight, latents.shape[-2:])        # (B, 1, h, w)

``object_weight`` chains the first three. Per noun map: min-max normalise over the image, then
keep the positions at or above ``otsu_scale`` times the map's Otsu threshold (256-bin histogram
on [0, 1]). The nouns' masks are OR-ed, blurred by a 5x5 Gaussian (sigma 1), min-max normalised
again, raised to ``gamma_m`` and turned into the weight ``w = 1 + alpha * m``.

Degenerate maps never give NaN: a constant map (max == min) normalises to 0, so a noun whose map
is constant selects nothing, and a mask that is constant after the blur (no object, or object
everywhere) gives ``m = 0``: weight 1 everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "mask_weights",
    "noun_maps",
    "minmax_normalise",
    "otsu_threshold",
    "object_mask",
    "gaussian_blur",
    "mask_weight",
    "object_weight",
    "resize_to_latent",
]

OTSU_BINS = 256
OTSU_SCALE = 0.8
BLUR_SIZE = 5
BLUR_SIGMA = 1.0


def _require_4d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W); got shape {tuple(x.shape)}")


def noun_maps(maps: torch.Tensor, nouns: Sequence[Sequence[int]],
              tokens: Sequence[int] | None = None) -> torch.Tensor:
    """One map per noun: the mean of the maps of its sub-tokens.

    Args:
        maps: ``(B, T, H, W)`` attention maps, axis 1 in the order of ``tokens``.
        nouns: per noun, its text token indices (a noun may be several BPE tokens).
        tokens: the token index of each of ``maps``' channels (``Capture.tokens``); ``None``: channel
            ``i`` is token ``i`` (maps of all tokens).

    Returns:
        ``(B, N, H, W)``, ``N = len(nouns)``.
    """
    _require_4d("maps", maps)
    if not nouns or any(len(noun) == 0 for noun in nouns):
        raise ValueError(f"nouns must be a non-empty list of non-empty token lists; got {nouns}")
    recorded = list(tokens) if tokens is not None else list(range(maps.shape[1]))
    if len(recorded) != maps.shape[1]:
        raise ValueError(f"tokens has {len(recorded)} indices but maps has {maps.shape[1]} channels")
    position = {t: i for i, t in enumerate(recorded)}
    per_noun = []
    for noun in nouns:
        bad = [t for t in noun if t not in position]
        if bad:
            shown = list(tokens) if tokens is not None else f"0..{maps.shape[1] - 1}"
            raise ValueError(f"nouns: token indices {bad} are not among the recorded tokens {shown}")
        per_noun.append(maps[:, [position[t] for t in noun]].mean(dim=1))  # (B, H, W)
    return torch.stack(per_noun, dim=1)  # (B, N, H, W)


def minmax_normalise(x: torch.Tensor) -> torch.Tensor:
    """``(x - min) / (max - min)`` over the last two (spatial) axes of each map; a constant map gives 0.

    Args:
        x: ``(..., H, W)``.

    Returns:
        ``(..., H, W)`` in ``[0, 1]``, the dtype of ``x``.
    """
    lo = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - lo
    flat = span == 0  # max == min: no object to tell from the background
    return torch.where(flat, torch.zeros_like(x), (x - lo) / torch.where(flat, torch.ones_like(span), span))


def otsu_threshold(x: torch.Tensor, bins: int = OTSU_BINS) -> torch.Tensor:
    """Otsu's threshold of each map: the cut of its histogram that maximises the between-class variance.

    The values on ``[0, 1]`` fall in ``bins`` equal bins (bin ``k`` holds ``k/bins <= x < (k+1)/bins``,
    ``x = 1`` the last). Cutting after bin ``k`` splits the pixels into the classes ``0..k`` and
    ``k+1..``, with weights ``w0, w1`` and mean bin centres ``mu0, mu1``; Otsu maximises
    ``w0 * w1 * (mu0 - mu1)^2``. The threshold is the cut's edge ``(k + 1) / bins``, so the upper
    class is exactly ``x >= threshold``. Equal maxima (empty bins between two modes) take the
    lowest cut. A map with one occupied bin has no cut (all variances 0): threshold ``1 / bins``.

    Args:
        x: ``(..., H, W)`` with values in ``[0, 1]`` (``minmax_normalise`` first).
        bins: histogram bins.

    Returns:
        ``(...,)`` thresholds, the dtype of ``x``.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be (..., H, W); got shape {tuple(x.shape)}")
    if bool(((x < 0) | (x > 1) | x.isnan()).any()):
        raise ValueError("otsu_threshold needs values in [0, 1]; min-max normalise the maps first")
    lead = x.shape[:-2]
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1]).double()  # (M, P)
    index = (flat * bins).floor().long().clamp(max=bins - 1)  # (M, P)
    counts = torch.zeros(flat.shape[0], bins, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, index, torch.ones_like(flat))  # (M, bins)
    p = counts / flat.shape[1]  # (M, bins)
    centres = (torch.arange(bins, dtype=torch.float64, device=x.device) + 0.5) / bins  # (bins,)
    n0 = counts.cumsum(dim=1)  # (M, bins) pixels in bins 0..k (exact integers)
    w0 = p.cumsum(dim=1)  # (M, bins) weight of bins 0..k
    m0 = (p * centres).cumsum(dim=1)  # (M, bins) first moment of bins 0..k
    mean = m0[:, -1:]  # (M, 1)
    split = (n0 > 0) & (n0 < flat.shape[1])  # both classes non-empty
    w0w1 = torch.where(split, w0 * (1.0 - w0), torch.ones_like(w0))
    # w0 w1 (mu0 - mu1)^2 = (mean w0 - m0)^2 / (w0 w1), with mu0 = m0 / w0, mu1 = (mean - m0) / w1.
    between = torch.where(split, (mean * w0 - m0) ** 2 / w0w1, torch.zeros_like(w0))  # (M, bins)
    cut = between.argmax(dim=1)  # (M,) first maximum
    return ((cut + 1).to(x.dtype) / bins).reshape(lead)


def object_mask(noun_maps: torch.Tensor, otsu_scale: float = OTSU_SCALE, bins: int = OTSU_BINS) -> torch.Tensor:
    """Binary object mask: per noun, min-max normalise and keep ``x >= otsu_scale * otsu_threshold``;
    OR over nouns.

    Args:
        noun_maps: ``(B, N, H, W)`` one attention map per noun (``noun_maps``).
        otsu_scale: factor on each map's Otsu threshold (OSPO: 0.8; below 1 widens the mask), > 0.

    Returns:
        ``(B, 1, H, W)`` of 0. and 1., the dtype of ``noun_maps``.
    """
    _require_4d("noun_maps", noun_maps)
    if not otsu_scale > 0:
        raise ValueError(f"otsu_scale must be positive (got {otsu_scale})")
    x = minmax_normalise(noun_maps)  # (B, N, H, W)
    threshold = otsu_scale * otsu_threshold(x, bins)  # (B, N)
    # A constant map is 0 everywhere and the threshold is >= otsu_scale / bins > 0: it selects nothing.
    keep = x >= threshold[..., None, None]  # (B, N, H, W)
    return keep.any(dim=1, keepdim=True).to(noun_maps.dtype)  # (B, 1, H, W)


def gaussian_blur(x: torch.Tensor, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Separable ``size x size`` Gaussian blur of each channel, weights summing to 1, borders replicated
    (so a constant image stays that constant).

    Args:
        x: ``(B, C, H, W)``.

    Returns:
        ``(B, C, H, W)``.
    """
    _require_4d("x", x)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd number (got {size})")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive (got {sigma})")
    offsets = torch.arange(size, dtype=torch.float64, device=x.device) - size // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.dtype)  # (size,)
    channels = x.shape[1]
    pad = size // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    y = F.conv2d(y, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)  # along W
    return F.conv2d(y, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)  # along H


def mask_weight(mask: torch.Tensor, alpha: float = 1.0, gamma_m: float = 1.0,
                blur_size: int = BLUR_SIZE, blur_sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Loss weight from a binary mask: ``m = minmax(blur(mask)) ** gamma_m``, ``w = 1 + alpha * m``.

    Args:
        mask: ``(B, 1, H, W)`` binary (``object_mask``).
        alpha: how much more an object position weighs, >= 0 (0: uniform weight 1).
        gamma_m: sharpening of the soft mask, > 0 (1: none).

    Returns:
        ``(B, 1, H, W)`` in ``[1, 1 + alpha]``; 1 everywhere when the blurred mask is constant.
    """
    _require_4d("mask", mask)
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0 (got {alpha})")
    if not gamma_m > 0:
        raise ValueError(f"gamma_m must be positive (got {gamma_m})")
    m = minmax_normalise(gaussian_blur(mask, blur_size, blur_sigma)) ** gamma_m  # (B, 1, H, W) in [0, 1]
    return 1.0 + alpha * m


def object_weight(maps: torch.Tensor, nouns: Sequence[Sequence[int]], tokens: Sequence[int] | None = None, *,
                  otsu_scale: float = OTSU_SCALE, alpha: float = 1.0, gamma_m: float = 1.0) -> torch.Tensor:
    """``mask_weight(object_mask(noun_maps(maps, nouns, tokens), otsu_scale), alpha, gamma_m)``.

    Args:
        maps: ``(B, T, H, W)`` attention maps (``Capture.mean``).

    Returns:
        ``(B, 1, H, W)`` in ``[1, 1 + alpha]``.
    """
    return mask_weight(object_mask(noun_maps(maps, nouns, tokens), otsu_scale), alpha, gamma_m)


def resize_to_latent(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a mask or weight to the latent's ``(h, w)`` (a convex mix of neighbours,
    so values stay within the input's range).

    Args:
        mask: ``(B, C, H, W)``.
        size: ``(h, w)``.

    Returns:
        ``(B, C, h, w)``.
    """
    _require_4d("mask", mask)
    size = tuple(int(s) for s in size)
    if tuple(mask.shape[-2:]) == size:
        return mask
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False)


def mask_weights(maps: torch.Tensor, nouns: Sequence[Sequence[Sequence[int]]], size: tuple[int, int], *,
                 alpha: float, gamma_m: float) -> torch.Tensor:
    """OSPO's loss weight ``w = 1 + alpha * m^gamma_m`` per image from its cross-attention maps.

    Args:
        maps: (B, L, H, W) attention of image positions to every text token (``Capture.mean`` of all tokens).
        nouns: per image, its noun token groups (``hgdpo.pool.ospo.noun_tokens``); an image without nouns gets weight 1.
        size: the latent's (h, w).

    Returns:
        (B, 1, h, w) in [1, 1 + alpha].
    """
    out = []
    for b, groups in enumerate(nouns):
        if groups:
            out.append(object_weight(maps[b: b + 1], groups, alpha=alpha, gamma_m=gamma_m))
        else:
            out.append(torch.ones(1, 1, *maps.shape[-2:], dtype=maps.dtype, device=maps.device))
    return resize_to_latent(torch.cat(out), size)
