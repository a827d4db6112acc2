"""Public preference sets as files: Pick-a-Pic v2 parquet and HPDv2 JSON, their rows checked, and a part's images.

* **Pick-a-Pic v2** (a parquet file or a folder of them): ``caption``, ``jpg_0``, ``jpg_1``,
  ``label_0``, ``label_1`` are needed; ``has_label`` false (no vote) and ``are_different`` false (the
  same image twice) drop a row; ``label_0 = 0.5`` is a tie and is dropped; otherwise the image
  labelled 1 is the winner and goes first, as Diffusion-DPO's training code orders a pair.
  ``model_0`` / ``model_1`` and ``ranking_id`` are kept when present. Our own export is this format
  with a ``prompt_id`` column, which the import keeps as the id (a round trip keeps the ids).
* **HPDv2** (a JSON array or JSON lines): each entry's ``prompt``, ``file_path`` (two image paths,
  relative to ``images``, default the JSON's folder) and ``human_preference`` (``[1, 0]``: the first
  is preferred; ``[0.5, 0.5]`` a tie). The JSON is parsed as a stream, entry by entry.

The first pass (``hgdpo.interchange.selection``) reads the small columns through ``pickapic_records`` /
``hpd_records``; the encoders read a part's images through ``fetch_pickapic`` / ``fetch_hpd``, one parquet
row group (or one pair's files) at a time. A parquet without the needed columns, a JSON entry without its
fields or whose image file does not exist is refused naming the file and the row.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hgdpo.errors import HgdpoError
from hgdpo.infra import storage
from hgdpo.infra.storage_errors import describe_error
from hgdpo.interchange.config import ImportConfig

PICKAPIC_NEEDED = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
HPD_NEEDED = ("prompt", "file_path", "human_preference")
ID_DEFAULTS = ("prompt_id", "ranking_id")
SCAN_BATCH = 4096  # rows of small columns per read of the first pass


def source_files(cfg: ImportConfig) -> list[str]:
    """The source's files: the file itself, or a folder's ``*.parquet`` files in name order."""
    where = storage.absolute(cfg.source)
    with storage.errors("import.source", where):
        if storage.is_file(where):
            return [where]
        if storage.is_dir(where) and cfg.resolved_format() == "pickapic":
            names = [n for n in storage.listdir(where) if n.endswith(".parquet")]
            if names:
                return [storage.join(where, n) for n in names]
            raise HgdpoError(f"import.source: {where} holds no .parquet file")
    raise HgdpoError(f"import.source: {where} does not exist")


def image_root(cfg: ImportConfig) -> str:
    """HPDv2: the folder its ``file_path`` entries are relative to."""
    return storage.absolute(cfg.images) if cfg.images else storage.parent(storage.absolute(cfg.source))


def pair_id(value: Any, fmt: str, row: int) -> str:
    """A pair's stable id: the source's own (``id_column``), else its format and row."""
    return str(value) if value is not None else f"{fmt}-{row}"


def _parquet(path: str):
    fs, inner = storage.resolve(path)
    try:
        return pq.ParquetFile(fs.open_input_file(inner))
    except (OSError, pa.ArrowException) as err:
        raise HgdpoError(f"{path}: not a readable parquet file ({describe_error(err)})") from None


def _id_column(cfg: ImportConfig, names: list[str], path: str) -> str | None:
    column = cfg.id_column or next((c for c in ID_DEFAULTS if c in names), None)
    if column is not None and column not in names:
        raise HgdpoError(f"import.id_column: {path} has no column {column!r} (it has {', '.join(names)})")
    return column


def pickapic_records(cfg: ImportConfig, files: list[str]) -> Iterator[dict]:
    """Every row of the Pick-a-Pic files, small columns only, with its ``where`` (file and row)."""
    row = 0
    for f, path in enumerate(files):
        part = _parquet(path)
        names = part.schema_arrow.names
        missing = [c for c in PICKAPIC_NEEDED if c not in names]
        if missing:
            raise HgdpoError(f"{path}: not a Pick-a-Pic parquet: column(s) {', '.join(missing)} missing "
                             f"(it has {', '.join(names)})")
        id_col = _id_column(cfg, names, path)
        columns = ["caption", "label_0", "label_1", *[c for c in ("has_label", "are_different") if c in names]]
        columns += [id_col] if id_col and id_col not in columns else []
        at = 0
        for batch in part.iter_batches(batch_size=SCAN_BATCH, columns=columns):
            data = batch.to_pydict()
            for k in range(batch.num_rows):
                yield {"where": f"{path}: row {at}", "row": row, "file": f, "at": at, "end": 0,
                       "caption": data["caption"][k], "labels": (data["label_0"][k], data["label_1"][k]),
                       "has_label": data["has_label"][k] if "has_label" in data else True,
                       "are_different": data["are_different"][k] if "are_different" in data else True,
                       "id": pair_id(data[id_col][k] if id_col else None, "pickapic", row)}
                at += 1
                row += 1
        del part


def iter_json(path: str, chunk: int = 1 << 20) -> Iterator[tuple[int, Any, int, int]]:
    """The entries of a JSON array file, or of a JSON-lines file, one at a time: (position, entry, first byte,
    byte after the last). Reads ``chunk`` bytes at a time and never holds more than that plus one entry."""
    decoder = json.JSONDecoder()
    fs, inner = storage.resolve(path)
    with storage.errors("import.source", path), fs.open_input_stream(inner) as f:
        buf, pos, at, eof, index, state = "", 0, 0, False, 0, "start"  # at: the byte offset of buf[pos]
        pending = b""

        def fill() -> bool:
            nonlocal buf, pos, pending, eof
            data = f.read(chunk)
            if not data:
                eof = True
                return False
            data, pending = pending + data, b""
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:  # a character cut at the chunk's end: keep its bytes for the next
                if err.start < len(data) - 4:
                    raise HgdpoError(f"{path}: not UTF-8 JSON (byte offset about {at + err.start})") from None
                text, pending = data[:err.start].decode("utf-8"), data[err.start:]
            buf, pos = buf[pos:] + text, 0
            return True

        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,\ufeff":
                if buf[pos] == "," and state != "array":
                    raise HgdpoError(f"{path}: entry {index}: not valid JSON (a stray comma)")
                at += len(buf[pos].encode("utf-8"))
                pos += 1
            if pos >= len(buf):
                if not fill():
                    if state == "array":
                        raise HgdpoError(f"{path}: the JSON array is not closed (the file ends after entry "
                                         f"{index - 1})")
                    return
                continue
            if state == "start":
                state = "array" if buf[pos] == "[" else "lines"
                if buf[pos] == "[":
                    pos, at = pos + 1, at + 1
                continue
            if state == "array" and buf[pos] == "]":
                state, pos, at = "end", pos + 1, at + 1
                continue
            if state == "end":
                raise HgdpoError(f"{path}: text after the JSON array's end")
            try:
                entry, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as err:
                if not eof and fill():
                    continue
                raise HgdpoError(f"{path}: entry {index}: not valid JSON ({err.msg})") from None
            if end == len(buf) and not eof and fill():  # a number may go on in the next chunk
                continue
            size = len(buf[pos:end].encode("utf-8"))
            yield index, entry, at, at + size
            index, pos, at = index + 1, end, at + size


def _hpd_entry(entry: Any, where: str) -> tuple[str, list[str], list]:
    """An HPDv2 entry's prompt, two image paths and two labels, checked."""
    if not isinstance(entry, dict):
        raise HgdpoError(f"{where}: not a JSON object")
    missing = [k for k in HPD_NEEDED if k not in entry]
    if missing:
        raise HgdpoError(f"{where}: no {', '.join(repr(m) for m in missing)} (HPDv2 entries have "
                         f"{', '.join(HPD_NEEDED)})")
    paths, labels = entry["file_path"], entry["human_preference"]
    if not (isinstance(paths, list) and len(paths) == 2 and all(isinstance(p, str) for p in paths)):
        raise HgdpoError(f"{where}: file_path must be a list of two image paths (got {paths!r})")
    if not (isinstance(labels, list) and len(labels) == 2):
        raise HgdpoError(f"{where}: human_preference must be a list of two labels (got {labels!r})")
    return entry["prompt"], paths, labels


