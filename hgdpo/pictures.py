"""Pictures for people: image pairs side by side, with their captions."""

from __future__ import annotations

import textwrap

import numpy as np


def pairs_grid(rows: list[tuple[str, np.ndarray, np.ndarray]], labels: tuple[str, str] = ("winner", "loser"),
               cell: int = 128):
    """A PIL image with one row per (caption, left image, right image), the caption beside them."""
    from PIL import Image, ImageDraw

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
    from PIL import Image, ImageDraw

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
