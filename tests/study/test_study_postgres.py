"""The study's database on PostgreSQL (Debian's server, started here on 127.0.0.1 with its own data
directory) and on SQLite under load: 50 concurrent raters casting 2,000 votes through the HTTP API."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

from hgdpo.study import db
from hgdpo.study.app import Running, make_app
from hgdpo.study.results import summary
from studykit import Rater, read_invites, study_job, synthetic_evaluation, token_of

RATERS = 50
ITEMS = {"sqlite": 40, "postgresql": 8}  # 2,000 votes on the default database; 400 on PostgreSQL
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own (initdb in a fresh folder, trust auth on 127.0.0.1 only), stopped at
    the end. PostgreSQL refuses to run as root: as root, it runs as the `postgres` user Debian's package
    creates. Yields the URL of a database ``study``."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not binaries:
        pytest.fail("PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)")
    bin_dir = os.path.dirname(binaries[-1])
    home = tempfile.mkdtemp(prefix="hgdpo-pg-")
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(home, user="postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(home, "data"), free_port()

    def run(*args):
        subprocess.run(as_user + list(args), check=True, capture_output=True, timeout=120)

    run(f"{bin_dir}/initdb", "-D", data, "-U", "hgdpo", "--auth=trust", "-E", "UTF8", "--no-sync")
    run(f"{bin_dir}/pg_ctl", "-D", data, "-l", os.path.join(home, "log"), "-w", "-o",
        f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")
    try:
        subprocess.run([f"{bin_dir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "hgdpo", "study"],
                       check=True, capture_output=True, timeout=60)
        yield f"postgresql://hgdpo@127.0.0.1:{port}/study"
    finally:
        run(f"{bin_dir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def loaded(request, tmp_path_factory):
    """A study of 40 pairs for 50 raters (every rater all pairs), no gold, on either database."""
    work = tmp_path_factory.mktemp(f"load-{request.param}")
    database = str(work / "load.db") if request.param == "sqlite" else request.getfixturevalue("postgres")
    source = synthetic_evaluation(work / "eval", ITEMS[request.param], prompts=4)
    assert study_job.main(["create", f"db={database}", f"source={source}", "study=load", f"raters={RATERS}",
                           "gold_items=0", f"invites={work / 'invites.csv'}"]) == 0
    engine = db.connect(database)
    yield request.param, database, engine, read_invites(work / "invites.csv")
    engine.dispose()


@contextlib.contextmanager
def served(database: str):
    """`python jobs/study.py serve` in a process of its own (its own interpreter: the raters' threads
    here do not share its GIL), on a free port of 127.0.0.1; stopped at the end."""
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(REPO, "jobs", "study.py"), "serve", f"db={database}",
                               f"port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/api/next", timeout=2).status_code == 401:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the study server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_fifty_concurrent_raters_store_every_vote_exactly_once(loaded):
    kind, database, engine, links = loaded
    votes_each = ITEMS[kind]
    latencies, statuses, lock = [], [], threading.Lock()
    start = threading.Barrier(RATERS)

    def rate(name: str):
        rater = Rater(url, token_of(links[name]))
        state = rater.next()
        start.wait()
        while not state["done"]:
            began = time.perf_counter()
            response = rater.vote(state["item"], ("left", "right", "tie")[state["item"] % 3], state["csrf"])
            with lock:
                latencies.append(time.perf_counter() - began)
                statuses.append(response.status_code)
            if response.status_code != 201:
                return
            state = response.json()
        rater.http.close()

    threads = [threading.Thread(target=rate, args=(f"rater-{i + 1:03d}",)) for i in range(RATERS)]
    with served(database) as url:
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        seconds = time.perf_counter() - began
        replay = Rater(url, token_of(links["rater-001"]))
        first = next(v for v in db.votes_table(engine, "load") if v["rater"] == "rater-001")
        assert replay.vote(first["item_id"], "left", replay.next()["csrf"]).status_code == 409
    latencies.sort()
    p95 = latencies[int(0.95 * len(latencies)) - 1]
    print(f"\n{kind}: {len(statuses)} votes by {RATERS} raters in {seconds:.1f}s "
          f"({len(statuses) / seconds:.0f}/s), p50 {latencies[len(latencies) // 2] * 1e3:.0f} ms, "
          f"p95 {p95 * 1e3:.0f} ms")
    assert statuses == [201] * RATERS * votes_each  # no 5xx, no refusal
    stored = db.votes_table(engine, "load")
    assert len(stored) == RATERS * votes_each
    assert len({(v["rater"], v["item_id"]) for v in stored}) == RATERS * votes_each  # each exactly once
    assert all(v["choice"] == ("left", "right", "tie")[v["item_id"] % 3] for v in stored)  # as sent
    assert all(r["answered"] == votes_each for r in db.rater_progress(engine, "load"))


def test_postgres_enforces_the_same_rules_and_gives_the_same_results(postgres, tmp_path):
    source = synthetic_evaluation(tmp_path / "eval", 6, prompts=3)
    results = {}
    for kind, database in (("sqlite", str(tmp_path / "s.db")), ("postgresql", postgres)):
        assert study_job.main(["create", f"db={database}", f"source={source}", "study=same", "raters=2",
                               "items_per_rater=4", "gold_items=1", "seed=3",
                               f"invites={tmp_path / f'{kind}.csv'}"]) == 0
        engine = db.connect(database)
        server = Running(make_app(engine))
        try:
            links = read_invites(tmp_path / f"{kind}.csv")
            for name in ("rater-001", "rater-002"):
                rater = Rater(server.url, token_of(links[name]))
                state = rater.next()
                while not state["done"]:
                    response = rater.vote(state["item"], "left", state["csrf"])
                    assert response.status_code == 201
                    replayed = rater.vote(state["item"], "right", state["csrf"])
                    assert replayed.status_code == 409  # the UNIQUE constraint of this database
                    state = response.json()
            assert rater.vote(10_000, "left", state["csrf"]).status_code == 403
            assert httpx.get(f"{server.url}/api/next", headers={"authorization": "Bearer nope"}).status_code == 401
        finally:
            server.stop()
        results[kind] = summary(engine, "same", resamples=300)
        assert db.counts(engine, "same")["votes"] == 2 * (4 + 1)
        engine.dispose()
    # the same seed gives the same assignments and sides on both databases, hence the same figures
    for key in ("human", "ai", "ai_agreement", "alpha", "flagged", "votes"):
        assert results["sqlite"][key] == results["postgresql"][key], key
    assert study_job.main(["create", f"db={postgres}", f"source={source}", "study=same",
                           f"invites={tmp_path / 'again.csv'}"]) == 2  # an id is taken once
