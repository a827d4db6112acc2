"""Finding the objects of a miniature-world image: segmentation into blobs, and each blob described.

What ``hgdpo.world.judge`` judges a caption against (``detect``). Pure numpy, deterministic.

1. Segmentation.  The background colour is the median of the image's 2-pixel border (falling
   back to the nominal light grey if that is more than 40 RGB units off, e.g. when objects cover
   the border).  Every pixel p is modelled as a blend of the background b and one palette colour
   c: ``t_c = <p - b, c - b> / |c - b|^2`` (clipped to [0, 1]) is the blend weight and ``perp_c``
   the distance of p from the segment b->c.  A pixel is *object* if, for the colour with the
   smallest ``perp_c``, ``perp_c <= 80`` and ``t_c >= 0.5`` (so a blurred edge splits at half
   height and an object keeps its area under blur); it is *junk* if it is none of the above but
   still more than 60 RGB units from the background (colours no palette blend explains).
   Colours are cleaned by a 3x3 majority vote among object pixels, one-pixel holes are filled,
   and connected components (8-connectivity, same colour) are the *blobs*.  Blobs smaller than
   30 % of a small triangle are dropped (their pixels count as stray).

2. Blob description.  Each blob's blend weights ``t_c`` (of its own colour, in a window around
   it; values under 0.12 zeroed as noise) give its mass (area) and centroid, both unchanged by
   blur.  For each shape a template (the renderer's own rasterisation) is fitted with that mass
   and centroid, and compared, blurred by each level of ``BLUR_GRID`` (0 to 2.2 px), with the
   blend weights by soft IoU (sum of min / sum of max).  One blur level is chosen for the whole
   image (the one that best explains all blobs, area-weighted), so a soft square is compared
   with a soft square template and does not pass for a circle.  At that level,
   ``P(shape) = softmax(iou / 0.015)``; extent and box centre come from the best template.
   Blob quality = clip((soft IoU with the *sharp* best template - 0.55) / 0.33) (sharp edges ->
   1, blur lowers it) * clip(1 - (median perp - 12) / 50) (noise and off colours lower it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from hgdpo.world.render import coverage
from hgdpo.world.scene import (
    BACKGROUND,
    COLORS,
    EXTENT,
    EXTENT_JITTER,
    PALETTE,
    SHAPES,
)

# ---- segmentation thresholds (RGB units) --------------------------------------------------
PERP_MAX = 80.0
T_MIN = 0.5
JUNK_DIST = 60.0
BG_TOLERANCE = 40.0

MAX_BLOBS = 8  # the largest blobs the judge matches caption objects to
SHAPE_TAU = 0.015  # temperature of the shape softmax (soft IoU units)
#: Gaussian blur levels (pixels) under which templates are compared with blobs.
BLUR_GRID = (0.0, 0.4, 0.7, 1.0, 1.3, 1.7, 2.2)
_WIN_PAD = 4
_ALPHA_FLOOR = 0.12

_BG = np.asarray(BACKGROUND, np.float32)
_PAL = np.asarray([PALETTE[c] for c in COLORS], np.float32)  # (K, 3)
# Smallest object the grammar draws: a small triangle at the low end of the jitter.
_MIN_OBJECT_AREA = 0.5 * (EXTENT["small"] * (1 - EXTENT_JITTER)) ** 2
_TEMPLATE_AREA_FACTOR = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


@dataclass
class Blob:
    """One detected object: a connected region of one palette colour."""

    color: str
    area: int  # pixels
    cx: float  # centroid, pixels
    cy: float
    shape_iou: dict  # shape -> soft IoU with that shape's fitted template at the image's blur
    shape_prob: dict  # shape -> softmax(iou / SHAPE_TAU)
    shape: str  # most likely shape
    x: float  # box centre of the best template, normalised
    y: float
    extent: float  # box side of the best template, normalised
    quality: float  # in [0, 1]: edge sharpness x colour fidelity
    area_frac: float  # area / image area


@dataclass
class Detection:
    """What ``detect`` finds in an image."""

    blobs: list  # of Blob, largest first
    stray_pixels: int  # junk pixels + pixels of specks too small to be objects
    background: np.ndarray  # RGB used as background
    blur: float  # estimated blur (gaussian sigma, pixels), from BLUR_GRID




# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


def _as_float_image(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint8:
        return a.astype(np.float32)
    a = np.nan_to_num(a.astype(np.float32), nan=0.0)
    if a.size and float(a.max()) <= 1.0 + 1e-6:
        if float(a.min()) < 0.0:  # diffusion-style [-1, 1]
            a = (a + 1.0) / 2.0
        a = a * 255.0  # [0, 1]
    return a


def _background(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    est = np.median(border, axis=0)
    return est if float(np.linalg.norm(est - _BG)) <= BG_TOLERANCE else _BG.copy()


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 box sum over the first two axes (zero padding)."""
    p = np.pad(x, ((1, 1), (1, 1)) + ((0, 0),) * (x.ndim - 2))
    s = p[:-2] + p[1:-1] + p[2:]
    return s[:, :-2] + s[:, 1:-1] + s[:, 2:]


