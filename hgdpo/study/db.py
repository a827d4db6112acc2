"""A study's database: the schema and every query, on SQLite (WAL) or PostgreSQL alike.

SQLAlchemy Core builds every statement, so values always travel as bound parameters (no SQL is
made from text). The rules that matter are constraints the database enforces itself:

* one vote per rater per item: ``UNIQUE (rater_id, item_id)`` on ``votes``;
* a vote only for an item assigned to that rater: the vote is an ``INSERT ... SELECT`` from the
  rater's row in ``assignments`` (no row, nothing inserted), and a foreign key to it;
* tokens are stored as SHA-256 digests: a token is 32 random bytes from ``secrets``, so a fast
  hash is enough (nothing to brute-force), and a copy of the database opens no study.

SQLite runs in WAL mode with a busy timeout, so readers never block the writer and concurrent
voters queue for the write lock instead of failing.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from hgdpo.errors import HgdpoError

metadata = sa.MetaData()

studies = sa.Table(
    "studies", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # evaluation | pool
    sa.Column("source", sa.Text, nullable=False),  # absolute location of the evaluation or pool
    sa.Column("question", sa.Text, nullable=False),
    sa.Column("scorer", sa.String(64), nullable=False),  # whose scores are the AI feedback
    sa.Column("config", sa.Text, nullable=False),  # the creating settings, JSON
    sa.Column("admin_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("secret", sa.String(64), nullable=False),  # keys the CSRF tokens
    sa.Column("created", sa.Float, nullable=False),
)
images = sa.Table(
    "images", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_id", sa.String(64), sa.ForeignKey("studies.id"), nullable=False, index=True),
    sa.Column("png", sa.LargeBinary, nullable=False),
)
items = sa.Table(
    "items", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_id", sa.String(64), sa.ForeignKey("studies.id"), nullable=False, index=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("gold", sa.Boolean, nullable=False),  # an attention check: A is right
    sa.Column("prompt_id", sa.Text, nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=True),
    sa.Column("image_a", sa.Integer, sa.ForeignKey("images.id"), nullable=False),
    sa.Column("image_b", sa.Integer, sa.ForeignKey("images.id"), nullable=False),
    sa.Column("ai_a", sa.Float, nullable=True),  # the AI feedback's scores (none for gold items)
    sa.Column("ai_b", sa.Float, nullable=True),
    sa.UniqueConstraint("study_id", "position"),
)
raters = sa.Table(
    "raters", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_id", sa.String(64), sa.ForeignKey("studies.id"), nullable=False, index=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.UniqueConstraint("study_id", "name"),
)
assignments = sa.Table(
    "assignments", metadata,
    sa.Column("rater_id", sa.Integer, sa.ForeignKey("raters.id"), primary_key=True),
    sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id"), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),  # the order the rater sees items in
    sa.Column("flip", sa.Boolean, nullable=False),  # True: B is shown on the left
    sa.UniqueConstraint("rater_id", "position"),
)
votes = sa.Table(
    "votes", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rater_id", sa.Integer, nullable=False),
    sa.Column("item_id", sa.Integer, nullable=False),
    sa.Column("choice", sa.String(8), nullable=False),  # what was clicked: left | right | tie
    sa.Column("answer", sa.String(8), nullable=False),  # what it means: a | b | tie
    sa.Column("created", sa.Float, nullable=False),
    sa.UniqueConstraint("rater_id", "item_id", name="one_vote_per_rater_and_item"),
    sa.ForeignKeyConstraint(["rater_id", "item_id"], ["assignments.rater_id", "assignments.item_id"]),
)

CHOICES = ("left", "right", "tie")


def engine_url(db: str) -> str:
    """The SQLAlchemy URL of a ``db`` setting: a path or ``sqlite:///`` for SQLite, ``postgresql://``."""
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser().resolve()}"
    parts = urlsplit(db)
    scheme = parts.scheme.lower()
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        if parts.password is not None:
            raise HgdpoError("db: a password inside the database URL is refused (it would show in process lists "
                             "and logs); give it in $PGPASSWORD or ~/.pgpass instead")
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    if scheme == "sqlite":
        return db
    raise HgdpoError(f"db: {scheme}:// is not a supported database (a SQLite file path, sqlite:///path, "
                     f"or postgresql://user@host:port/name)")


