"""The preference pool on disk: schema, atomic parts, metadata, resume state, reading.

A pool is a directory (local path or any pyarrow filesystem URI) holding

* ``pool.json``: written first: format, resolved config, the fingerprint of everything that
  determines the content (data settings, prompt list, model and scorer weights), package
  versions, prompt count and latent shape;
* ``part-*.parquet``: one row per prompt (columns below), each written atomically
  (``hgdpo.infra.storage``), so a file that exists is whole; its name holds its first prompt index and a
  digest of its prompt ids (``hgdpo.pool.part_file``);
* ``_COMPLETE.json``: written last, once every prompt has a row: the manifest. ``parts`` (names,
  in order), ``rows``, and ``files``: per part its ``rows``, ``bytes`` and ``sha256`` (of the file's
  bytes, as ``sha256sum`` prints it), taken by the writer from the bytes it wrote.

Every reader refuses a pool without the manifest, and checks before any work that each part it lists
exists with its recorded size (``check_parts``: one listing, no file opened), so a part lost or cut
short by a failed copy is named at the door, not met as a parquet error mid-run. ``verify`` reads
every part and also checks its checksum and rows: it finds a part altered without changing size.
A bad part is repaired by rerunning the pool job with the same config, which rebuilds only that
part's prompts (``hgdpo.pool.build``).

Row columns (the data contract; docs/pool.md): ``prompt_id``, ``prompt_index``, ``prompt``,
``seeds`` (N), ``scores`` (N), ``rank`` (N indices, best first), ``winner`` and ``loser``
(indices into seeds), ``latent_index`` (which seeds the latent columns hold: all N, or winner and
loser), ``latent_00`` ... ``latent_<K-1>`` (C x h x w float16 each: the latents of seed
``latent_index[k]``), ``image_w`` / ``image_l`` (PNG bytes).

A pool with hard negatives (OSPO, ``pool.hard_negatives``) also holds, per seed j, the latents of an
image of the prompt's first perturbation from the same seed, at latent index N + j (K = 2N), and
``questions`` (the prompt's perturbations, the first one the negatives'), ``self_scores`` and
``self_least`` (2N each, originals then negatives: the self-judge's mean and least margins,
``hgdpo.pool.ospo``; NaN for a prompt no perturbation applies to).

One column per kept latent, and row groups of ``GROUP_ROWS`` rows (``hgdpo.pool.part_file``), because
parquet reads a column chunk whole: a reader that needs two latents of a row (a pair selection) reads,
per row group, only the columns some of its rows need, and a selection among the first n < N images
reads at most n of the N columns. Format ``hgdpo-pool/1`` (all K latents of a row in one ``latents``
column, one row group per part) is still read; ``latents_of`` and ``read_latents`` serve both.
"""

from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from hgdpo.errors import HgdpoError
from hgdpo.infra import storage
from hgdpo.pool.part_file import PART_PREFIX, first_line, read_part_problem

FORMAT = "hgdpo-pool/2"
READABLE = ("hgdpo-pool/1", FORMAT)
LATENTS_V1 = "latents"  # format 1's single column of all K latents
META = "pool.json"
COMPLETE = "_COMPLETE.json"
REPAIR = ("rerun the pool job with the same config (jobs/build_pool.py, or jobs/run.py for a run's pool): "
          "it rebuilds only the prompts of the bad part")


def latents_type(shape: tuple[int, ...]) -> pa.DataType:
    return pa.fixed_shape_tensor(pa.float16(), list(shape))


def latent_column(k: int) -> str:
    """The column holding the k-th kept latent of each row (the seed ``latent_index[k]``)."""
    return f"latent_{k:02d}"


def latent_names(names: list[str] | pa.Schema) -> list[str]:
    """The columns of a pool table (or schema) that hold latents, in either format."""
    names = names.names if isinstance(names, pa.Schema) else names
    return [n for n in names if n == LATENTS_V1 or (n.startswith("latent_") and n[7:].isdigit())]


SELF_JUDGED = (("questions", pa.list_(pa.string())), ("self_scores", pa.list_(pa.float32())),
               ("self_least", pa.list_(pa.float32())))