def _components(label: np.ndarray) -> np.ndarray:
    """Connected components (8-connectivity) of pixels with equal label >= 0.

    Returns, per pixel, the flat index of a representative pixel of its component (-1 for
    label < 0).  Min-label propagation along edges plus pointer jumping: pure numpy.
    """
    h, w = label.shape
    idx = np.arange(h * w).reshape(h, w)
    ia, ib = [], []
    for (a_sl, b_sl) in (
        ((slice(None), slice(0, -1)), (slice(None), slice(1, None))),  # right
        ((slice(0, -1), slice(None)), (slice(1, None), slice(None))),  # down
        ((slice(0, -1), slice(0, -1)), (slice(1, None), slice(1, None))),  # down-right
        ((slice(0, -1), slice(1, None)), (slice(1, None), slice(0, -1))),  # down-left
    ):
        la, lb = label[a_sl], label[b_sl]
        same = (la >= 0) & (la == lb)
        ia.append(idx[a_sl][same])
        ib.append(idx[b_sl][same])
    ia_a, ib_a = np.concatenate(ia), np.concatenate(ib)
    flat = np.where(label.ravel() >= 0, np.arange(h * w), -1)
    fg = np.flatnonzero(flat >= 0)
    if ia_a.size == 0:
        return flat.reshape(h, w)
    while True:
        before = flat[fg].copy()
        m = np.minimum(flat[ia_a], flat[ib_a])
        np.minimum.at(flat, ia_a, m)  # unbuffered: correct with repeated indices
        np.minimum.at(flat, ib_a, m)
        for _ in range(3):  # pointer jumping
            flat[fg] = flat[flat[fg]]
        if np.array_equal(before, flat[fg]):
            return flat.reshape(h, w)


@functools.lru_cache(maxsize=512)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """``n x n`` matrix of a 1-D gaussian blur (zero padding); identity for sigma 0."""
    if sigma <= 0:
        return np.eye(n, dtype=np.float32)
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    g = np.exp(-0.5 * (d / sigma) ** 2)
    g /= np.exp(-0.5 * (np.arange(-n, n + 1) / sigma) ** 2).sum()
    return g.astype(np.float32)


@functools.lru_cache(maxsize=256)
def _blur_stack(n: int) -> np.ndarray:
    """``(len(BLUR_GRID), n, n)``: the blur matrices of every level of BLUR_GRID."""
    return np.stack([_blur_matrix(n, s) for s in BLUR_GRID])


def _fit_template(shape: str, area: float, cx: float, cy: float, h: int, w: int):
    side = math.sqrt(area / _TEMPLATE_AREA_FACTOR[shape])  # pixels
    bx, by = cx, cy
    if shape == "triangle":  # centroid is 2/3 of the way down from the apex
        by = cy - side / 6.0
    return side, bx, by, coverage(shape, bx / w, by / h, side / w, h, w, ss=4)