def connect(db: str, *, create: bool = False) -> sa.Engine:
    """An engine for ``db``; with ``create``, the tables are made if missing. Without it, a database
    with no study tables is refused (a mistyped path would otherwise become an empty study)."""
    url = engine_url(db)
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if not create and not Path(path).is_file():
            raise HgdpoError(f"db: {path}: no such study database (create a study first)")
        engine = sa.create_engine(url, pool_size=10, max_overflow=30, connect_args={"timeout": 30,
                                                                                   "check_same_thread": False})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = sa.create_engine(url, pool_size=10, max_overflow=30, pool_pre_ping=True)
    try:
        if create:
            metadata.create_all(engine)
        elif not sa.inspect(engine).has_table("votes"):
            raise HgdpoError(f"db: {db} holds no study tables (create a study first)")
    except sa.exc.OperationalError as err:
        raise HgdpoError(f"db: cannot open {db}: {str(err.orig).strip().splitlines()[0]}") from None
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # safe in WAL mode: a power loss may lose the last commits only
    cursor.close()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Rater:
    id: int
    study_id: str
    name: str
    secret: str  # the study's, for the CSRF token


def rater_by_token(engine: sa.Engine, token: str) -> Rater | None:
    """The rater holding ``token``, or None (unknown or revoked)."""
    query = (sa.select(raters.c.id, raters.c.study_id, raters.c.name, studies.c.secret)
             .join(studies, studies.c.id == raters.c.study_id)
             .where(raters.c.token_hash == token_hash(token), raters.c.revoked == sa.false()))
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return Rater(*row) if row else None


def study_by_admin_token(engine: sa.Engine, token: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.select(studies.c.id).where(studies.c.admin_hash == token_hash(token))).scalar()


def study(engine: sa.Engine, study_id: str) -> dict:
    with engine.connect() as conn:
        row = conn.execute(sa.select(studies).where(studies.c.id == study_id)).mappings().first()
    if row is None:
        raise HgdpoError(f"study: no study {study_id!r} in this database")
    return dict(row)


def state(engine: sa.Engine, rater_id: int) -> dict:
    """Where a rater is, on one connection: the next item (id, prompt; None when done), answered, total."""
    answered = sa.select(votes.c.item_id).where(votes.c.rater_id == rater_id)
    upcoming = (sa.select(items.c.id, items.c.prompt)
                .join(assignments, assignments.c.item_id == items.c.id)
                .where(assignments.c.rater_id == rater_id, items.c.id.not_in(answered))
                .order_by(assignments.c.position).limit(1))
    count_done = sa.select(sa.func.count()).select_from(votes).where(votes.c.rater_id == rater_id).scalar_subquery()
    count_all = (sa.select(sa.func.count()).select_from(assignments).where(assignments.c.rater_id == rater_id)
                 .scalar_subquery())
    with engine.connect() as conn:
        row = conn.execute(upcoming).mappings().first()
        done, total = conn.execute(sa.select(count_done, count_all)).one()
    return {"item": dict(row) if row else None, "answered": int(done), "total": int(total)}


def question(engine: sa.Engine, study_id: str) -> str:
    with engine.connect() as conn:
        return conn.execute(sa.select(studies.c.question).where(studies.c.id == study_id)).scalar_one()


def image_for(engine: sa.Engine, rater_id: int, item_id: int, side: str) -> bytes | None:
    """The PNG shown on ``side`` (left/right) of an item assigned to the rater, else None."""
    left = side == "left"
    image = sa.case((assignments.c.flip == sa.true(), items.c.image_b if left else items.c.image_a),  # B on the left
                    else_=items.c.image_a if left else items.c.image_b)
    query = (sa.select(images.c.png)
             .select_from(assignments.join(items, items.c.id == assignments.c.item_id))
             .join(images, images.c.id == image)
             .where(assignments.c.rater_id == rater_id, assignments.c.item_id == item_id))
    with engine.connect() as conn:
        return conn.execute(query).scalar()


