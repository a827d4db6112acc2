"""Gold items, the attention checks: pairs with a right answer (A) under the question raters are asked.

* ``naturalness`` ("Which image is more natural?"): an image (A) against a visibly corrupted copy
  of itself (B): cut into a 4 x 4 grid whose blocks all change places, then heavy Gaussian noise
  (standard deviation 64 of 255). The copy keeps the image's colours, so only attention tells them
  apart, and no honest rater can prefer it.
* ``prompt_fidelity`` ("Which image matches the prompt better?"): the prompt's image (A) against
  an image of another prompt (B).

A gold item's prompt is its own image's, so nothing on the page sets it apart from a pair.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from hgdpo.errors import HgdpoError
from hgdpo.pool import store as pool

GRID = 4  # blocks per side of the scrambled copy
NOISE = 64.0  # standard deviation of the noise, in 0..255 pixel units
NAN = float("nan")  # a gold item has no AI feedback


def corrupted(png: bytes, rng: random.Random) -> bytes:
    """A PNG of ``png`` with its blocks scrambled (every block moves) and heavy noise added."""
    image = pool.png_image(png)  # (H, W, 3) uint8
    h, w = image.shape[:2]
    grid = GRID if min(h, w) >= GRID else 1
    bh, bw = h // grid, w // grid
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    order = list(range(len(cells)))
    rng.shuffle(order)
    out = image.copy()
    for k, target in enumerate(order):  # a cycle through the shuffled cells: no block stays in place
        source = order[(k + 1) % len(order)]
        (tr, tc), (sr, sc) = cells[target], cells[source]
        out[tr * bh:(tr + 1) * bh, tc * bw:(tc + 1) * bw] = image[sr * bh:(sr + 1) * bh, sc * bw:(sc + 1) * bw]
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, NOISE, out.shape)
    return pool.png_bytes(np.clip(out.astype(np.float64) + noise, 0, 255).astype(np.uint8))


def gold_pairs(pairs: list, n: int, kind: str, rng: random.Random) -> list:
    """``n`` gold items of the ``kind`` of question, from ``pairs``' images: copies of ``create.Pair``s
    with new images (A right) and no AI feedback."""
    if n == 0:
        return []
    picks = rng.sample(range(len(pairs)), n) if n <= len(pairs) else [rng.randrange(len(pairs)) for _ in range(n)]
    out = []
    if kind == "naturalness":
        for i in picks:
            own = pairs[i]
            image = own.png_a if rng.random() < 0.5 else own.png_b
            out.append(dataclasses.replace(own, png_a=image, png_b=corrupted(image, rng), ai_a=NAN, ai_b=NAN))
        return out
    if len({p.prompt for p in pairs}) < 2:
        raise HgdpoError("gold_items: prompt-fidelity gold items need pairs of at least two different prompts; "
                         "set gold_items=0")
    for i in picks:
        own = pairs[i]
        other = rng.choice([p for p in pairs if p.prompt != own.prompt])
        out.append(dataclasses.replace(own, png_b=other.png_a, ai_a=NAN, ai_b=NAN))
    return out