def detect(image) -> Detection:
    """The blobs (objects) in an image; see the module docstring, steps 1 and 2."""
    img = _as_float_image(image)
    h, w = img.shape[:2]
    bg = _background(img)
    v = _PAL - bg  # (K, 3)
    vv = np.maximum((v * v).sum(1), 1e-6)
    p = img - bg  # (H, W, 3)
    pv = p @ v.T  # (H, W, K)
    t = np.clip(pv / vv, 0.0, 1.0)
    pp = (p * p).sum(-1, keepdims=True)
    perp = np.sqrt(np.maximum(pp - 2 * t * pv + t * t * vv, 0.0))
    best = perp.argmin(-1)
    best_perp = np.take_along_axis(perp, best[..., None], -1)[..., 0]
    best_t = np.take_along_axis(t, best[..., None], -1)[..., 0]
    obj = (best_perp <= PERP_MAX) & (best_t >= T_MIN)
    junk = (~obj) & (np.sqrt(pp[..., 0]) > JUNK_DIST) & (best_perp > PERP_MAX)

    # majority colour among object pixels in each 3x3 window; fill one-pixel holes
    k = len(COLORS)
    onehot = np.zeros((h, w, k), np.float32)
    onehot[obj, best[obj]] = 1.0
    votes = _box3(onehot)
    n_obj = votes.sum(-1)
    hole = (~obj) & (~junk) & (n_obj >= 6)
    obj = obj | hole
    label = np.where(obj, votes.argmax(-1), -1)

    comp = _components(label)
    roots, inverse, counts = np.unique(comp.ravel(), return_inverse=True, return_counts=True)
    min_area = max(3.0, 0.3 * _MIN_OBJECT_AREA * h * w)
    stray = int(junk.sum())
    inv = inverse.reshape(h, w)
    raw = []  # stage 1: per blob, its window, mask, blend weights and the fitted templates
    for ci, (root, count) in enumerate(zip(roots, counts)):
        if root < 0:
            continue
        if count < min_area:
            stray += int(count)
            continue
        color = int(label.flat[root])
        rows, cols = np.nonzero(inv == ci)
        r0, r1 = max(0, rows.min() - _WIN_PAD), min(h, rows.max() + 1 + _WIN_PAD)
        c0, c1 = max(0, cols.min() - _WIN_PAD), min(w, cols.max() + 1 + _WIN_PAD)
        mask = inv[r0:r1, c0:c1] == ci
        lab_w = label[r0:r1, c0:c1]
        alpha = t[r0:r1, c0:c1, color]
        alpha = np.where(((lab_w < 0) | (lab_w == color)) & (alpha >= _ALPHA_FLOOR), alpha, 0.0)
        mass = float(alpha.sum())
        if mass <= 0:  # only possible for pixels relabelled by the vote; treat as stray
            stray += int(count)
            continue
        wy = alpha.sum(1)
        wx = alpha.sum(0)
        cy = r0 + float((wy * (np.arange(r1 - r0) + 0.5)).sum()) / mass
        cx = c0 + float((wx * (np.arange(c1 - c0) + 0.5)).sum()) / mass
        templates = {}
        for shape in SHAPES:
            side, bx, by, (tr0, tc0, cov) = _fit_template(shape, mass, cx, cy, h, w)
            canvas = np.zeros((r1 - r0, c1 - c0), np.float32)
            a0, a1 = max(tr0, r0), min(tr0 + cov.shape[0], r1)
            b0, b1 = max(tc0, c0), min(tc0 + cov.shape[1], c1)
            if a1 > a0 and b1 > b0:
                canvas[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = cov[a0 - tr0 : a1 - tr0, b0 - tc0 : b1 - tc0]
            templates[shape] = (side, bx, by, canvas)
        # soft IoU of the blend weights with every template under every blur level, at once
        stack = np.stack([templates[shape][3] for shape in SHAPES])  # (S, h, w)
        blurred = _blur_stack(r1 - r0)[:, None] @ stack[None] @ _blur_stack(c1 - c0).transpose(0, 2, 1)[:, None]
        inter = np.minimum(blurred, alpha).sum(axis=(2, 3))
        union = np.maximum(blurred, alpha).sum(axis=(2, 3))
        ious = (inter / np.maximum(union, 1e-9)).T  # (shapes, blur levels)
        raw.append((color, int(count), cx, cy, mask, alpha, templates, ious, (r0, c0)))

    # stage 2: one blur level for the whole image (the one under which the blobs look most
    # like ideal shapes), then shape probabilities and quality per blob
    if raw:
        fit = sum(r[1] * r[7].max(0) for r in raw)  # area-weighted best-shape IoU per level
        j_blur = int(np.argmax(fit - 1e-3 * np.arange(len(BLUR_GRID))))  # ties: least blur
    else:
        j_blur = 0
    blobs: list[Blob] = []
    for color, count, cx, cy, mask, alpha, templates, ious, (r0, c0) in raw:
        iou = {s: float(ious[i, j_blur]) for i, s in enumerate(SHAPES)}
        mx = max(iou.values())
        ex = {s: math.exp((iou[s] - mx) / SHAPE_TAU) for s in SHAPES}
        z = sum(ex.values())
        probs = {s: ex[s] / z for s in SHAPES}
        shape = max(SHAPES, key=lambda s: iou[s])
        side, bx, by, canvas = templates[shape]
        # quality: soft IoU of the blend weights with the crisp template, and colour fidelity
        a = np.clip((alpha - 0.1) / 0.8, 0.0, 1.0)
        den = float(np.maximum(a, canvas).sum())
        soft_iou = float(np.minimum(a, canvas).sum()) / den if den > 0 else 0.0
        med_perp = float(np.median(perp[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1], color][mask]))
        q_shape = min(1.0, max(0.0, (soft_iou - 0.55) / 0.33))
        q_color = min(1.0, max(0.0, 1.0 - (med_perp - 12.0) / 50.0))
        blobs.append(
            Blob(
                color=COLORS[color],
                area=count,
                cx=cx,
                cy=cy,
                shape_iou=iou,
                shape_prob=probs,
                shape=shape,
                x=bx / w,
                y=by / h,
                extent=side / math.sqrt(h * w),
                quality=q_shape * q_color,
                area_frac=count / (h * w),
            )
        )
    blobs.sort(key=lambda b: -b.area)
    return Detection(blobs, stray, bg, float(BLUR_GRID[j_blur]))
