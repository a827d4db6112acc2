"""Making a study: its pairs from an evaluation or a pool, gold items, raters and their assignments.

* From an evaluation's output (``scores.parquet``, one row per prompt and seed): A is the
  evaluated model, B the baseline; the AI feedback is one scorer's scores of both (Fig. 3).
* From a pool (one row per prompt): A is the winner, B the loser; the AI feedback is the scorer
  that ranked it (PickScore by default), which picked them (Fig. 5a: do people agree with it?).
* Gold items, the attention checks, with a right answer (A) under the question asked (``gold``):
  every rater gets all of them, mixed among their pairs. Items are stored in a shuffled order, so
  their ids (which the page and the API show) do not tell gold items from pairs.
* Each rater judges ``items_per_rater`` pairs, spread so every pair gets as many raters as it can,
  in a shuffled order, each with the sides drawn at random (recorded in ``assignments.flip``).
* The invites file holds the tokens: a local one is created with mode 0600 before a byte is written.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa

from hgdpo.config.core import to_dict
from hgdpo.errors import HgdpoError
from hgdpo.infra import storage
from hgdpo.pool import store as pool
from hgdpo.pool.config import pool_scorer
from hgdpo.study import db
from hgdpo.study.config import CreateConfig
from hgdpo.study.gold import gold_pairs


@dataclass(frozen=True)
class Pair:
    prompt_id: str
    prompt: str
    seed: int | None
    png_a: bytes
    png_b: bytes
    ai_a: float
    ai_b: float


@dataclass(frozen=True)
class Invite:
    name: str  # "admin" or the rater's name
    link: str


def source_kind(source: str) -> str:
    if storage.is_parquet(storage.join(source, "scores.parquet")):  # one file, or parts with their manifest
        return "evaluation"
    if storage.exists(storage.join(source, "pool.json")):
        return "pool"
    raise HgdpoError(f"source: {source} is neither an evaluation's output (no scores.parquet) nor a pool "
                     f"(no pool.json)")


def evaluation_pairs(source: str, scorer: str | None) -> tuple[list[Pair], str]:
    """A vs B for every (prompt, seed) row of an evaluation's ``scores.parquet``, and the scorer used."""
    path = storage.join(source, "scores.parquet")
    table = storage.read_parquet(path)
    names = [c.removeprefix("score_a_") for c in table.column_names if c.startswith("score_a_")]
    if scorer is None:
        if not names:
            raise HgdpoError(f"{path}: no score_a_<scorer> column")
        scorer = "judge" if "judge" in names else names[0]
    if scorer not in names:
        raise HgdpoError(f"scorer: {scorer!r} is not in {path} (it has {', '.join(names) or 'no scores'})")
    needed = ["prompt_id", "prompt", "seed", "image_a", "image_b", f"score_a_{scorer}", f"score_b_{scorer}"]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise HgdpoError(f"{path}: column {missing[0]!r} missing (not an evaluation's scores.parquet?)")
    col = {c: table.column(c).to_pylist() for c in needed}
    return [Pair(str(col["prompt_id"][i]), str(col["prompt"][i]), int(col["seed"][i]), col["image_a"][i],
                 col["image_b"][i], float(col[f"score_a_{scorer}"][i]), float(col[f"score_b_{scorer}"][i]))
            for i in range(table.num_rows)], scorer


def pool_pairs(source: str) -> tuple[list[Pair], str]:
    """Winner (A) vs loser (B) of every prompt of a pool, with the scores of the scorer that ranked it."""
    columns = ["prompt_id", "prompt", "seeds", "scores", "winner", "loser", "image_w", "image_l"]
    pairs = []
    for part in pool.read_parts(source, columns=columns):
        rows = part.to_pylist()
        for r in rows:
            w, lo = int(r["winner"]), int(r["loser"])
            pairs.append(Pair(str(r["prompt_id"]), str(r["prompt"]), int(r["seeds"][w]), r["image_w"], r["image_l"],
                              float(r["scores"][w]), float(r["scores"][lo])))
    return pairs, pool_scorer(pool.read_meta(source, "source"))


def choose(pairs: list[Pair], n: int | None, rng: random.Random, source: str) -> list[Pair]:
    if not pairs:
        raise HgdpoError(f"source: {source} holds no pairs")
    if n is None:
        return pairs
    if n > len(pairs):
        raise HgdpoError(f"items: {n} is more than the {len(pairs)} pairs in {source}")
    keep = sorted(rng.sample(range(len(pairs)), n))  # in the source's order
    return [pairs[i] for i in keep]


def default_id(source: str) -> str:
    base = "".join(c if (c.isalnum() and c.isascii()) or c in "-_" else "-" for c in storage.name(source))[:40]
    return f"{base or 'study'}-{secrets.token_hex(3)}"


