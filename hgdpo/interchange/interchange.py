"""Public preference data in and out: Pick-a-Pic v2 / HPDv2 import as a pool of pairs, and pool export.

**Import** writes a *pool* (``hgdpo.pool.store``, format ``hgdpo-pool/2``) with N = 2 images a row: the
winner's and the loser's VAE latents (``latent_00`` the winner, ``latent_01`` the loser), scores
``[1, 0]`` that put the winner first, the source's own image bytes as ``image_w`` / ``image_l``, and
beside the pool columns ``source_row`` (the row's position over the whole source), ``source_id``
(its id there), ``model_w`` / ``model_l`` (what made each image, when the source says). Because it is a
pool, training, ``hgdpo verify``, export and sweeps read an import with no reader of their own, and it
gets the pool's manifest, atomic parts, resume and repair. Its ``pool.json`` has ``source``: the
format, the location, and how many rows were read and dropped, and why.

* **Pick-a-Pic v2** (a parquet file or a folder of them): ``caption``, ``jpg_0``, ``jpg_1``,
  ``label_0``, ``label_1`` are needed; ``has_label`` false (no vote) and ``are_different`` false (the
  same image twice) drop a row; ``label_0 = 0.5`` is a tie and is dropped; otherwise the image
  labelled 1 is the winner and goes first, as Diffusion-DPO's training code orders a pair.
  ``model_0`` / ``model_1`` and ``ranking_id`` are kept when present. Our own export is this format
  with a ``prompt_id`` column, which the import keeps as the id (a round trip keeps the ids).
* **HPDv2** (a JSON array or JSON lines): each entry's ``prompt``, ``file_path`` (two image paths,
  relative to ``images``, default the JSON's folder) and ``human_preference`` (``[1, 0]``: the first
  is preferred; ``[0.5, 0.5]`` a tie). The JSON is parsed as a stream, entry by entry.

Labels must be 0, 0.5 or 1 and sum to 1; anything else is refused naming the file and the row, as is
a parquet without the needed columns, a JSON entry without its fields or whose image file does not
exist, and an image that cannot be decoded. An undecodable image is refused rather than skipped: the
pool's rows are numbered without gaps before any image is read (that is what makes a part's prompts,
and so resume, independent of what the encoders meet), and a silently smaller set would change what a
sweep's dataset size means; the message names the row and the setting that leaves it out
(``exclude_rows``).

**The (H) subset** (``subset: people``): a pair is kept when its caption has one of
``people_keywords`` as a whole word (case-insensitive; plural ``s``/``es`` and possessive ``'s`` match
too). A keyword list is the default and the only rule: it is decided on the caption alone, before
any image is read, so the rows are numbered in the first pass; it costs nothing and is the same on
every machine. A CLIP zero-shot classifier would have to read and score every image before the pool's
rows could be numbered (a caption that names no person is missed: widen the list for such a set).

**Images** are decoded, converted to RGB, scaled (bicubic) so that they cover the target size (the
model's native size, or ``width`` x ``height``) and centre-cropped to it, as diffusers' Diffusion-DPO
example does (``Resize`` of the shorter side, then ``CenterCrop``); then the VAE encodes them once,
``encode_batch`` at a time, and the latent is the posterior's mean times the VAE's scaling factor
(the mean, not a sample: deterministic, so a resumed import equals an uninterrupted one). A JPEG is
decoded at 1/2, 1/4 or 1/8 of its size when that still covers the target (PIL's draft mode).

**Streamed.** A first pass reads only the small columns (captions, labels, ids; for HPDv2 the JSON
entry by entry), checks every row and keeps 48 bytes per kept pair (its position, side and an id
digest); the encoders read the images, one parquet row group (or one pair's files) at a time, for
the ``rows_per_file`` pairs of the part they make. On Ray Data, ``EncodeParts`` actors (one per GPU:
each loads the VAE once) make and write the parts, reading and decoding the next part and writing
the last one in threads while the VAE encodes; ``import_pairs(cfg, local=True)`` is the same in one
process.

**Export** (``export_pairs``) writes a pool as one Pick-a-Pic-style parquet file: ``caption``,
``jpg_0`` (the winner's image bytes, PNG for a built pool), ``jpg_1`` (the loser's), ``label_0`` = 1,
``label_1`` = 0, ``has_label``, ``are_different``, ``model_0``, ``model_1``, ``ranking_id``, ``user_id``,
``image_0_uid``, ``image_1_uid``, and ours: ``prompt_id``, ``prompt_index``, ``score_0``, ``score_1``,
``seed_0``, ``seed_1``; the pool's fingerprint in the file's metadata (``hgdpo``). A pool part at a
time, in row groups of ``row_group_rows``, written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from hgdpo.config.core import from_dict, to_dict
from hgdpo.errors import HgdpoError
from hgdpo.infra import storage, tracking
from hgdpo.infra.raycluster import TorchThread
from hgdpo.interchange.config import ImportConfig, PairsExportConfig
from hgdpo.models import loading as models
from hgdpo.pool import store as pool

PICKAPIC_NEEDED = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
HPD_NEEDED = ("prompt", "file_path", "human_preference")
ID_DEFAULTS = ("prompt_id", "ranking_id")
EXTRA_COLUMNS = pa.schema([("source_row", pa.int64()), ("source_id", pa.string()), ("model_w", pa.string()),
                           ("model_l", pa.string())])
EXPORT_FORMAT = "hgdpo-export/1"
EXPORT_SCHEMA = pa.schema([
    ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()),
    ("label_1", pa.float64()), ("has_label", pa.bool_()), ("are_different", pa.bool_()), ("model_0", pa.string()),
    ("model_1", pa.string()), ("ranking_id", pa.int64()), ("user_id", pa.int64()), ("image_0_uid", pa.string()),
    ("image_1_uid", pa.string()), ("prompt_id", pa.string()), ("prompt_index", pa.int64()),
    ("score_0", pa.float32()), ("score_1", pa.float32()), ("seed_0", pa.int64()), ("seed_1", pa.int64()),
])
SCAN_BATCH = 4096  # rows of small columns per read of the first pass
PARTS_PER_CALL = 4  # parts an encoder actor makes per call


# ---------------------------------------------------------------------------------------------
# Labels and the (H) filter


def winner_of(label_0: Any, label_1: Any, where: str) -> int | None:
    """0 or 1, the side whose label is 1; None for a tie (0.5 each). Refuses labels outside {0, 0.5, 1}
    or that do not sum to 1, naming ``where`` (the file and row)."""
    ok = {0.0, 0.5, 1.0}
    try:
        a, b = float(label_0), float(label_1)
    except (TypeError, ValueError):
        a = b = float("nan")
    if a not in ok or b not in ok or a + b != 1.0:
        raise HgdpoError(f"{where}: labels {label_0!r}, {label_1!r}: each must be 0, 0.5 or 1 and the two must sum "
                         f"to 1 (1 marks the preferred image, 0.5 each a tie)")
    return None if a == 0.5 else (0 if a == 1.0 else 1)


WORDS = re.compile(r"[a-z]+(?:'s)?")


def is_people(caption: str, keywords: frozenset[str]) -> bool:
    """Whether ``caption`` has one of ``keywords`` as a whole word (plural and possessive forms match)."""
    for word in WORDS.findall(caption.lower()):
        word = word.removesuffix("'s")
        if word in keywords or (word.endswith("s") and word[:-1] in keywords) or \
                (word.endswith("es") and word[:-2] in keywords):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# The first pass: which source rows become which pairs (small columns only)


@dataclass
class Plan:
    """The kept pairs in pool order, a few numbers each (no caption, id or image: the encoders read those):
    ``row`` (over the whole source), ``file`` and ``at`` (Pick-a-Pic: the file and the row in it; HPDv2: the
    entry's bytes ``at``..``end`` in the JSON), ``winner`` (the source's side that won); and what the pass read
    and dropped, and why."""

    row: np.ndarray
    file: np.ndarray
    at: np.ndarray
    end: np.ndarray
    winner: np.ndarray
    read: int
    dropped: dict[str, int]

    def __len__(self) -> int:
        return len(self.row)

    def chunk(self, start: int, stop: int) -> dict:
        """Pairs ``start``..``stop`` (pool indexes) as plain data, what an encoder is given for a part."""
        return {"index": start, **{k: getattr(self, k)[start:stop].tolist() for k in PLAN_ARRAYS}}


PLAN_ARRAYS = ("row", "file", "at", "end", "winner")


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
    import pyarrow.parquet as pq

    fs, inner = storage.resolve(path)
    try:
        return pq.ParquetFile(fs.open_input_file(inner))
    except (OSError, pa.ArrowException) as err:
        raise HgdpoError(f"{path}: not a readable parquet file ({storage.describe_error(err)})") from None


def _id_column(cfg: ImportConfig, names: list[str], path: str) -> str | None:
    column = cfg.id_column or next((c for c in ID_DEFAULTS if c in names), None)
    if column is not None and column not in names:
        raise HgdpoError(f"import.id_column: {path} has no column {column!r} (it has {', '.join(names)})")
    return column


def _pickapic_records(cfg: ImportConfig, files: list[str]) -> Iterator[dict]:
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


def _hpd_records(cfg: ImportConfig, path: str) -> Iterator[dict]:
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


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def plan(cfg: ImportConfig, log=print) -> Plan:
    """The first pass over the source: every row checked, the kept ones numbered (0, 1, ...) in source
    order. Holds a few numbers per kept pair (and an 8-byte digest of its id, to refuse repeated ids)."""
    fmt = cfg.resolved_format()
    files = source_files(cfg)
    records = _pickapic_records(cfg, files) if fmt == "pickapic" else _hpd_records(cfg, files[0])
    keywords = frozenset(k.lower() for k in cfg.people_keywords)
    excluded = set(cfg.exclude_rows)
    kept = {name: array("q") for name in PLAN_ARRAYS}
    ids = array("Q")
    read, dropped = 0, {"tie": 0, "unlabelled": 0, "identical": 0, "not_people": 0, "excluded": 0,
                        "beyond_max_pairs": 0}
    for rec in records:
        read += 1
        where = rec["where"]
        if not isinstance(rec["caption"], str) or not rec["caption"].strip():
            raise HgdpoError(f"{where}: no caption (got {rec['caption']!r})")
        if rec["row"] in excluded:
            dropped["excluded"] += 1
            continue
        if rec["has_label"] is False:
            dropped["unlabelled"] += 1
            continue
        side = winner_of(*rec["labels"], where)
        if side is None:
            dropped["tie"] += 1
            continue
        if rec["are_different"] is False:
            dropped["identical"] += 1
            continue
        if cfg.subset == "people" and not is_people(rec["caption"], keywords):
            dropped["not_people"] += 1
            continue
        if cfg.max_pairs is not None and len(ids) >= cfg.max_pairs:
            dropped["beyond_max_pairs"] += 1
            continue
        for name in PLAN_ARRAYS:
            kept[name].append(side if name == "winner" else rec[name])
        ids.append(_hash(rec["id"]))
    arrays = {name: np.frombuffer(kept[name], dtype=np.int64).copy() for name in PLAN_ARRAYS}
    result = Plan(**arrays, read=read, dropped=dropped)
    why = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in dropped.items() if n)
    log(f"import: {read} rows read from {cfg.source}, {len(result)} pairs kept" + (f" (dropped: {why})" if why else ""))
    if not len(result):
        raise HgdpoError(f"import.source: {cfg.source}: no pair left to import ({read} rows read"
                         + (f"; dropped: {why}" if why else "") + ")")
    digests = np.frombuffer(ids, dtype=np.uint64)
    order = np.argsort(digests, kind="stable")
    same = np.flatnonzero(digests[order][1:] == digests[order][:-1])
    if len(same):
        a, b = sorted(int(result.row[order[k]]) for k in (same[0], same[0] + 1))
        raise HgdpoError(f"import.source: {cfg.source}: rows {a} and {b} have the same pair id; ids must be unique "
                         f"(set import.id_column to a unique column, or to a missing one to number the rows)")
    return result


# ---------------------------------------------------------------------------------------------
# Images -> latents


def fit(image, width: int, height: int) -> np.ndarray:
    """An image as (height, width, 3) uint8: RGB, scaled (bicubic) to cover the size, centre-cropped."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (width, height):
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
    return np.asarray(image)


