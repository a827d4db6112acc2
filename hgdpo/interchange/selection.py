"""The import's first pass: which source rows become which pairs, from the small columns alone.

Labels must be 0, 0.5 or 1 and sum to 1 (``winner_of``); anything else is refused naming the file and the
row. Ties, unlabelled rows, identical images, ``exclude_rows`` and the rows beyond ``max_pairs`` are
dropped and counted. The kept pairs are numbered without gaps before any image is read: that is what makes
a part's prompts, and so resume, independent of what the encoders meet. The pass keeps 48 bytes per kept
pair (its position, side and an id digest, ``Plan``) and refuses repeated ids.

**The (H) subset** (``subset: people``): a pair is kept when its caption has one of
``people_keywords`` as a whole word (case-insensitive; plural ``s``/``es`` and possessive ``'s`` match
too). A keyword list is the default and the only rule: it is decided on the caption alone, before
any image is read, so the rows are numbered in the first pass; it costs nothing and is the same on
every machine. A CLIP zero-shot classifier would have to read and score every image before the pool's
rows could be numbered (a caption that names no person is missed: widen the list for such a set).
"""

from __future__ import annotations

import hashlib
import re
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np

from hgdpo.errors import HgdpoError
from hgdpo.interchange.config import ImportConfig
from hgdpo.interchange.sources import hpd_records, pickapic_records, source_files


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



def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def plan(cfg: ImportConfig, log=print) -> Plan:
    """The first pass over the source: every row checked, the kept ones numbered (0, 1, ...) in source
    order. Holds a few numbers per kept pair (and an 8-byte digest of its id, to refuse repeated ids)."""
    fmt = cfg.resolved_format()
    files = source_files(cfg)
    records = pickapic_records(cfg, files) if fmt == "pickapic" else hpd_records(cfg, files[0])
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