def create(cfg: CreateConfig) -> tuple[str, list[Invite]]:
    """Make the study in ``cfg.db`` and write its invite links to ``cfg.invites``; returns its id and links."""
    source = storage.absolute(cfg.source)
    kind = source_kind(source) if cfg.kind == "auto" else cfg.kind
    rng = random.Random(cfg.seed)
    if kind == "evaluation":
        pairs, scorer = evaluation_pairs(source, cfg.scorer)
    else:
        pairs, scorer = pool_pairs(source)
        if cfg.scorer not in (None, scorer):
            raise HgdpoError(f"scorer: a pool's AI feedback is the scorer that ranked it ({scorer}); leave scorer "
                             f"unset (got {cfg.scorer!r})")
    pairs = choose(pairs, cfg.items, rng, source)
    gold = gold_pairs(pairs, cfg.gold_items, cfg.question_kind, rng)
    rows = list(enumerate([(p, False) for p in pairs] + [(p, True) for p in gold]))  # position: pairs, then gold
    rng.shuffle(rows)  # ids follow the insertion order: shuffled, an item's id does not say it is gold
    study_id = cfg.study or default_id(source)
    engine = db.connect(cfg.db, create=True)
    admin_token = secrets.token_urlsafe(32)
    try:
        with engine.begin() as conn:
            if conn.execute(sa.select(db.studies.c.id).where(db.studies.c.id == study_id)).first():
                raise HgdpoError(f"study: {study_id!r} already exists in this database; choose another id")
            conn.execute(db.studies.insert().values(
                id=study_id, kind=kind, source=source, question=cfg.question_text(), scorer=scorer,
                config=json.dumps(to_dict(cfg)), admin_hash=db.token_hash(admin_token),
                secret=secrets.token_hex(32), created=time.time()))
            for position, (pair, is_gold) in rows:
                image_a = conn.execute(db.images.insert().values(study_id=study_id, png=pair.png_a)).inserted_primary_key[0]
                image_b = conn.execute(db.images.insert().values(study_id=study_id, png=pair.png_b)).inserted_primary_key[0]
                conn.execute(db.items.insert().values(
                    study_id=study_id, position=position, gold=is_gold, prompt_id=pair.prompt_id, prompt=pair.prompt,
                    seed=pair.seed, image_a=image_a, image_b=image_b,
                    ai_a=None if is_gold else pair.ai_a, ai_b=None if is_gold else pair.ai_b))
            links = _add_raters(conn, study_id, cfg.raters, cfg.items_per_rater, cfg.seed, cfg.base_url)
    finally:
        engine.dispose()
    invites = [Invite("admin", f"{cfg.base_url.rstrip('/')}/a/{admin_token}")] + links
    write_invites(cfg.invites, invites, append=False)
    return study_id, invites


def add_raters(engine: sa.Engine, study_id: str, n: int, seed: int, base_url: str) -> list[Invite]:
    """Invite ``n`` more raters (the items-per-rater setting is the study's)."""
    study = db.study(engine, study_id)
    per_rater = json.loads(study["config"]).get("items_per_rater")
    with engine.begin() as conn:
        return _add_raters(conn, study_id, n, per_rater, seed, base_url)


def _add_raters(conn, study_id: str, n: int, per_rater: int | None, seed: int, base_url: str) -> list[Invite]:
    item_rows = conn.execute(sa.select(db.items.c.id, db.items.c.gold).where(db.items.c.study_id == study_id)
                             .order_by(db.items.c.position)).all()
    pair_ids = [r.id for r in item_rows if not r.gold]
    gold_ids = [r.id for r in item_rows if r.gold]
    k = len(pair_ids) if per_rater is None else min(per_rater, len(pair_ids))
    order = list(pair_ids)
    random.Random(f"{study_id}:{seed}:order").shuffle(order)  # the same spread for raters added later
    existing = conn.execute(sa.select(sa.func.count()).select_from(db.raters)
                            .where(db.raters.c.study_id == study_id)).scalar()
    invites = []
    for index in range(existing, existing + n):
        token = secrets.token_urlsafe(32)
        name = f"rater-{index + 1:03d}"
        rater_id = conn.execute(db.raters.insert().values(study_id=study_id, name=name, token_hash=db.token_hash(token),
                                                          revoked=False, created=time.time())).inserted_primary_key[0]
        rng = random.Random(f"{study_id}:{seed}:{index}")
        mine = [order[(index * k + j) % len(order)] for j in range(k)] + gold_ids  # each pair once per rater
        rng.shuffle(mine)
        conn.execute(db.assignments.insert(), [{"rater_id": rater_id, "item_id": item, "position": p,
                                                "flip": rng.random() < 0.5} for p, item in enumerate(mine)])
        invites.append(Invite(name, f"{base_url.rstrip('/')}/r/{token}"))
    return invites


def write_invites(location: str, invites: list[Invite], *, append: bool) -> None:
    """The links, one per line (``name,link``); a local file has mode 0600 from its creation (the links
    are the tokens)."""
    rows = []
    if append and storage.exists(location):
        rows = list(csv.reader(io.StringIO(storage.read_text(location))))[1:]
    rows += [[i.name, i.link] for i in invites]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["name", "link"])
    writer.writerows(rows)
    if storage.is_local(location):
        write_private(storage.resolve(location)[1], out.getvalue().encode("utf-8"))
    else:
        storage.write_text(location, out.getvalue())  # an object store: access is its bucket's policy


def write_private(path: str, data: bytes) -> None:
    """Write ``path`` atomically and readable by its owner only at every moment: a temporary file beside
    it, created with mode 0600 (``O_CREAT | O_EXCL``: never an existing file or link), then renamed
    onto it. A chmod after writing would leave the tokens world-readable in between."""
    folder, base = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = os.path.join(folder, f"{storage.TMP_PREFIX}{secrets.token_hex(8)}-{base}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
