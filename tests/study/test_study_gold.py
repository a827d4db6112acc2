"""Gold items of a user study: they test the question asked (a corrupted copy for naturalness, another
prompt's image for prompt fidelity), their ids do not give them away, and results report the raters
they flagged; and the invites file is private from its creation."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import httpx
import krippendorff
import numpy as np
import pyarrow.parquet as pq
import pytest
from studykit import Rater, read_invites, study_job, synthetic_evaluation, token_of

from hgdpo.pool.store import png_bytes, png_image
from hgdpo.study import db
from hgdpo.study.app import Running, make_app
from hgdpo.study.create import Invite, write_invites
from hgdpo.study.gold import corrupted
from hgdpo.study.results import gold_report


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("study-gold")


def test_gold_failures_are_flagged_reported_and_excluded_and_alpha_comes_from_the_votes(work, capsys):
    source = synthetic_evaluation(work / "gold-eval", 6, prompts=3)
    database, invites = work / "gold.db", work / "gold.csv"
    assert study_job.main(["create", f"db={database}", f"source={source}", "study=gold", "raters=3",
                           "gold_items=2", f"invites={invites}"]) == 0
    engine = db.connect(str(database))
    server = Running(make_app(engine))
    links = read_invites(invites)
    try:
        # rater 1 and 2 always choose A (wherever it is shown), rater 3 always B: 3 fails the gold items
        for name, pick in (("rater-001", "a"), ("rater-002", "a"), ("rater-003", "b")):
            rater = Rater(server.url, token_of(links[name]))
            while not (state := rater.next())["done"]:
                flip = engine.connect().execute(
                    db.sa.select(db.assignments.c.flip).join(db.raters, db.raters.c.id == db.assignments.c.rater_id)
                    .where(db.raters.c.name == name, db.assignments.c.item_id == state["item"])).scalar()
                shown_a = "right" if flip else "left"
                choice = shown_a if pick == "a" else ("left" if shown_a == "right" else "right")
                assert rater.vote(state["item"], choice, state["csrf"]).status_code == 201
        with httpx.Client(base_url=server.url, follow_redirects=True) as admin:
            page = admin.get(f"/a/{token_of(links['admin'])}").text
        assert 'id="warning"' in page and "rater-003 (failed gold items" in page
    finally:
        server.stop()
    from hgdpo.study.results import summary

    kept = summary(engine, "gold", resamples=200)
    assert kept["flagged"] == ["rater-003"]
    gold_ids = sorted(r.id for r in engine.connect().execute(
        db.sa.select(db.items.c.id).where(db.items.c.study_id == "gold", db.items.c.gold == db.sa.true())))
    # who was flagged on which gold items, each gold item's failures, the share of votes that removed
    assert kept["flagged_raters"] == [{"rater": "rater-003", "gold_answered": 2, "failed_items": gold_ids}]
    assert [(g["item"], g["answered"], g["wrong"]) for g in kept["gold_items"]] == [(i, 3, 1) for i in gold_ids]
    assert (kept["flagged_votes"], kept["flagged_share"]) == (6, pytest.approx(1 / 3))  # 6 of 18 votes on pairs
    assert kept["warning"].startswith("1 flagged raters cast 33% of the votes on pairs (6 of 18), all left out")
    assert study_job.main(["results", f"db={database}", "study=gold", f"output={work / 'gold-results'}",
                           "bootstrap=50", "mlflow=false"]) == 0
    printed = capsys.readouterr()
    assert "warning: study gold: 1 flagged raters cast 33%" in printed.err and "(33% of the votes" in printed.out
    assert json.loads((work / "gold-results" / "results.json").read_text())["warning"] == kept["warning"]
    assert (kept["human"]["rate"], kept["votes"], kept["raters"]) == (1.0, 12, 2)
    assert kept["alpha"] is None and "same answer" in kept["alpha_note"]  # two raters who always agree
    everyone = summary(engine, "gold", exclude_flagged=False, resamples=200)
    assert (everyone["human"]["rate"], everyone["votes"]) == (pytest.approx(2 / 3), 18)
    matrix = np.array([[0] * 6, [0] * 6, [1] * 6], dtype=float)  # A = 0, B = 1 per rater and item
    assert everyone["alpha"] == pytest.approx(krippendorff.alpha(reliability_data=matrix,
                                                                 level_of_measurement="nominal"))
    assert everyone["alpha"] < 0  # worse than chance: the third rater disagrees on every item
    engine.dispose()


def test_a_flagged_share_of_a_fifth_is_not_warned_about_but_more_is():
    def votes(raters: int, flagged: int) -> list[dict]:  # each rater: 4 votes on pairs, 1 gold item
        return [{"rater": f"r{r}", "item_id": i, "prompt_id": "p", "gold": i == 99,
                 "answer": "b" if (i == 99 and r < flagged) else "a"} for r in range(raters) for i in (1, 2, 3, 4, 99)]

    at_threshold = gold_report(votes(5, 1), ["r0"], True)  # 4 of 20 votes: 20%, not above it
    assert (at_threshold["flagged_share"], at_threshold["warning"]) == (0.2, None)
    above = gold_report(votes(4, 1), ["r0"], False)  # 4 of 16: 25%
    assert above["flagged_share"] == 0.25 and "25% of the votes on pairs (4 of 16);" in above["warning"]
    assert "item 99 was failed by 1 of 4 raters" in above["warning"]


def test_naturalness_gold_items_are_an_image_against_a_visibly_corrupted_copy(work, capsys):
    gradient = np.stack([*np.meshgrid(np.arange(32) * 8, np.arange(32) * 8), np.full((32, 32), 90)], -1)
    original = gradient.astype(np.uint8)
    damaged = png_image(corrupted(png_bytes(original), random.Random(0)))
    assert damaged.shape == original.shape
    assert np.abs(damaged.astype(int) - original).mean() > 40  # blocks moved and heavy noise: plainly broken

    source = synthetic_evaluation(work / "natural-eval", 6, prompts=3)
    database = work / "natural.db"
    assert study_job.main(["create", f"db={database}", f"source={source}", "study=natural", "raters=1",
                           "gold_items=3", f"invites={work / 'natural.csv'}"]) == 0
    engine = db.connect(str(database))
    assert db.question(engine, "natural") == "Which image is more natural?"
    images = {r.id: bytes(r.png) for r in engine.connect().execute(db.sa.select(db.images.c.id, db.images.c.png))}
    rows = pq.read_table(source / "scores.parquet").to_pylist()
    prompt_of = {r[side]: r["prompt"] for r in rows for side in ("image_a", "image_b")}
    gold = engine.connect().execute(db.sa.select(db.items).where(db.items.c.gold == db.sa.true())).mappings().all()
    assert len(gold) == 3
    for item in gold:
        intact, copy = images[item["image_a"]], images[item["image_b"]]
        assert prompt_of[intact] == item["prompt"]  # A, the right answer, is the prompt's own image, untouched
        assert copy not in prompt_of  # B is no image of the source (not another prompt's image)
        difference = np.abs(png_image(copy).astype(int) - png_image(intact)).mean()
        assert difference > 20, difference  # solid colours: the noise is clipped at 0 and 255
    engine.dispose()

    fidelity = work / "fidelity.db"
    assert study_job.main(["create", f"db={fidelity}", f"source={source}", "study=fid", "raters=1", "gold_items=2",
                           "question_kind=prompt_fidelity", f"invites={work / 'fid.csv'}"]) == 0
    engine = db.connect(str(fidelity))
    assert db.question(engine, "fid") == "Which image matches the prompt better?"
    for item in engine.connect().execute(db.sa.select(db.items).where(db.items.c.gold == db.sa.true())).mappings():
        other = engine.connect().execute(db.sa.select(db.images.c.png).where(db.images.c.id == item["image_b"]))
        assert prompt_of[bytes(other.scalar())] != item["prompt"]  # B: another prompt's image
    engine.dispose()
    assert study_job.main(["create", f"db={work / 'mismatch.db'}", f"source={source}", "question_kind=prompt_fidelity",
                           "question=Which image is more natural?", f"invites={work / 'mismatch.csv'}"]) == 2
    err = capsys.readouterr().err
    assert "question_kind: the question 'Which image is more natural?' asks about naturalness" in err
    assert not (work / "mismatch.db").exists()


def test_item_ids_do_not_reveal_gold_items(work):
    source = synthetic_evaluation(work / "ids-eval", 12, prompts=3)
    database, invites = work / "ids.db", work / "ids.csv"
    assert study_job.main(["create", f"db={database}", f"source={source}", "study=ids", "raters=1",
                           "gold_items=4", f"invites={invites}"]) == 0
    engine = db.connect(str(database))
    rows = engine.connect().execute(db.sa.select(db.items.c.id, db.items.c.gold)).all()
    ids = sorted(r.id for r in rows)
    gold = sorted(r.id for r in rows if r.gold)
    assert gold != ids[-4:] and gold != ids[:4]  # gold items are neither the newest ids nor the first
    assert min(gold) < max(i for i in ids if i not in gold) and max(gold) > min(i for i in ids if i not in gold)
    server = Running(make_app(engine))
    try:
        with httpx.Client(base_url=server.url, follow_redirects=True) as browser:
            page = browser.get(f"/r/{token_of(read_invites(invites)['rater-001'])}")
            assert page.status_code == 200 and "gold" not in page.text.lower()
            seen = []
            while not (state := browser.get("/api/next").json())["done"]:
                assert set(state) == {"done", "answered", "total", "question", "csrf", "item", "prompt", "left",
                                      "right"}  # no gold flag, nothing but what the page shows
                assert "gold" not in json.dumps(state).lower()
                seen.append(state["item"])
                assert browser.post("/api/vote", json={"item": state["item"], "choice": "tie"},
                                    headers={"x-csrf-token": state["csrf"]}).status_code == 201
        assert sorted(seen) == ids  # the rater met every item, gold ones among the pairs
    finally:
        server.stop()
        engine.dispose()


def test_the_invites_file_is_private_from_its_creation(tmp_path):
    """Every file-system step Python takes while writing invites (renames, chmods) finds every file that
    holds the tokens readable by its owner only, even under umask 022; the links end up in the file."""
    folder = tmp_path / "private"
    folder.mkdir()
    seen, watching = [], [True]

    def hook(event, args):
        if watching[0] and event in ("os.rename", "os.chmod", "os.replace"):
            for f in folder.iterdir():
                seen.append((event, f.name, f.stat().st_mode & 0o777, "TOKEN-xyz" in f.read_text()))

    sys.addaudithook(hook)  # a hook cannot be removed: it stops watching at the end
    old = os.umask(0o022)
    try:
        write_invites(str(folder / "invites.csv"), [Invite("rater-001", "http://h/r/TOKEN-xyz")], append=False)
        write_invites(str(folder / "invites.csv"), [Invite("rater-002", "http://h/r/TOKEN-xyz2")], append=True)
    finally:
        os.umask(old)
        watching[0] = False
    with_tokens = [s for s in seen if s[3]]
    assert with_tokens, "no file-system step observed"
    assert all(mode == 0o600 for _, _, mode, _ in with_tokens), with_tokens
    assert [p.name for p in folder.iterdir()] == ["invites.csv"]  # no temporary file left
    assert ((folder / "invites.csv").stat().st_mode & 0o777) == 0o600
    assert read_invites(folder / "invites.csv") == {"rater-001": "http://h/r/TOKEN-xyz",
                                                    "rater-002": "http://h/r/TOKEN-xyz2"}
