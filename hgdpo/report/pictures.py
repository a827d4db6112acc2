"""Pictures for people: image pairs side by side, with their captions."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw


def pairs_grid(rows: list[tuple[str, np.ndarray, np.ndarray]], labels: tuple[str, str] = ("winner", "loser"),
               cell: int = 128):
    """A PIL image with one row per (caption, left image, right image), the caption beside them."""
    text_w, pad, head = 220, 4, 16
    grid = Image.new("RGB", (text_w + 2 * (cell + pad) + pad, head + len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(labels):
        draw.text((text_w + pad + j * (cell + pad), 2), label, fill="black")
    for i, (caption, left, right) in enumerate(rows):
        y = head + pad + i * (cell + pad)
        draw.multiline_text((pad, y), "\n".join(textwrap.wrap(caption, 34)[:8]), fill="black")
        for j, image in enumerate((left, right)):
            tile = Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST if image.shape[0] < cell
                                                 else Image.Resampling.BILINEAR)
            grid.paste(tile, (text_w + pad + j * (cell + pad), y))
    return grid


def captioned_grid(rows: list[tuple[str, list[np.ndarray]]], cell: int = 96):
    """A PIL image with one row per caption: the caption, then its images."""
    text_w, pad = 200, 4
    width = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (text_w + width * (cell + pad) + pad, len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (caption, images) in enumerate(rows):
        y = pad + i * (cell + pad)
        draw.multiline_text((pad, y), "\n".join(textwrap.wrap(caption, 30)[:6]), fill="black")
        for j, image in enumerate(images):
            grid.paste(Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST),
                       (text_w + pad + j * (cell + pad), y))
    return grid


def interval_chart(title: str, categories: list[str], series: dict[str, list[tuple[float, float, float] | None]],
                   ylabel: str, reference: float | None = None, width: int = 560, height: int = 320):
    """A PIL chart of values with intervals: one column per category, one marker per series
    (``series[name][i]`` = (value, low, high) of category i, or None), and an optional dashed
    reference line (e.g. 50% for a win rate). Values equal to their interval's ends draw as plain
    points, so the chart also shows quantities without an interval."""
    colours = ["#1f5fa8", "#c2501d", "#2e8b3a", "#7a3fa0"]
    left, right, top, bottom = 64, 16, 40, 48
    chart = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(chart)
    points = [v for values in series.values() for v in values if v is not None]
    ends = [x for v in points for x in (v[1], v[2])] + ([reference] if reference is not None else [])
    lo, hi = (min(ends), max(ends)) if ends else (0.0, 1.0)
    margin = 0.08 * ((hi - lo) or 1.0)
    lo, hi = lo - margin, hi + margin

    def y(value: float) -> float:
        return top + (hi - value) / (hi - lo) * (height - top - bottom)

    draw.text((left, 8), title, fill="black")
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for k in range(5):
        value = lo + (hi - lo) * k / 4
        draw.line([(left - 4, y(value)), (left, y(value))], fill="black")
        draw.text((4, y(value) - 6), f"{value:.3g}", fill="black")
    draw.text((4, top - 16), ylabel, fill="black")
    if reference is not None:
        for x in range(left, width - right, 8):
            draw.line([(x, y(reference)), (x + 4, y(reference))], fill="#888888")
    step = (width - left - right) / max(1, len(categories))
    for i, category in enumerate(categories):
        centre = left + step * (i + 0.5)
        draw.text((centre - 3 * len(category), height - bottom + 6), category, fill="black")
        for j, values in enumerate(series.values()):
            if values[i] is None:
                continue
            value, low, high = values[i]
            x = centre + (j - (len(series) - 1) / 2) * 14
            colour = colours[j % len(colours)]
            draw.line([(x, y(low)), (x, y(high))], fill=colour, width=2)
            for end in (low, high):
                draw.line([(x - 4, y(end)), (x + 4, y(end))], fill=colour, width=2)
            draw.ellipse([x - 4, y(value) - 4, x + 4, y(value) + 4], fill=colour)
    for j, name in enumerate(series):
        x = left + 8 + j * 140
        draw.rectangle([x, height - 18, x + 10, height - 8], fill=colours[j % len(colours)])
        draw.text((x + 14, height - 20), name, fill="black")
    return chart


def weight_grid(lat_w: np.ndarray, lat_l: np.ndarray, weights: np.ndarray, labels: list[str], min_cell: int = 96):
    """A PIL image of a region-weighted objective's weights (``focus``, ``ospo``): one row per pair, its winner's
    and its loser's latent
    (the channel mean, min-max normalised, grey), then its weights on one grey scale
    per row, under ``labels`` (black at the row's smallest W, white at its largest; the range is written beside
    the row, so a
    map's change with t shows). A constant map is mid-grey. Every map is enlarged by one whole factor,
    nearest-neighbour (a latent pixel is a block of equal pixels), so that a cell's shorter side is at least
    ``min_cell`` pixels.

    ``lat_w``, ``lat_l``: (B, C, h, w); ``weights``: (B, T, h, w), T = ``len(labels)``.
    """
    lat_w, lat_l, weights = (np.asarray(a, dtype=np.float64) for a in (lat_w, lat_l, weights))
    rows, _, h, w = lat_w.shape
    scale = -(-min_cell // min(h, w))
    text_w, pad, head = 80, 4, 16
    labels = ["winner", "loser", *labels]
    grid = Image.new("RGB", (text_w + len(labels) * (w * scale + pad) + pad, head + rows * (h * scale + pad) + pad),
                     "white")
    draw = ImageDraw.Draw(grid)

    def grey(x: np.ndarray, lo: float, hi: float):
        level = np.full(x.shape, 0.5) if hi <= lo else (x - lo) / (hi - lo)
        pixels = np.round(255 * level).astype(np.uint8)
        return Image.fromarray(np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1))

    for j, label in enumerate(labels):
        draw.text((text_w + pad + j * (w * scale + pad), 2), label, fill="black")
    for i in range(rows):
        y = head + pad + i * (h * scale + pad)
        lo, hi = float(weights[i].min()), float(weights[i].max())
        draw.multiline_text((pad, y), f"pair {i + 1}\nW {lo:.3g}\nto {hi:.3g}", fill="black")
        means = [lat_w[i].mean(axis=0), lat_l[i].mean(axis=0)]  # (h, w) each
        tiles = [grey(m, float(m.min()), float(m.max())) for m in means] + [grey(x, lo, hi) for x in weights[i]]
        for j, tile in enumerate(tiles):
            grid.paste(tile, (text_w + pad + j * (w * scale + pad), y))
    return grid
