"""A pool's rows as the generator actors hand them on, and the task that writes them.

A row (``ROW_COLUMNS``) is one prompt's seeds, scores, ranking, kept latents and the winner's and
loser's pixels. ``write_rows`` PNG-encodes the two images and writes a batch of rows as one atomic
parquet part, returning the small per-row summary the driver reads. It runs as a Ray Data task and in
the plain loop (``hgdpo.pool.build``), and loads no torch: the writers need none.
"""

from __future__ import annotations

import numpy as np

from hgdpo.pool import store as pool
from hgdpo.pool.part_file import write_part_file

ROW_COLUMNS = ("prompt_id", "prompt_index", "prompt", "seeds", "scores", "rank", "winner", "loser", "latent_index",
               "latents", "pixels_w", "pixels_l")


def columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows (dicts of ``ROW_COLUMNS``, and a pool with hard negatives' ``pool.SELF_JUDGED``) as a batch of
    columns."""
    keys = ROW_COLUMNS + (pool.SELF_JUDGED_COLUMNS if "self_scores" in rows[0] else ())
    return {key: np.stack([r[key] for r in rows]) if isinstance(rows[0][key], np.ndarray)
            else np.asarray([r[key] for r in rows]) for key in keys}


def write_rows(batch: dict[str, np.ndarray], output: str, latent_shape: list[int]) -> dict[str, np.ndarray]:
    """Ray Data task (and the plain loop's writer): PNG-encode the winners' and losers' images, write
    the rows as one part, return a summary per row."""
    rows = {k: v for k, v in batch.items() if not k.startswith("pixels_")}
    rows["image_w"] = [pool.png_bytes(im) for im in batch["pixels_w"]]
    rows["image_l"] = [pool.png_bytes(im) for im in batch["pixels_l"]]
    name, entry = write_part_file(output, pool.to_table(rows, tuple(latent_shape)))
    scores = np.stack(batch["scores"])  # (B, N)
    index = np.arange(len(scores))
    return {
        "prompt_id": np.asarray(batch["prompt_id"]),
        "part": np.asarray([name] * len(scores)),
        **{f"part_{key}": np.asarray([value] * len(scores)) for key, value in entry.items()},  # for the manifest
        "score_w": scores[index, batch["winner"]],
        "score_l": scores[index, batch["loser"]],
        "score_mean": scores.mean(axis=1),
    }
