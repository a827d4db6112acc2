"""An evaluation's ``scores.parquet``: one row per (prompt, seed), written in parts and read back.

Each row holds the prompt's id, index and text, the image index ``k`` and its seed, every scorer's
score and the mean H, S and V of A's and B's images, and both PNGs. ``scores.parquet`` is a folder
of parts (``part-00000.parquet``, ... of ``rows_per_part`` rows, then ``_COMPLETE.json``:
``hgdpo.infra.storage.write_parquet_parts``), because all of an evaluation's PNGs in one file would
pass the bound on one file (5 GiB: 2,000 prompts x 2 seeds at 704x1024 is several GB). Evaluations
written before parts hold it as one file; ``read_scores`` reads both.
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa

from hgdpo.evaluate.config import EvalConfig
from hgdpo.infra import storage

SCORES = "scores.parquet"  # a folder of parts (a single file in evaluations written before parts)
SIDES = ("a", "b")  # model A and baseline B, as every comparison and its columns name them (EvalConfig.side)


def write_scores(path: str, cfg: EvalConfig, rows: list[dict]) -> None:
    """One parquet row per (prompt, seed): ids, seed, every score, colours, both PNGs; a part of at most
    ``cfg.rows_per_part`` rows per file (``storage.write_parquet_parts``), built one part at a time."""
    storage.write_parquet_parts(path, _score_parts(cfg, rows))


def _score_parts(cfg: EvalConfig, rows: list[dict]):
    columns = defaultdict(list)
    for r in rows:
        for k, seed in enumerate(r["seeds"]):
            if columns and len(columns["prompt_id"]) == cfg.rows_per_part:
                yield pa.table(dict(columns))
                columns = defaultdict(list)
            columns["prompt_id"].append(str(r["prompt_id"]))
            columns["prompt_index"].append(int(r["prompt_index"]))
            columns["prompt"].append(str(r["prompt"]))
            columns["k"].append(k)
            columns["seed"].append(int(seed))
            for side in SIDES:
                for name in cfg.scorers:
                    columns[f"score_{side}_{name}"].append(float(r[f"score_{side}_{name}"][k]))
                for channel, value in zip("hsv", r[f"hsv_{side}"][k]):
                    columns[f"{channel}_{side}"].append(float(value))
                columns[f"image_{side}"].append(bytes(r[f"png_{side}"][k]))
    yield pa.table(dict(columns))


def read_scores(output: str, columns: list[str] | None = None):
    """The scores table of the evaluation in folder ``output``, one row per (prompt, seed) in prompt order:
    its parts (checked against their manifest), or the single ``scores.parquet`` of an evaluation written
    before parts."""
    return storage.read_parquet(storage.join(output, SCORES), columns=columns)


def has_scores(output: str) -> bool:
    """``output`` holds an evaluation's finished scores (either layout)."""
    return storage.is_parquet(storage.join(output, SCORES))


