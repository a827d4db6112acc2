"""Reading prompt files: .txt, .jsonl, .csv, .tsv (PartiPrompts) and .parquet.

Every prompt gets a stable id: the user's own (an ``id`` / ``prompt_id`` column or field, or the
one named by ``id_column``), or one derived from its text and its position in the file, so a
rerun and every later stage refer to the same prompt by the same id.

Bad files are refused with the file and line named: not UTF-8, empty or only blank lines,
a malformed JSON line, a missing column, duplicate ids.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from hgdpo.errors import HgdpoError

TEXT_COLUMNS = ("prompt", "Prompt", "caption", "text")
ID_COLUMNS = ("id", "prompt_id")
CATEGORY_COLUMNS = ("Category", "category")


def stable_hash(text: str) -> int:
    """A process-independent 64-bit hash of a string (unlike ``hash``): the seed of everything drawn per prompt."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")



@dataclass(frozen=True)
class Prompt:
    index: int  # position among the prompts used (after filtering), 0-based
    id: str
    text: str


def derived_id(text: str, position: int) -> str:
    """A stable id for a prompt that has none: from its text and its position in the file."""
    return "p" + hashlib.sha1(f"{position}\x00{text}".encode()).hexdigest()[:15]


def _pick(columns, wanted: str | None, defaults: tuple[str, ...], what: str, path: Path) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise HgdpoError(f"{path}: no column {wanted!r} for the {what} (columns: {', '.join(map(str, columns))})")
        return wanted
    return next((c for c in defaults if c in columns), None)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise HgdpoError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         f"re-encode the file as UTF-8") from None
    return text


def _records(path: Path, fmt: str) -> tuple[list[dict], list[int]]:
    """Rows of the file as dicts, with the 1-based line number of each (for error messages)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:
            raise HgdpoError(f"{path}: not a readable parquet file: {err}") from None
        rows = table.to_pylist()
        return rows, list(range(1, len(rows) + 1))
    text = _decode(path)
    if fmt == "txt":
        rows, lines = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append({"prompt": line.strip()})
                lines.append(n)
        return rows, lines
    if fmt == "jsonl":
        rows, lines = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise HgdpoError(f"{path}:{n}: not valid JSON: {err.msg}") from None
            if isinstance(obj, str):
                obj = {"prompt": obj}
            if not isinstance(obj, dict):
                raise HgdpoError(f"{path}:{n}: expected a JSON object or string")
            rows.append(obj)
            lines.append(n)
        return rows, lines
    delimiter = "\t" if fmt == "tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows, lines = [], []
    for row in reader:
        if any((v or "").strip() for v in row.values() if isinstance(v, str)):
            rows.append(row)
            lines.append(reader.line_num)
    if reader.fieldnames is None:
        return [], []
    return rows, lines


def read_prompts(path: str | Path, *, fmt: str = "auto", prompt_column: str | None = None,
                 id_column: str | None = None, category: str | None = None,
                 max_prompts: int | None = None) -> list[Prompt]:
    """Read a prompt file; return its prompts with stable ids, in file order."""
    path = Path(path)
    if not path.is_file():
        raise HgdpoError(f"prompts: {path} does not exist")
    if fmt == "auto":
        fmt = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
               ".parquet": "parquet"}.get(path.suffix.lower(), "")
        if not fmt:
            raise HgdpoError(f"prompts: cannot tell the format of {path} from its suffix; set prompt_format")
    rows, lines = _records(path, fmt)
    if not rows:
        raise HgdpoError(f"{path}: no prompts (the file is empty or holds only blank lines)")
    columns = list(dict.fromkeys(k for r in rows[:100] for k in r))
    text_col = _pick(columns, prompt_column, TEXT_COLUMNS, "prompt text", path)
    if text_col is None:
        raise HgdpoError(f"{path}: no prompt column (looked for {', '.join(TEXT_COLUMNS)}; set prompt_column)")
    id_col = _pick(columns, id_column, ID_COLUMNS, "prompt id", path)
    if category is not None:
        cat_col = _pick(columns, None, CATEGORY_COLUMNS, "category", path)
        if cat_col is None:
            raise HgdpoError(f"{path}: category={category!r} given but the file has no Category column")
        kept = [(r, n) for r, n in zip(rows, lines) if (r.get(cat_col) or "").strip() == category]
        if not kept:
            found = sorted({(r.get(cat_col) or "").strip() for r in rows})
            raise HgdpoError(f"{path}: no prompt has category {category!r} (categories: {', '.join(found[:20])})")
        rows, lines = [r for r, _ in kept], [n for _, n in kept]
    if max_prompts is not None:
        rows, lines = rows[:max_prompts], lines[:max_prompts]

    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for position, (row, line) in enumerate(zip(rows, lines)):
        text = row.get(text_col)
        if not isinstance(text, str) or not text.strip():
            raise HgdpoError(f"{path}:{line}: empty prompt in column {text_col!r}")
        text = " ".join(text.split())
        if id_col is not None and row.get(id_col) not in (None, ""):
            pid = str(row[id_col]).strip()
        else:
            pid = derived_id(text, position)
        if pid in seen:
            raise HgdpoError(f"{path}:{line}: duplicate prompt id {pid!r} (first at line {seen[pid]})")
        seen[pid] = line
        prompts.append(Prompt(position, pid, text))
    return prompts


def digest(prompts: list[Prompt]) -> str:
    """Identity of a prompt list (ids and texts, in order): part of a pool's fingerprint."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(f"{p.id}\x00{p.text}\x01".encode())
    return h.hexdigest()[:16]


def overlong(prompts: list[Prompt], tokenizer, max_tokens: int = 77) -> list[tuple[Prompt, int]]:
    """Prompts whose token count (with BOS/EOS) exceeds the text encoder's window."""
    out = []
    for i in range(0, len(prompts), 512):
        chunk = prompts[i: i + 512]
        ids = tokenizer([p.text for p in chunk], truncation=False).input_ids
        out += [(p, len(t)) for p, t in zip(chunk, ids) if len(t) > max_tokens]
    return out