SELF_JUDGED_COLUMNS = tuple(name for name, _ in SELF_JUDGED)


def schema(latent_shape: tuple[int, ...], self_judged: bool = False) -> pa.Schema:
    """The pool's schema; ``latent_shape`` is (K, C, h, w) with K = N or 2, or 2N for a pool with hard
    negatives (``self_judged``: the OSPO columns too)."""
    k, *shape = latent_shape
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
        *[(latent_column(i), latents_type(tuple(shape))) for i in range(k)],
        ("image_w", pa.binary()),
        ("image_l", pa.binary()),
        *(SELF_JUDGED if self_judged else ()),
    ])


def tensor_array(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """(rows, *shape) values as a fixed-shape float16 tensor column of ``type_``."""
    flat = np.ascontiguousarray(values, dtype=np.float16).reshape(-1)
    return pa.ExtensionArray.from_storage(type_, pa.FixedSizeListArray.from_arrays(
        pa.array(flat), int(np.prod(type_.shape))))


def _tensor_values(column) -> np.ndarray:
    """A fixed-shape tensor column as a (rows, *shape) float16 array."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return col.storage.flatten().to_numpy(zero_copy_only=False).reshape(len(col), *col.type.shape)


def to_table(rows: dict[str, Any], latent_shape: tuple[int, ...]) -> pa.Table:
    """Build a pool table from a column batch (numpy arrays / lists; ``latents`` as (rows, K, C, h, w)),
    in the pool's schema."""
    sch = schema(latent_shape, self_judged="self_scores" in rows)
    latents = np.asarray(rows["latents"], dtype=np.float16)
    arrays = []
    for field in sch:
        if field.name in latent_names(sch):
            arrays.append(tensor_array(latents[:, int(field.name[7:])], field.type))
        else:
            values = rows[field.name]
            values = [v.tolist() if isinstance(v, np.ndarray) else v for v in values]
            if field.name == "questions":  # JSON text per row on its way from the generator (hgdpo.pool.build)
                values = [json.loads(v) if isinstance(v, str) else v for v in values]
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=sch)


def latents_of(table: pa.Table) -> np.ndarray:
    """A pool table's latents as a (rows, K, C, h, w) float16 array (either format)."""
    if LATENTS_V1 in table.column_names:
        return _tensor_values(table.column(LATENTS_V1))
    names = latent_names(table.column_names)
    return np.stack([_tensor_values(table.column(n)) for n in names], axis=1)


def read_latents(part, group: int, positions: list[int]) -> dict[int, np.ndarray]:
    """From an open ``pyarrow.parquet.ParquetFile`` of a pool part, the latents at ``positions`` (indices
    into ``latent_index``) of every row of row group ``group``: position -> (rows, C, h, w) float16.
    Only those positions' columns are read (format 1: its one column of all K, whole)."""
    if LATENTS_V1 in part.schema_arrow.names:
        block = latents_of(part.read_row_group(group, columns=[LATENTS_V1]))
        return {k: block[:, k] for k in positions}
    table = part.read_row_group(group, columns=[latent_column(k) for k in positions])
    return {k: _tensor_values(table.column(latent_column(k))) for k in positions}


@dataclass
class PoolState:
    """What is on disk at a pool's location."""

    meta: dict | None
    parts: list[str]
    complete: dict | None
    sizes: dict[str, int | None]  # every name in the folder -> its size (None for a subfolder)


def _read_json(uri: str, name: str) -> dict | None:
    path = storage.join(uri, name)
    return storage.read_json(path, "pool metadata") if storage.is_file(path) else None


def state(uri: str | os.PathLike) -> PoolState:
    uri = os.fspath(uri)
    if storage.is_file(uri):
        raise HgdpoError(f"output: {uri} exists and is not a directory")
    sizes = storage.sizes(uri)
    names = sorted(sizes)
    meta = _read_json(uri, META)
    if meta is None and names:
        raise HgdpoError(f"{uri} is not empty and holds no pool ({META} missing)")
    if meta is not None and meta.get("format") not in READABLE:
        raise HgdpoError(f"{uri}/{META}: not a pool of format {' or '.join(READABLE)} (found {meta.get('format')!r})")
    parts = [n for n in names if n.startswith(PART_PREFIX) and n.endswith(".parquet")]
    return PoolState(meta, parts, _read_json(uri, COMPLETE), sizes)