def hpd_records(cfg: ImportConfig, path: str) -> Iterator[dict]:
    """Every HPDv2 entry, checked: its fields, two image paths that exist, two labels."""
    root = image_root(cfg)
    local = storage.is_local(root)
    for index, entry, start, end in iter_json(path):
        where = f"{path}: entry {index}"
        caption, paths, labels = _hpd_entry(entry, where)
        if local:  # an object store is asked when the image is read (a request per file here would be slow)
            for p in paths:
                if not os.path.isfile(storage.join(root, p)):
                    raise HgdpoError(f"{where}: image {p!r} does not exist in {root} (set import.images to the "
                                     f"folder the paths are relative to)")
        if cfg.id_column and entry.get(cfg.id_column) is None:
            raise HgdpoError(f"import.id_column: {where} has no field {cfg.id_column!r}")
        yield {"where": where, "row": index, "file": 0, "at": start, "end": end, "caption": caption,
               "labels": tuple(labels), "has_label": True, "are_different": paths[0] != paths[1],
               "id": pair_id(entry.get(cfg.id_column) if cfg.id_column else None, "hpdv2", index)}



def fetch_pickapic(cfg: ImportConfig, files: list[str], chunk: dict) -> list[dict]:
    """The pairs of a part with their captions, ids, makers and (winner, loser) image bytes: per file, one row
    group of the needed columns at a time."""
    out: list[dict] = [{} for _ in chunk["row"]]
    for f in sorted(set(chunk["file"])):
        part = _parquet(files[f])
        names = part.schema_arrow.names
        id_col = _id_column(cfg, names, files[f])
        columns = ["caption", "jpg_0", "jpg_1", *[c for c in ("model_0", "model_1") if c in names]]
        columns += [id_col] if id_col and id_col not in columns else []
        meta = part.metadata
        starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        mine = [k for k, file in enumerate(chunk["file"]) if file == f]
        groups: dict[int, list[int]] = {}
        for k in mine:
            groups.setdefault(int(np.searchsorted(starts, chunk["at"][k], side="right") - 1), []).append(k)
        for g, members in sorted(groups.items()):
            try:
                table = part.read_row_group(g, columns=columns)
            except (OSError, pa.ArrowException) as err:
                raise HgdpoError(f"{files[f]}: row group {g} cannot be read ({describe_error(err)})") from None
            for k in members:
                at, side, row = chunk["at"][k], chunk["winner"][k], chunk["row"][k]
                values = {c: table.column(c)[at - int(starts[g])].as_py() for c in columns}
                images = (values["jpg_0"], values["jpg_1"])
                makers = (values.get("model_0"), values.get("model_1"))
                out[k] = {"index": chunk["index"] + k, "row": row, "where": f"{files[f]}: row {at}",
                          "id": pair_id(values[id_col] if id_col else None, "pickapic", row),
                          "caption": values["caption"], "w": images[side], "l": images[1 - side],
                          "model_w": makers[side], "model_l": makers[1 - side]}
            del table
        del part
    return out


