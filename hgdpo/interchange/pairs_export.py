"""Export of a pool's pairs as one Pick-a-Pic-style parquet file, for other Diffusion-DPO tools.

``export_pairs`` writes ``caption``, ``jpg_0`` (the winner's image bytes, PNG for a built pool), ``jpg_1``
(the loser's), ``label_0`` = 1, ``label_1`` = 0, ``has_label``, ``are_different``, ``model_0``, ``model_1``,
``ranking_id``, ``user_id``, ``image_0_uid``, ``image_1_uid``, and ours: ``prompt_id``, ``prompt_index``,
``score_0``, ``score_1``, ``seed_0``, ``seed_1``; the pool's fingerprint in the file's metadata (``hgdpo``).
A pool part at a time, in row groups of ``row_group_rows``, written atomically. The import
(``hgdpo.interchange.import_job``) reads the file back, its ids kept.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from hgdpo.infra import storage, tracking
from hgdpo.interchange.config import PairsExportConfig
from hgdpo.pool import store as pool

EXPORT_FORMAT = "hgdpo-export/1"
EXPORT_SCHEMA = pa.schema([
    ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()),
    ("label_1", pa.float64()), ("has_label", pa.bool_()), ("are_different", pa.bool_()), ("model_0", pa.string()),
    ("model_1", pa.string()), ("ranking_id", pa.int64()), ("user_id", pa.int64()), ("image_0_uid", pa.string()),
    ("image_1_uid", pa.string()), ("prompt_id", pa.string()), ("prompt_index", pa.int64()),
    ("score_0", pa.float32()), ("score_1", pa.float32()), ("seed_0", pa.int64()), ("seed_1", pa.int64()),
])


@dataclass
class ExportResult:
    output: str
    rows: int
    seconds: float


def _uid(prompt_id: str, seed: int, side: str) -> str:
    return hashlib.sha1(f"{prompt_id}\x00{seed}\x00{side}".encode()).hexdigest()[:32]


def export_table(table: pa.Table, model_name: str) -> pa.Table:
    """Pool rows (a part) as Pick-a-Pic-style rows: the stored winner first (label 1), the loser second."""
    rows = table.sort_by("prompt_index").to_pydict()
    n = len(rows["prompt_id"])
    scores, seeds = rows["scores"], rows["seeds"]
    win, lose = rows["winner"], rows["loser"]
    model_w = rows.get("model_w") or [None] * n
    model_l = rows.get("model_l") or [None] * n
    data = {
        "caption": rows["prompt"], "jpg_0": rows["image_w"], "jpg_1": rows["image_l"],
        "label_0": [1.0] * n, "label_1": [0.0] * n, "has_label": [True] * n, "are_different": [True] * n,
        "model_0": [m or model_name for m in model_w], "model_1": [m or model_name for m in model_l],
        "ranking_id": [int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "little") >> 1
                       for i in rows["prompt_id"]],
        "user_id": [0] * n,
        "image_0_uid": [_uid(i, s[w], "w") for i, s, w in zip(rows["prompt_id"], seeds, win)],
        "image_1_uid": [_uid(i, s[lo], "l") for i, s, lo in zip(rows["prompt_id"], seeds, lose)],
        "prompt_id": rows["prompt_id"], "prompt_index": rows["prompt_index"],
        "score_0": [s[w] for s, w in zip(scores, win)], "score_1": [s[lo] for s, lo in zip(scores, lose)],
        "seed_0": [s[w] for s, w in zip(seeds, win)], "seed_1": [s[lo] for s, lo in zip(seeds, lose)],
    }
    return pa.table({f.name: pa.array(data[f.name], type=f.type) for f in EXPORT_SCHEMA}, schema=EXPORT_SCHEMA)


def export_pairs(cfg: PairsExportConfig, log=print) -> ExportResult:
    """Write the pool ``cfg.pool`` as one Pick-a-Pic-style parquet file at ``cfg.output``, a pool part at a
    time; the file appears whole or not at all."""
    start = time.perf_counter()
    storage.check_reachable(cfg.pool, "export.pool")
    st = pool.check_parts(cfg.pool, "export.pool")
    storage.check_writable(storage.parent(storage.absolute(cfg.output)), "export.output")
    meta = st.meta
    model_name = cfg.model_name or meta.get("base_model", {}).get("name") or "unknown"
    wanted = ["prompt_id", "prompt_index", "prompt", "seeds", "scores", "winner", "loser", "image_w", "image_l"]
    info = {"format": EXPORT_FORMAT, "pool": storage.absolute(cfg.pool), "pool_fingerprint": meta["fingerprint"],
            "rows": st.complete["rows"], "base_model": meta.get("base_model"), "versions": tracking.versions()}
    schema = EXPORT_SCHEMA.with_metadata({b"hgdpo": json.dumps(info, sort_keys=True, default=str).encode()})
    extra = ["model_w", "model_l"] if "source" in meta else []  # an imported pool says what made its images
    rows = 0

    def fill(out) -> None:
        nonlocal rows
        writer = pq.ParquetWriter(out, schema, compression="zstd")
        for name in st.complete["parts"]:
            path = storage.join(storage.absolute(cfg.pool), name)
            table = export_table(storage.read_parquet(path, columns=wanted + extra), model_name)
            writer.write_table(table.replace_schema_metadata(schema.metadata), row_group_size=cfg.row_group_rows)
            rows += table.num_rows
        writer.close()

    with storage.errors("export.output", cfg.output):
        storage.write(storage.absolute(cfg.output), fill)
    log(f"export: {rows} pairs of {cfg.pool} written to {cfg.output}")
    return ExportResult(cfg.output, rows, time.perf_counter() - start)