def decode_image(data: Any, where: str, row: int, width: int, height: int) -> np.ndarray:
    """Image bytes -> ``fit`` pixels; an undecodable image is refused naming the row and the way to skip it."""
    from PIL import Image

    try:
        if isinstance(data, dict):  # a Hugging Face Image feature: {"bytes": ..., "path": ...}
            data = data.get("bytes")
        image = Image.open(io.BytesIO(data))
        scale = max(width / image.width, height / image.height)
        # A JPEG decodes at 1/2, 1/4 or 1/8 of its size when that still covers the target (DCT scaling):
        # a 512 px source for a 64 px model decodes 8x smaller, several times faster.
        image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image.load()
        return fit(image, width, height)
    except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError) as err:
        raise HgdpoError(f"{where}: the image cannot be decoded ({type(err).__name__}: {str(err)[:80]}); fix the "
                         f"source, or leave the row out with exclude_rows=[{row}]") from None


def load_vae(cfg: ImportConfig, dtype, device: str):
    """The model's VAE alone (a single-file checkpoint: through its pipeline)."""
    from diffusers import AutoencoderKL

    source = models.resolve_model(cfg.model, allow_pickle=cfg.allow_pickle)
    if source.kind == "file":
        vae = models.load_pipeline(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle).vae
    else:
        try:
            vae = AutoencoderKL.from_pretrained(source.location, subfolder="vae",
                                                use_safetensors=None if cfg.allow_pickle else True)
        except (OSError, ValueError, RuntimeError) as err:
            raise HgdpoError(f"model: the VAE of {source.location} could not be loaded ({str(err)[:120]})") from None
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def encode(vae, pixels: np.ndarray, batch: int) -> np.ndarray:
    """uint8 images (n, H, W, 3) -> latents (n, C, h, w) float16 in the UNet's scaled space: the posterior's
    mean, shifted and scaled as the VAE's config says, ``batch`` images per call."""
    import torch

    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            x = torch.from_numpy(pixels[start: start + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
            mean = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()
            out.append(((mean.float() - shift) * scale).to(torch.float16).cpu().numpy())
    return np.concatenate(out)


def _fetch_pickapic(cfg: ImportConfig, files: list[str], chunk: dict) -> list[dict]:
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
                raise HgdpoError(f"{files[f]}: row group {g} cannot be read ({storage.describe_error(err)})") from None
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


def _fetch_hpd(cfg: ImportConfig, path: str, chunk: dict) -> list[dict]:
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
                                 f"({storage.describe_error(err)})") from None
        side = chunk["winner"][k]
        out.append({"index": chunk["index"] + k, "row": row, "where": where, "caption": caption,
                    "id": pair_id(entry.get(cfg.id_column) if cfg.id_column else None, "hpdv2", row),
                    "w": images[side], "l": images[1 - side], "model_w": None, "model_l": None})
    return out


class EncodeParts:
    """Makes and writes the imported pool's parts: loads the VAE once, then per part its pairs' images
    (read from the source), decoded, fitted and encoded, and the part written. A Ray Data actor
    (``__call__`` on batches of parts, as JSON) and the plain loop's worker (``make_all``).

    The VAE never waits for the rest: a thread reads and decodes the next part while the VAE encodes the
    current one, and another writes the previous one (PIL's decoders, pyarrow's writer and torch's kernels
    release the GIL), so a part costs about the longer of its encode and its decode + write."""

    def __init__(self, payload: dict, actor: bool = True):
        self.torch_thread = TorchThread("import-encode") if actor else None  # see TorchThread
        if self.torch_thread is not None:
            self.torch_thread.run(self._load, payload, actor)
        else:
            self._load(payload, actor)

    def _load(self, payload: dict, actor: bool) -> None:
        from hgdpo.infra.quiet import quiet_libraries
        from hgdpo.models.sampling import resolve_device_dtype, set_threads

        self.cfg = cfg = from_dict(ImportConfig, payload["config"])
        quiet_libraries()
        if actor:
            set_threads(cfg.encoder_cpus)
        device, dtype = resolve_device_dtype(cfg.dtype)
        self.vae = load_vae(cfg, dtype, device)
        self.files, self.output = payload["files"], payload["output"]
        self.latent_shape = tuple(payload["latent_shape"])
        self.width, self.height = payload["width"], payload["height"]
        self.seconds = {"read": 0.0, "decode": 0.0, "encode": 0.0, "write": 0.0}

    def load(self, chunk: dict) -> tuple[list[dict], np.ndarray]:
        """The pairs of ``chunk`` (``Plan.chunk``) and their images as (2m, H, W, 3) uint8: w, l, w, l, ..."""
        t0 = time.perf_counter()
        if self.cfg.resolved_format() == "pickapic":
            pairs = _fetch_pickapic(self.cfg, self.files, chunk)
        else:
            pairs = _fetch_hpd(self.cfg, self.files[0], chunk)
        t1 = time.perf_counter()
        pixels = np.stack([decode_image(p[side], p["where"], p["row"], self.width, self.height)
                           for p in pairs for side in ("w", "l")])
        self.seconds["read"] += t1 - t0
        self.seconds["decode"] += time.perf_counter() - t1
        return pairs, pixels

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(2m, H, W, 3) images -> (m, 2, C, h, w) float16 latents."""
        t0 = time.perf_counter()
        latents = encode(self.vae, pixels, self.cfg.encode_batch)
        self.seconds["encode"] += time.perf_counter() - t0
        return latents.reshape(len(pixels) // 2, 2, *self.latent_shape[1:])

    def write(self, pairs: list[dict], latents: np.ndarray) -> dict:
        """Write one part; returns its manifest entry (``name``, ``rows``, ``bytes``, ``sha256``)."""
        t0 = time.perf_counter()
        name, entry = pool.write_part_file(self.output, part_table(pairs, latents, self.latent_shape))
        self.seconds["write"] += time.perf_counter() - t0
        return {"name": name, **entry}

    def make_all(self, chunks: list[dict]) -> Iterator[dict]:
        """Write the parts of ``chunks``, in order, yielding each part's manifest entry once it is written."""
        from concurrent.futures import ThreadPoolExecutor

        if not chunks:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="import-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="import-write") as writer:
            loading = reader.submit(self.load, chunks[0])
            writing = None
            for k in range(len(chunks)):
                pairs, pixels = loading.result()
                if k + 1 < len(chunks):
                    loading = reader.submit(self.load, chunks[k + 1])
                latents = self.encode(pixels)
                if writing is not None:
                    yield writing.result()
                writing = writer.submit(self.write, pairs, latents)
            yield writing.result()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunks = [json.loads(str(chunk)) for chunk in batch["chunk"]]
        if self.torch_thread is None:
            entries = list(self.make_all(chunks))
        else:
            entries = self.torch_thread.run(lambda: list(self.make_all(chunks)))
        return {key: np.asarray([e[key] for e in entries]) for key in ("name", "rows", "bytes", "sha256")}


def part_table(pairs: list[dict], latents: np.ndarray, latent_shape: tuple[int, ...]) -> pa.Table:
    """The pool rows of ``pairs`` (winner first), with the source's columns after the pool's."""
    def raw(data):
        return data.get("bytes") if isinstance(data, dict) else data

    m = len(pairs)
    rows = {"prompt_id": [p["id"] for p in pairs], "prompt_index": [p["index"] for p in pairs],
            "prompt": [p["caption"] for p in pairs], "seeds": [[0, 0]] * m, "scores": [[1.0, 0.0]] * m,
            "rank": [[0, 1]] * m, "winner": [0] * m, "loser": [1] * m, "latent_index": [[0, 1]] * m,
            "latents": latents, "image_w": [raw(p["w"]) for p in pairs], "image_l": [raw(p["l"]) for p in pairs]}
    table = pool.to_table(rows, latent_shape)
    extra = {"source_row": [p["row"] for p in pairs], "source_id": [p["id"] for p in pairs],
             "model_w": [p["model_w"] for p in pairs], "model_l": [p["model_l"] for p in pairs]}
    for f in EXTRA_COLUMNS:
        table = table.append_column(f, pa.array(extra[f.name], type=f.type))
    return table


# ---------------------------------------------------------------------------------------------
# The import job


@dataclass
class ImportResult:
    output: str
    total: int
    built: int  # pairs encoded by this run
    seconds: float
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def pairs_per_second(self) -> float:
        return self.built / self.seconds if self.seconds else 0.0


def _size(location: str) -> int | None:
    fs, inner = storage.resolve(location)
    return fs.get_file_info(inner).size


def latent_size(cfg: ImportConfig, source: models.ModelSource) -> tuple[list[int], int, int]:
    """(2, C, h, w) of a pair's latents and the image width and height, from the model's configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    base = source.location if source.kind != "file" else (cfg.model_config or models.SD15_HUB_CONFIG)
    try:
        unet = UNet2DConditionModel.load_config(base, subfolder="unet")
        vae = AutoencoderKL.load_config(base, subfolder="vae")
    except Exception as err:  # diffusers raises several types for a missing or unreadable config
        raise HgdpoError(f"model: cannot read the UNet/VAE configs of {base}: {str(err)[:120]}") from None
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    width, height = cfg.width or unet["sample_size"] * factor, cfg.height or unet["sample_size"] * factor
    if width % factor or height % factor:
        raise HgdpoError(f"import.width/height: {width}x{height} must be multiples of the VAE factor {factor}")
    return [2, unet["in_channels"], height // factor, width // factor], width, height


def prepare(cfg: ImportConfig, log=print) -> tuple[Plan, dict, list[str]]:
    """Every check before work: output, source (every row), model; returns the plan, the pool metadata
    and the source files."""
    storage.check_writable(cfg.output, "import.output")
    source = models.check_model(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle)
    files = source_files(cfg)
    planned = plan(cfg, log)
    latent_shape, width, height = latent_size(cfg, source)
    digest = hashlib.sha256(json.dumps([(storage.name(f), _size(f)) for f in files]).encode()).hexdigest()[:16]
    settings = dict(cfg.data_settings(), source=storage.name(cfg.source), images=None)
    fingerprint = dict(settings, source_digest=digest, model_fingerprint=models.fingerprint(source), width=width,
                       height=height, images_per_prompt=2, loser_rank=2, keep="all", rows_per_file=cfg.rows_per_file)
    meta = {
        "format": pool.FORMAT,
        "config": dict(to_dict(cfg), keep="all", images_per_prompt=2, loser_rank=2),
        "fingerprint": fingerprint,
        "versions": tracking.versions(),
        "num_prompts": len(planned),
        "images_per_prompt": 2,
        "latent_shape": latent_shape,
        "width": width,
        "height": height,
        "base_model": {"name": cfg.model, "fingerprint": fingerprint["model_fingerprint"]},
        "source": {"format": cfg.resolved_format(), "location": storage.absolute(cfg.source), "files": len(files),
                   "rows_read": planned.read, "pairs": len(planned), "dropped": planned.dropped},
    }
    return planned, meta, files


OUR_ERROR = re.compile(r"hgdpo\.errors\.(?:HgdpoError|ConfigError): (.+)")


def _our_error(err: BaseException) -> HgdpoError | None:
    """The ``HgdpoError`` a Ray actor raised, from the exception Ray Data hands back: its chain of causes, or,
    where Ray kept only the remote traceback's text (a failed map UDF), its last line."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, HgdpoError):
            return err
        found = OUR_ERROR.findall(str(err))
        if found:
            return HgdpoError(found[-1].strip())
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def _ray_parts(cfg: ImportConfig, chunks: list[dict], payload: dict) -> Iterator[dict]:
    import ray

    from hgdpo.infra.raycluster import ensure_ray

    ensure_ray()
    # A call makes up to PARTS_PER_CALL parts (its reading and writing overlap its encoding), fewer when there is
    # not enough work for every actor; a lost actor redoes at most those parts (rewritten whole, the same bytes).
    per_call = max(1, min(PARTS_PER_CALL, math.ceil(len(chunks) / cfg.encoder_actors)))
    ds = ray.data.from_items([{"chunk": json.dumps(c)} for c in chunks],
                             override_num_blocks=math.ceil(len(chunks) / per_call))
    ds = ds.map_batches(EncodeParts, fn_constructor_kwargs={"payload": payload}, batch_size=per_call,
                        compute=ray.data.ActorPoolStrategy(size=min(cfg.encoder_actors, len(chunks))),
                        num_gpus=cfg.encoder_gpus, num_cpus=cfg.encoder_cpus, batch_format="numpy")
    try:
        yield from ds.iter_rows()
    except Exception as err:  # an error of ours inside an actor comes back wrapped by Ray
        ours = _our_error(err)
        if ours is None:
            raise
        raise HgdpoError(str(ours)) from None


def _indexes(output: str, parts: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The pool indexes of each part that can be read (its ``prompt_index`` column alone), and why the others
    cannot."""
    found: dict[str, np.ndarray] = {}
    unreadable: dict[str, str] = {}
    for name in parts:
        try:
            found[name] = storage.read_parquet(storage.join(output, name), columns=["prompt_index"]) \
                .column("prompt_index").to_numpy()
        except (OSError, ValueError, pa.ArrowException) as err:
            unreadable[name] = f"cannot be read ({str(err).strip().splitlines()[0] if str(err).strip() else err})"
    return found, unreadable


def _covered(output: str, found: dict[str, np.ndarray], total: int) -> np.ndarray:
    """Which of the ``total`` pairs have a row; refuses a pair in two parts, or an index beyond the plan."""
    done = np.zeros(total, bool)
    for name, indexes in found.items():
        if len(indexes) and (indexes.max() >= total or done[indexes].any()):
            raise HgdpoError(f"{output}/{name}: holds pairs of another part or of no pair of this import; the pool is "
                             f"corrupt: delete {output} and import again")
        done[indexes] = True
    return done


def import_pairs(cfg: ImportConfig, log=print, local: bool = False) -> ImportResult:
    """Import (or finish, or repair) the preference set ``cfg`` describes as a pool of pairs. ``local``: in
    this process, without Ray."""
    planned, meta, files = prepare(cfg, log)
    output = storage.absolute(cfg.output)
    st = pool.state(output)
    if st.meta is not None:
        old, new = st.meta.get("fingerprint", {}), meta["fingerprint"]
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diff or "source" not in st.meta:
            detail = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff[:4]) or "not an import"
            raise HgdpoError(f"import.output: {output} holds a pool written with another config ({detail}); choose "
                             f"another output or rerun with that config")
    bad: dict[str, str] = {}
    if st.complete is not None:
        bad = pool.bad_parts(output, st)
        if not bad:
            log(f"import: {output} is already complete ({st.complete['rows']} pairs); nothing to do")
            return ImportResult(output, len(planned), 0, 0.0, skipped=True)
        pool.unmark_complete(output)  # first: the pool never looks complete without its bad parts
    storage.probe_write(output, "import.output")
    if st.meta is None:
        pool.init(output, meta)
    elif pool.remove_temporaries(output):
        log("import: removed half-written files left by an interrupted run")
    found, unreadable = _indexes(output, [n for n in st.parts if n not in bad])
    for name, why in {**bad, **unreadable}.items():
        log(f"import: part {name} {why}: deleted, its pairs are encoded again")
        storage.delete(storage.join(output, name))
    done = _covered(output, found, len(planned))
    files_entries = {n: e for n, e in (st.complete or {}).get("files", {}).items() if n in found}
    chunks = [planned.chunk(i, min(i + cfg.rows_per_file, len(planned)))
              for i in range(0, len(planned), cfg.rows_per_file)]
    pending = [c for c in chunks if not done[c["index"]: c["index"] + len(c["row"])].all()]
    todo = sum(len(c["row"]) for c in pending)
    log(f"import: {len(planned)} pairs in {len(chunks)} parts, {len(chunks) - len(pending)} parts already "
        f"written, {len(pending)} to encode -> {output}")
    payload = {"config": dict(to_dict(cfg), output=output), "files": files, "output": output,
               "latent_shape": meta["latent_shape"], "width": meta["width"], "height": meta["height"]}
    result = ImportResult(output, len(planned), 0, 0.0)
    maker = EncodeParts(payload, actor=False) if local and pending else None
    start = shown = time.perf_counter()  # the local VAE is loaded before, a Ray actor's VAE after: as it is seen
    if pending:
        if local:
            entries = maker.make_all(pending)
        else:
            entries = _ray_parts(cfg, pending, payload)
        for entry in entries:
            files_entries[str(entry["name"])] = {"rows": int(entry["rows"]), "bytes": int(entry["bytes"]),
                                                 "sha256": str(entry["sha256"])}
            result.built += int(entry["rows"])
            now = time.perf_counter()
            if now - shown > 5 or result.built == todo:
                shown = now
                log(f"import: {result.built}/{todo} pairs encoded, {result.built / (now - start):.1f} pairs/s")
        if local:
            result.timings = dict(maker.seconds)
    result.seconds = time.perf_counter() - start
    st = pool.state(output)
    found, unreadable = _indexes(output, st.parts)
    done = _covered(output, found, len(planned))
    if unreadable or not done.all():
        raise HgdpoError(f"import: {int((~done).sum())} pairs have no row after the run (first: pair "
                         f"{int(np.argmin(done))}); rerun to finish")
    pool.mark_complete(output, st.parts, len(planned), files_entries)
    log(f"import: complete, {len(planned)} pairs in {len(st.parts)} parts at {output}")
    return result


# ---------------------------------------------------------------------------------------------
# Export


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
    import pyarrow.parquet as pq

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