def fetch_hpd(cfg: ImportConfig, path: str, chunk: dict) -> list[dict]:
    """The pairs of a part from the JSON's bytes of their entries (one read), and their image files."""
    fs, inner = storage.resolve(path)
    first, last = min(chunk["at"]), max(chunk["end"])
    with storage.errors("import.source", path), fs.open_input_file(inner) as f:
        span = f.read_at(last - first, first)
    root, out = image_root(cfg), []
    for k, row in enumerate(chunk["row"]):
        where = f"{path}: entry {row}"
        entry = json.loads(span[chunk["at"][k] - first: chunk["end"][k] - first])
        caption, paths, _ = _hpd_entry(entry, where)
        images = []
        for p in paths:
            try:
                images.append(storage.read_bytes(storage.join(root, p)))
            except (OSError, pa.ArrowException) as err:
                raise HgdpoError(f"{where}: image {p!r} cannot be read from {root} "
                                 f"({describe_error(err)})") from None
        side = chunk["winner"][k]
        out.append({"index": chunk["index"] + k, "row": row, "where": where, "caption": caption,
                    "id": pair_id(entry.get(cfg.id_column) if cfg.id_column else None, "hpdv2", row),
                    "w": images[side], "l": images[1 - side], "model_w": None, "model_l": None})
    return out