class Refused(Exception):
    """A vote the database refused: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def vote(engine: sa.Engine, rater_id: int, item_id: int, choice: str) -> None:
    """Store one vote, atomically: only for an item assigned to the rater, only once."""
    if choice not in CHOICES:
        raise Refused(422, f"choice: must be one of {', '.join(CHOICES)}")
    a = assignments
    left_is_a = a.c.flip == sa.false()
    answer = {"tie": sa.literal("tie"),
              "left": sa.case((left_is_a, "a"), else_="b"),
              "right": sa.case((left_is_a, "b"), else_="a")}[choice]
    source = sa.select(a.c.rater_id, a.c.item_id, sa.literal(choice), answer, sa.literal(time.time())).where(
        a.c.rater_id == rater_id, a.c.item_id == item_id)
    statement = (votes.insert().from_select(["rater_id", "item_id", "choice", "answer", "created"], source)
                 .returning(votes.c.id))  # rows returned, not rowcount: psycopg reports -1 for INSERT ... SELECT
    try:
        with _writer(engine), engine.begin() as conn:
            inserted = len(conn.execute(statement).all())
    except IntegrityError:
        raise Refused(409, f"item {item_id}: already answered") from None
    if inserted != 1:
        raise Refused(403, f"item {item_id}: not one of your items")


_SQLITE_WRITERS: dict[str, threading.Lock] = {}


def _writer(engine: sa.Engine):
    """SQLite has one writer at a time: the threads of one server take turns on a lock instead of
    polling the file lock (its busy handler sleeps up to 100 ms between tries, however soon the lock
    is free). Other processes still wait on the busy timeout. PostgreSQL needs no lock."""
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    return _SQLITE_WRITERS.setdefault(str(engine.url), threading.Lock())


def revoke(engine: sa.Engine, study_id: str, name: str) -> None:
    with engine.begin() as conn:
        changed = conn.execute(raters.update().where(raters.c.study_id == study_id, raters.c.name == name)
                               .values(revoked=True)).rowcount
    if changed != 1:
        raise HgdpoError(f"revoke: study {study_id!r} has no rater {name!r}")


def rater_progress(engine: sa.Engine, study_id: str) -> list[dict]:
    """Per rater: name, revoked, assigned, answered, gold answered and gold right."""
    assigned = (sa.select(assignments.c.rater_id, sa.func.count().label("assigned"))
                .group_by(assignments.c.rater_id).subquery())
    answered = (sa.select(votes.c.rater_id, sa.func.count().label("answered"),
                          sa.func.sum(sa.case((items.c.gold == sa.true(), 1), else_=0)).label("gold_answered"),
                          sa.func.sum(sa.case(((items.c.gold == sa.true()) & (votes.c.answer == "a"), 1),
                                              else_=0)).label("gold_right"))
                .join(items, items.c.id == votes.c.item_id).group_by(votes.c.rater_id).subquery())
    query = (sa.select(raters.c.id, raters.c.name, raters.c.revoked,
                       sa.func.coalesce(assigned.c.assigned, 0).label("assigned"),
                       sa.func.coalesce(answered.c.answered, 0).label("answered"),
                       sa.func.coalesce(answered.c.gold_answered, 0).label("gold_answered"),
                       sa.func.coalesce(answered.c.gold_right, 0).label("gold_right"))
             .outerjoin(assigned, assigned.c.rater_id == raters.c.id)
             .outerjoin(answered, answered.c.rater_id == raters.c.id)
             .where(raters.c.study_id == study_id).order_by(raters.c.id))
    with engine.connect() as conn:
        return [{k: (int(v) if k not in ("name", "revoked") else v) for k, v in row.items()}
                for row in conn.execute(query).mappings()]


def votes_table(engine: sa.Engine, study_id: str, *, with_images: bool = False) -> list[dict]:
    """Every vote of the study with its item and rater (and the A and B images' PNG bytes if asked)."""
    columns = [votes.c.id.label("vote_id"), raters.c.name.label("rater"), items.c.id.label("item_id"),
               items.c.position, items.c.gold, items.c.prompt_id, items.c.prompt, items.c.seed,
               items.c.ai_a, items.c.ai_b, assignments.c.flip, votes.c.choice, votes.c.answer, votes.c.created]
    query = sa.select(*columns).select_from(
        votes.join(assignments, (assignments.c.rater_id == votes.c.rater_id)
                   & (assignments.c.item_id == votes.c.item_id))
        .join(items, items.c.id == votes.c.item_id).join(raters, raters.c.id == votes.c.rater_id))
    if with_images:
        img_a, img_b = images.alias("img_a"), images.alias("img_b")
        query = (query.add_columns(img_a.c.png.label("image_a"), img_b.c.png.label("image_b"))
                 .join(img_a, img_a.c.id == items.c.image_a).join(img_b, img_b.c.id == items.c.image_b))
    query = query.where(items.c.study_id == study_id).order_by(votes.c.id)
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def counts(engine: sa.Engine, study_id: str) -> dict[str, int]:
    """Items (pairs and gold), raters and votes of a study."""
    with engine.connect() as conn:
        def count(query):
            return int(conn.execute(query).scalar())
        return {
            "pairs": count(sa.select(sa.func.count()).select_from(items)
                           .where(items.c.study_id == study_id, items.c.gold == sa.false())),
            "gold": count(sa.select(sa.func.count()).select_from(items)
                          .where(items.c.study_id == study_id, items.c.gold == sa.true())),
            "raters": count(sa.select(sa.func.count()).select_from(raters).where(raters.c.study_id == study_id)),
            "votes": count(sa.select(sa.func.count()).select_from(votes)
                           .join(items, items.c.id == votes.c.item_id).where(items.c.study_id == study_id)),
        }
