"""Comparisons of work done in two places (a Ray actor and this process, or two batchings).

A VAE or UNet's float32 result depends on how its inputs are batched and on the thread count: the
same sums in another order differ in their last bits (about 1e-7 relative per operation, ~1e-6 after
a sampler's few steps). Stored results round that: latents to float16, images to uint8. Rounding
turns a last-bit difference into nothing, or, for a value that lies at a rounding boundary, into one
step of the stored type. These helpers allow exactly that, and no more: a wrong image, a swapped
pair or another seed differs by orders of magnitude more (each test that uses them also shows it).
"""

from __future__ import annotations

import numpy as np

# float16 has a 10-bit mantissa: one rounding step is 2^-10 of the value (2^-11 each side), so
# two steps is ~2e-3 relative. Near zero float16's step shrinks below float32's differences of the
# latents' scale (~1: the scaled latents have unit variance), hence the absolute part.
LATENT_RTOL = 2e-3
LATENT_ATOL = 1e-4


def assert_same_latents(got, want, what: str = "latents") -> None:
    """``got`` and ``want`` (float16 latents) are the same up to float16 rounding of float32 noise."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, f"{what}: shapes {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=LATENT_RTOL, atol=LATENT_ATOL, err_msg=what)


def assert_same_pixels(got, want, what: str = "image") -> None:
    """uint8 images the same up to rounding: no pixel more than one level apart, and few one apart
    (a value within ~1e-6 of a .5 boundary is rare: at most 1% of the values)."""
    got, want = np.asarray(got, np.int16), np.asarray(want, np.int16)
    assert got.shape == want.shape, f"{what}: shapes {got.shape} != {want.shape}"
    diff = np.abs(got - want)
    assert diff.max(initial=0) <= 1, f"{what}: a pixel differs by {diff.max()} levels"
    assert np.mean(diff > 0) <= 0.01, f"{what}: {np.mean(diff > 0):.1%} of the values differ"


def latents_differ(a, b) -> bool:
    """Whether two latents differ by more than ``assert_same_latents`` allows (a test shows that its
    comparison could fail: the other image of a pair, say)."""
    return not np.allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=LATENT_RTOL, atol=LATENT_ATOL)
