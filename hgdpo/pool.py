"""The preference pool on disk: schema, atomic parts, metadata, resume state, reading.

A pool is a directory (local path or any pyarrow filesystem URI) holding

* ``pool.json``: written first: format, resolved config, the fingerprint of everything that
  determines the content (data settings, prompt list, model and scorer weights), package
  versions, prompt count and latent shape;
* ``part-*.parquet``: one row per prompt (columns below), each written atomically
  (``hgdpo.storage``), so a file that exists is whole;
* ``_COMPLETE.json``: written last, once every prompt has a row: the manifest of parts and rows.
  Readers refuse a pool without it.

Row columns (the data contract of DESIGN.md): ``prompt_id``, ``prompt_index``, ``prompt``,
``seeds`` (N), ``scores`` (N), ``rank`` (N indices, best first), ``winner`` and ``loser``
(indices into seeds), ``latent_index`` (which seeds ``latents`` holds: all N, or winner and
loser), ``latents`` (K x C x h x w float16), ``image_w`` / ``image_l`` (PNG bytes).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from hgdpo import storage
from hgdpo.errors import HgdpoError

FORMAT = "hgdpo-pool/1"
META = "pool.json"
COMPLETE = "_COMPLETE.json"
PART_PREFIX = "part-"


def latents_type(shape: tuple[int, ...]) -> pa.DataType:
    return pa.fixed_shape_tensor(pa.float16(), list(shape))


def schema(latent_shape: tuple[int, ...]) -> pa.Schema:
    """The pool's schema; ``latent_shape`` is (K, C, h, w) with K = N or 2."""
    return pa.schema([
        ("prompt_id", pa.string()),
        ("prompt_index", pa.int64()),
        ("prompt", pa.string()),
        ("seeds", pa.list_(pa.int64())),
        ("scores", pa.list_(pa.float32())),
        ("rank", pa.list_(pa.int32())),
        ("winner", pa.int32()),
        ("loser", pa.int32()),
        ("latent_index", pa.list_(pa.int32())),
        ("latents", latents_type(latent_shape)),
        ("image_w", pa.binary()),
        ("image_l", pa.binary()),
    ])


def to_table(rows: dict[str, Any], latent_shape: tuple[int, ...]) -> pa.Table:
    """Build a pool table from a column batch (numpy arrays / lists), in the pool's schema."""
    sch = schema(latent_shape)
    latents = np.ascontiguousarray(np.asarray(rows["latents"], dtype=np.float16))
    arrays = []
    for field in sch:
        if field.name == "latents":
            arrays.append(pa.ExtensionArray.from_storage(
                field.type, pa.FixedSizeListArray.from_arrays(pa.array(latents.reshape(-1)),
                                                              int(np.prod(latent_shape)))))
        else:
            values = rows[field.name]
            values = [v.tolist() if isinstance(v, np.ndarray) else v for v in values]
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=sch)


def latents_of(table: pa.Table) -> np.ndarray:
    """The ``latents`` column as a (rows, K, C, h, w) float16 array."""
    col = table.column("latents").combine_chunks()
    shape = col.type.shape
    flat = col.storage.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(table), *shape)


def write_part(uri: str, table: pa.Table) -> str:
    """Write rows as one part file, atomically (``hgdpo.storage.write``). Returns its name."""
    ids = "\n".join(table.column("prompt_id").to_pylist())
    first = min(table.column("prompt_index").to_pylist())
    name = f"{PART_PREFIX}{first:09d}-{hashlib.sha1(ids.encode()).hexdigest()[:10]}.parquet"
    storage.write_parquet(storage.join(uri, name), table, compression="zstd")
    return name


@dataclass
class PoolState:
    """What is on disk at a pool's location."""

    meta: dict | None
    parts: list[str]
    complete: dict | None


def _read_json(uri: str, name: str) -> dict | None:
    path = storage.join(uri, name)
    return storage.read_json(path, "pool metadata") if storage.is_file(path) else None


def state(uri: str | os.PathLike) -> PoolState:
    uri = os.fspath(uri)
    if storage.is_file(uri):
        raise HgdpoError(f"output: {uri} exists and is not a directory")
    names = storage.listdir(uri)
    meta = _read_json(uri, META)
    if meta is None and names:
        raise HgdpoError(f"{uri} is not empty and holds no pool ({META} missing)")
    if meta is not None and meta.get("format") != FORMAT:
        raise HgdpoError(f"{uri}/{META}: not a pool of format {FORMAT} (found {meta.get('format')!r})")
    parts = [n for n in names if n.startswith(PART_PREFIX) and n.endswith(".parquet")]
    return PoolState(meta, parts, _read_json(uri, COMPLETE))


def init(uri: str, meta: dict) -> None:
    """Create the pool directory and write its metadata (first thing a new pool gets)."""
    storage.makedirs(uri)
    storage.write_json(storage.join(uri, META), meta)


def remove_temporaries(uri: str) -> int:
    """Delete half-written files left by a job that died; returns how many."""
    return storage.remove_temporaries(uri)


def done_prompt_ids(uri: str, parts: list[str]) -> set[str]:
    """Ids of the prompts that already have a row (reads only the ``prompt_id`` column)."""
    done: set[str] = set()
    for name in parts:
        try:
            ids = storage.read_parquet(storage.join(uri, name), columns=["prompt_id"]).column("prompt_id").to_pylist()
        except Exception as err:
            raise HgdpoError(f"{uri}/{name}: corrupt pool part ({err}); delete it and rerun to regenerate its rows") from None
        dup = done.intersection(ids)
        if dup:
            raise HgdpoError(f"{uri}/{name}: prompt {sorted(dup)[0]!r} also appears in another part; the pool is corrupt")
        done.update(ids)
    return done


def mark_complete(uri: str, parts: list[str], rows: int) -> None:
    storage.write_json(storage.join(uri, COMPLETE), {"parts": parts, "rows": rows})


def read_meta(uri: str) -> dict:
    """The metadata of a finished pool; a clear error if ``uri`` is not one."""
    st = state(uri)
    if st.meta is None:
        raise HgdpoError(f"pool: {uri} is not a pool (no {META})")
    if st.complete is None:
        raise HgdpoError(f"pool: {uri} is incomplete ({len(st.parts)} part files, no {COMPLETE}); "
                         f"rerun the pool job with the same config to finish it")
    missing = sorted(set(st.complete["parts"]) - set(st.parts))
    if missing:
        raise HgdpoError(f"pool: {uri} is missing part {missing[0]} listed in its manifest")
    return st.meta


def read(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read a finished pool, rows in prompt order."""
    read_meta(uri)
    st = state(uri)
    tables = [storage.read_parquet(storage.join(os.fspath(uri), name), columns=columns) for name in st.complete["parts"]]
    table = pa.concat_tables(tables)
    if "prompt_index" in table.column_names:
        table = table.sort_by("prompt_index")
    return table


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def png_image(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
