"""One part file of a pool: its name, its writing (with its manifest entry), and its check when read whole.

A part holds the rows of some prompts (``hgdpo.pool.store``'s schema), in row groups of ``GROUP_ROWS``
rows; its name holds its first prompt index and a digest of its prompt ids, so a part holding other
rows than its name says is found (``read_part_problem``). ``write_part_file`` writes it atomically
(``hgdpo.infra.storage``) and returns what the manifest records of it: rows, bytes and sha256, from
the bytes as they were written.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from hgdpo.infra import storage

GROUP_ROWS = 8  # rows per row group: at 704x1024 and N = 20, 14 MB of latents
PART_PREFIX = "part-"


def part_name(prompt_ids: list[str], prompt_indexes: list[int]) -> str:
    """The name of the part holding these rows: its first prompt index and a digest of its ids."""
    digest = hashlib.sha1("\n".join(prompt_ids).encode()).hexdigest()[:10]
    return f"{PART_PREFIX}{min(prompt_indexes):09d}-{digest}.parquet"


def write_part(uri: str, table: pa.Table) -> str:
    """Write rows as one part file, atomically (``hgdpo.infra.storage.write``). Returns its name."""
    return write_part_file(uri, table)[0]


def write_part_file(uri: str, table: pa.Table) -> tuple[str, dict]:
    """``write_part``, also returning the part's manifest entry: rows, bytes and sha256, from the bytes
    as they were written (the job never reads a part back to record it)."""
    name = part_name(table.column("prompt_id").to_pylist(), table.column("prompt_index").to_pylist())
    size, sha256 = storage.write_parquet(storage.join(uri, name), table, compression="zstd", row_group_size=GROUP_ROWS)
    return name, {"rows": table.num_rows, "bytes": size, "sha256": sha256}


def read_part_problem(uri: str, name: str, entry: dict | None, seen: set[str]) -> str | None:
    """What is wrong with one part when read whole (None: nothing); adds its prompt ids to ``seen``."""
    path = storage.join(uri, name)
    if entry is not None:
        _, sha256 = storage.digest(path)
        if sha256 != entry["sha256"]:
            return f"has bytes other than those written (sha256 {sha256[:12]}... found, {entry['sha256'][:12]}... recorded)"
    try:  # with a matching checksum only the ids are decoded; without one, every column
        table = storage.read_parquet(path, columns=["prompt_id", "prompt_index"] if entry else None)
    except (OSError, ValueError, pa.ArrowException) as err:
        return f"cannot be read ({first_line(err)})"
    ids = table.column("prompt_id").to_pylist()
    if entry is not None and len(ids) != entry["rows"]:
        return f"holds {len(ids)} rows, not the {entry['rows']} written"
    if not ids or part_name(ids, table.column("prompt_index").to_pylist()) != name:
        return "holds rows other than the prompts its name was given for"
    dup = seen.intersection(ids)
    if dup:
        return f"repeats prompt {min(dup)!r} of another part"
    seen.update(ids)
    return None


def first_line(err: Exception) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