def init(uri: str, meta: dict) -> None:
    """Create the pool directory and write its metadata (first thing a new pool gets)."""
    storage.makedirs(uri)
    storage.write_json(storage.join(uri, META), meta)


def remove_temporaries(uri: str) -> int:
    """Delete half-written files left by a job that died; returns how many."""
    return storage.remove_temporaries(uri)


def part_ids(uri: str, parts: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The prompt ids of each part that can be read (only its ``prompt_id`` column is read), and for each
    part that cannot, why: the pool job rebuilds those parts' prompts instead of stopping."""
    ids: dict[str, list[str]] = {}
    unreadable: dict[str, str] = {}
    for name in parts:
        try:
            ids[name] = storage.read_parquet(storage.join(uri, name), columns=["prompt_id"]).column("prompt_id").to_pylist()
        except (OSError, ValueError, pa.ArrowException) as err:
            unreadable[name] = f"cannot be read ({first_line(err)})"
    return ids, unreadable


def union_ids(uri: str, ids: dict[str, list[str]]) -> set[str]:
    """The prompt ids of all parts; refuses a prompt found in two parts."""
    done: set[str] = set()
    for name, part in ids.items():
        dup = done.intersection(part)
        if dup:
            raise HgdpoError(f"{uri}/{name}: prompt {min(dup)!r} also appears in another part; the pool is corrupt")
        done.update(part)
    return done


def done_prompt_ids(uri: str, parts: list[str]) -> set[str]:
    """Ids of the prompts that already have a row (reads only the ``prompt_id`` column); refuses a part
    that cannot be read, naming it."""
    ids, unreadable = part_ids(uri, parts)
    if unreadable:
        name, why = next(iter(unreadable.items()))
        raise HgdpoError(f"{uri}/{name}: pool part {why}; {REPAIR}")
    return union_ids(uri, ids)


def mark_complete(uri: str, parts: list[str], rows: int, files: dict[str, dict] | None = None) -> None:
    """Write the manifest. ``files``: the parts' entries as their writer returned them (``write_part_file``);
    a part without one, or whose size on disk is not the one given, is read once to take its own."""
    sizes = storage.sizes(uri)
    files = dict(files or {})
    for name in parts:
        if files.get(name, {}).get("bytes") != sizes.get(name):
            size, sha256 = storage.digest(storage.join(uri, name))
            files[name] = {"rows": storage.parquet_rows(storage.join(uri, name)), "bytes": size, "sha256": sha256}
    storage.write_json(storage.join(uri, COMPLETE), {"parts": parts, "rows": rows,
                                                     "files": {name: files[name] for name in parts}})


def unmark_complete(uri: str) -> None:
    """Delete the manifest (before a finished pool's bad parts are deleted: the pool never looks complete
    without them)."""
    storage.delete(storage.join(uri, COMPLETE))


def bad_parts(uri: str, st: PoolState, read: bool = False) -> dict[str, str]:
    """The parts of a finished pool that are not as its manifest records them, each with what is wrong.
    From the listing alone (no file opened): missing, or of another size. With ``read``, also: bytes
    whose sha256 is not the recorded one, a file that does not read as parquet, rows other than the
    ones its name and the manifest give, a prompt found in another part."""
    files = st.complete.get("files", {})
    bad: dict[str, str] = {}
    for name in st.complete["parts"]:
        size, entry = st.sizes.get(name), files.get(name)
        if size is None:
            bad[name] = "is missing"
        elif entry is not None and size != entry["bytes"]:
            bad[name] = f"has {size} bytes, not the {entry['bytes']} written (truncated or overwritten)"
    if read:
        seen: set[str] = set()
        for name in st.complete["parts"]:
            if name not in bad:
                why = read_part_problem(uri, name, files.get(name), seen)
                if why:
                    bad[name] = why
    return bad


def _bad_message(setting: str, uri: str, bad: dict[str, str]) -> str:
    listed = "; ".join(f"{name} {why}" for name, why in list(bad.items())[:3])
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    what = "part" if len(bad) == 1 else f"{len(bad)} bad parts:"
    return f"{setting}: {uri}: pool {what} {listed}{more}; {REPAIR}"


def _finished(uri: str, setting: str) -> PoolState:
    st = state(uri)
    if st.meta is None:
        raise HgdpoError(f"{setting}: {uri} is not a pool (no {META})")
    if st.complete is None:
        raise HgdpoError(f"{setting}: {uri} is incomplete ({len(st.parts)} part files, no {COMPLETE}); "
                         f"rerun the pool job with the same config to finish it")
    return st


def check_parts(uri: str | os.PathLike, setting: str = "pool") -> PoolState:
    """The check every reader of a pool makes before any work: it is a finished pool, and each part its
    manifest lists exists with the size recorded (one listing; no file is opened). A part changed
    without changing size passes: ``verify`` reads the parts to find it.

    A pool whose manifest records no sizes (written before they were) is accepted on its parts'
    presence, with a warning: rerunning the pool job records them."""
    uri = os.fspath(uri)
    st = _finished(uri, setting)
    bad = bad_parts(uri, st)
    if bad:
        raise HgdpoError(_bad_message(setting, uri, bad))
    if "files" not in st.complete:
        print(f"warning: {uri}: the pool's manifest records no part sizes (written before they were), so only "
              f"the parts' presence is checked; rerun the pool job with the same config to record them",
              file=sys.stderr)
    return st


def verify(uri: str | os.PathLike, setting: str = "pool") -> dict:
    """Read every part of a finished pool and check it against the manifest: size, sha256, rows, and the
    prompt ids its name was given for, no prompt in two parts, the prompt count of ``pool.json``.
    Returns a summary (``parts``, ``rows``, ``bytes``, ``checksums``: whether the manifest has them);
    raises ``HgdpoError`` naming every bad part."""
    uri = os.fspath(uri)
    st = _finished(uri, setting)
    bad = bad_parts(uri, st, read=True)
    if bad:
        raise HgdpoError(_bad_message(setting, uri, bad))
    files = st.complete.get("files")
    rows = sum(files[n]["rows"] for n in st.complete["parts"]) if files else st.complete["rows"]
    if rows != st.meta["num_prompts"]:
        raise HgdpoError(f"{setting}: {uri}: the parts hold {rows} prompts, not the {st.meta['num_prompts']} of "
                         f"{META}; {REPAIR}")
    return {"parts": len(st.complete["parts"]), "rows": rows,
            "bytes": sum(st.sizes[n] for n in st.complete["parts"]), "checksums": files is not None}


def read_meta(uri: str | os.PathLike, setting: str = "pool") -> dict:
    """The metadata of a finished pool whose parts pass ``check_parts``; a clear error naming ``setting`` if not."""
    return check_parts(uri, setting).meta


def read(uri: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read a finished pool, rows in prompt order. In ``columns``, ``"latents"`` stands for the latent
    columns of either format (``latents_of`` turns them into one array)."""
    table = pa.concat_tables(list(read_parts(uri, columns)))
    if "prompt_index" in table.column_names:
        table = table.sort_by("prompt_index")
    return table


def read_parts(uri: str | os.PathLike, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A finished pool one part at a time (for work whose memory must not grow with the pool);
    ``columns`` as for ``read``."""
    st = check_parts(uri)
    if columns is not None and LATENTS_V1 in columns and st.meta["format"] != READABLE[0]:
        k = st.meta["latent_shape"][0]
        columns = [c for c in columns if c != LATENTS_V1] + [latent_column(i) for i in range(k)]
    for name in st.complete["parts"]:
        yield storage.read_parquet(storage.join(os.fspath(uri), name), columns=columns)


def without_latents(table: pa.Table) -> pa.Table:
    return table.drop_columns(latent_names(table.column_names))


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def png_image(data: bytes) -> np.ndarray:
    """PNG bytes as an (H, W, 3) uint8 image."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
