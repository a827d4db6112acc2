"""The user study on SQLite: the world end to end through the HTTP API, pool studies (Fig. 5a),
results, agreement, exports, MLflow, and bad input refused with nothing stored."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from studykit import Rater, evaluate_job, judge_rater, pool_job, read_invites, study_job, synthetic_evaluation, token_of

from hgdpo.infra import storage
from hgdpo.models import loading as models
from hgdpo.models import lora
from hgdpo.pool.store import png_image
from hgdpo.study import db
from hgdpo.study.app import Running, make_app
from hgdpo.world.judge import judge
from hgdpo.world.prompts import write_prompts


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("study")


@pytest.fixture(scope="module")
def world_evaluation(ray_local, work) -> Path:
    """A real evaluation in the world: an adapter whose LoRA visibly changes the images against the
    embedded model, 3 test prompts x 2 seeds, scored by the judge."""
    pipe = models.load_pipeline("embedded")
    lora.add_lora(pipe.unet, rank=4, alpha=4, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    base = {"name": "embedded", "fingerprint": models.fingerprint(models.resolve_model("embedded"))}
    adapter = lora.save_adapter(pipe.unet, work / "adapter", 4, 4, info={"fingerprint": "t", "base_model": base})
    write_prompts(work / "test.txt", 3, split="test", seed=5)
    output = work / "evaluation"
    assert evaluate_job.main([f"prompts={work / 'test.txt'}", f"output={output}", f"adapter={adapter}", "alpha=1.0",
                              "images_per_prompt=2", "steps=4", "bootstrap=200", "picture_prompts=1",
                              "scorers=[judge]", f"mlflow_uri=sqlite:///{work / 'mlflow.db'}"]) == 0
    return output


@pytest.fixture(scope="module")
def world_pool(work) -> Path:
    write_prompts(work / "train.txt", 4, split="train", seed=3)
    output = work / "pool"
    assert pool_job.main([f"prompts={work / 'train.txt'}", f"output={output}", "images_per_prompt=2", "steps=4",
                          "--no-ray", "--no-mlflow"]) == 0
    return output


@pytest.fixture(scope="module")
def mini(work):
    """A study of 8 synthetic pairs, 2 gold items and 3 raters, served on 127.0.0.1."""
    source = synthetic_evaluation(work / "mini-eval", 8)
    database = work / "mini.db"
    assert study_job.main(["create", f"db={database}", f"source={source}", "study=mini", "raters=3",
                           f"invites={work / 'mini.csv'}"]) == 0
    engine = db.connect(str(database))
    server = Running(make_app(engine, max_body=4096))
    yield server.url, engine, read_invites(work / "mini.csv")
    server.stop()
    engine.dispose()


def test_world_rater_by_the_judge_gives_the_evaluations_judge_win_rate(world_evaluation, work, capsys):
    database, invites = work / "world.db", work / "world.csv"
    assert study_job.main(["create", f"db={database}", f"source={world_evaluation}", "study=world", "raters=1",
                           "gold_items=0", f"invites={invites}"]) == 0
    assert (invites.stat().st_mode & 0o777) == 0o600
    engine = db.connect(str(database))
    server = Running(make_app(engine))
    try:
        assert judge_rater(Rater(server.url, token_of(read_invites(invites)["rater-001"]))) == 6
    finally:
        server.stop()
        engine.dispose()

    output = work / "world-results"
    assert study_job.main(["results", f"db={database}", "study=world", f"output={output}", "bootstrap=200",
                           f"mlflow_uri=sqlite:///{work / 'mlflow.db'}"]) == 0
    result = json.loads((output / "results.json").read_text())
    evaluation = json.loads((world_evaluation / "report.json").read_text())["result"]["win_rates"]["judge"]
    # the same pairs, judged by the same program through the web app: the same win rate and counts
    assert evaluation["ties"] < 6  # the adapter changed the images: the rater's answers decide the figure
    for key in ("rate", "wins", "ties", "losses"):
        assert result["human"][key] == pytest.approx(evaluation[key]), key
        assert result["ai"][key] == pytest.approx(evaluation[key]), key
    assert result["ai_agreement"]["rate"] == 1.0  # the rater is the scorer: full agreement where it prefers one
    votes = pq.read_table(output / "votes.parquet")
    assert votes.num_rows == 6 and set(votes.column("answer").to_pylist()) <= {"a", "b", "tie"}
    # the shown side was recorded per item and both occur in a seeded draw of 6
    assert {"a", "b"} == set(votes.column("shown_left").to_pylist())

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["hgdpo-study"], output_format="list")[0]
    source = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string=f"tags.output = '{world_evaluation}'")[0]
    assert run.data.tags["source_run_id"] == source.info.run_id
    assert run.data.metrics["human_win_rate"] == pytest.approx(evaluation["rate"])

    export = work / "world-prefs.parquet"
    assert study_job.main(["export", f"db={database}", "study=world", f"output={export}"]) == 0
    prefs = pq.read_table(export)
    scores = pq.read_table(world_evaluation / "scores.parquet").to_pylist()
    by_caption = {(r["prompt"], r["image_a"]): r for r in scores}
    for row in prefs.to_pylist():
        source_row = by_caption[(row["caption"], row["jpg_0"])]  # jpg_0 is A's image, jpg_1 B's, as people saw
        assert row["jpg_1"] == source_row["image_b"]
        a, b = source_row["score_a_judge"], source_row["score_b_judge"]
        assert row["label_0"] == (1.0 if a > b else 0.0 if a < b else 0.5)
        assert row["label_1"] == 1.0 - row["label_0"] and row["has_label"] and row["are_different"]


def test_pool_study_measures_the_agreement_of_pickscore_with_people(world_pool, work):
    database, invites = work / "pool.db", work / "pool.csv"
    assert study_job.main(["create", f"db={database}", f"source={world_pool}", "raters=1", "gold_items=0",
                           f"invites={invites}", "study=pool"]) == 0
    engine = db.connect(str(database))
    server = Running(make_app(engine))
    try:
        assert judge_rater(Rater(server.url, token_of(read_invites(invites)["rater-001"]))) == 4
    finally:
        server.stop()
    from hgdpo.pool import store as pool
    from hgdpo.study.results import summary

    rows = pool.read(str(world_pool), columns=["prompt", "image_w", "image_l"]).to_pylist()
    expected = np.mean([1.0 if w > lo else 0.0 if w < lo else 0.5 for w, lo in
                        ((judge(png_image(r["image_w"]), r["prompt"]), judge(png_image(r["image_l"]), r["prompt"]))
                         for r in rows)])
    result = summary(engine, "pool", resamples=200)
    engine.dispose()
    assert result["kind"] == "pool" and result["scorer"] == "pickscore"
    assert result["human"]["rate"] == pytest.approx(expected)  # winner over loser, as the judge sees them
    assert result["ai_agreement"]["rate"] == pytest.approx(expected)  # PickScore always prefers the winner


def test_bad_input_is_refused_with_the_right_status_and_nothing_stored(mini):
    url, engine, links = mini
    good = Rater(url, token_of(links["rater-001"]))
    state = good.next()
    assert good.vote(state["item"], "left", state["csrf"]).status_code == 201
    before = db.counts(engine, "mini")["votes"]

    def status(response):
        return response.status_code

    assert status(Rater(url, "not-a-token").vote(state["item"], "left", state["csrf"])) == 401
    assert status(httpx.post(f"{url}/api/vote", json={"item": state["item"], "choice": "left"})) == 401
    assert status(good.vote(state["item"], "right", state["csrf"])) == 409  # replayed
    assert status(good.vote(10_000, "left", state["csrf"])) == 403  # no such item
    state = good.next()
    assert status(good.vote(state["item"], "left", "forged")) == 403  # CSRF
    assert status(good.http.post("/api/vote", json={"item": state["item"]}, headers={"x-csrf-token": state["csrf"]})) == 422
    assert status(good.http.post("/api/vote", content=b"{not json", headers={"x-csrf-token": state["csrf"],
                                                                              "content-type": "application/json"})) == 422
    assert status(good.vote(state["item"], "sideways", state["csrf"])) == 422
    assert status(good.http.post("/api/vote", json={"item": state["item"], "choice": "left", "pad": "x" * 8000},
                                 headers={"x-csrf-token": state["csrf"]})) == 413
    assert status(good.http.post("/api/vote", content=iter([b"{" + b" " * 5000, b"}"]),
                                 headers={"x-csrf-token": state["csrf"], "content-type": "application/json"})) == 413
    with httpx.Client(base_url=url) as browser:  # the page's form, with the invite's cookie
        assert status(browser.get(f"/r/{token_of(links['rater-001'])}")) == 303
        form = {"item": str(state["item"]), "choice": "left"}
        assert status(browser.post("/rate", data=form)) == 422  # no CSRF field
        assert status(browser.post("/rate", data={**form, "csrf": "0" * 64})) == 403  # another site's guess
        assert status(browser.post("/rate", data={**form, "item": "x", "csrf": state["csrf"]})) == 422
    assert status(good.http.get(f"/image/{state['item']}/left")) == 200
    assert status(good.http.get("/image/10000/left")) == 404
    assert status(good.http.get(f"/image/{state['item']}/middle")) == 422
    # revoked: the token stops working, its votes stay
    third = Rater(url, token_of(links["rater-003"]))
    third_state = third.next()
    db.revoke(engine, "mini", "rater-003")
    assert status(third.vote(third_state["item"], "left", third_state["csrf"])) == 401
    assert status(third.http.get("/api/next")) == 401
    assert db.counts(engine, "mini")["votes"] == before  # nothing refused was stored


def test_items_not_assigned_to_a_rater_are_refused(work):
    source = synthetic_evaluation(work / "spread-eval", 6)
    database, invites = work / "spread.db", work / "spread.csv"
    assert study_job.main(["create", f"db={database}", f"source={source}", "study=spread", "raters=3",
                           "items_per_rater=2", "gold_items=0", f"invites={invites}"]) == 0
    engine = db.connect(str(database))
    links = read_invites(invites)
    mine = {name: {r.item_id for r in engine.connect().execute(
        db.sa.select(db.assignments.c.item_id).join(db.raters, db.raters.c.id == db.assignments.c.rater_id)
        .where(db.raters.c.name == name))} for name in ("rater-001", "rater-002", "rater-003")}
    assert set().union(*mine.values()) == {r.id for r in engine.connect().execute(db.sa.select(db.items.c.id))}
    assert all(len(items) == 2 for items in mine.values())  # 6 pairs spread over 3 raters, each once
    server = Running(make_app(engine))
    try:
        first = Rater(server.url, token_of(links["rater-001"]))
        state = first.next()
        foreign = sorted(mine["rater-002"])[0]
        assert first.vote(foreign, "left", state["csrf"]).status_code == 403
        assert first.http.get(f"/image/{foreign}/left").status_code == 404  # only your items' images
        assert db.counts(engine, "spread")["votes"] == 0
    finally:
        server.stop()
        engine.dispose()


def test_admin_sees_counts_and_raters_cannot_reach_it(mini):
    url, engine, links = mini
    rater_token, admin_token = token_of(links["rater-002"]), token_of(links["admin"])
    assert httpx.get(f"{url}/admin").status_code == 401
    assert httpx.get(f"{url}/api/admin", cookies={"hgdpo_admin": rater_token}).status_code == 403
    with httpx.Client(base_url=url) as browser:
        assert browser.get(f"/r/{rater_token}").status_code == 303
        assert browser.get("/api/admin").status_code == 401  # a rater's cookie is not an admin's
    with httpx.Client(base_url=url, follow_redirects=True) as admin:
        page = admin.get(f"/a/{admin_token}")
        assert page.status_code == 200 and "Study <code>mini</code>" in page.text
        view = admin.get("/api/admin").json()
    assert view["counts"] == db.counts(engine, "mini") and view["counts"]["pairs"] == 8
    assert [r["name"] for r in view["raters"]] == ["rater-001", "rater-002", "rater-003"]
    assert all(r["assigned"] == 10 for r in view["raters"])  # 8 pairs + 2 gold each


def test_create_refuses_bad_input_and_writes_nothing(work, capsys):
    database = work / "bad.db"
    code = study_job.main(["create", f"db={database}", f"source={work / 'nowhere'}", f"invites={work / 'x.csv'}"])
    assert code == 2 and "source:" in capsys.readouterr().err
    source = synthetic_evaluation(work / "bad-eval", 4)
    assert study_job.main(["create", f"db={database}", f"source={source}", "items=9",
                           f"invites={work / 'x.csv'}"]) == 2
    assert "items: 9 is more than the 4 pairs" in capsys.readouterr().err
    assert study_job.main(["create", f"db={database}", f"source={source}", "scorer=hpsv2",
                           f"invites={work / 'x.csv'}"]) == 2
    assert "scorer: 'hpsv2' is not in" in capsys.readouterr().err
    assert study_job.main(["create", f"db={database}", f"source={source}", "study=bad id",
                           f"invites={work / 'x.csv'}"]) == 2
    assert "study.create.study" in capsys.readouterr().err
    assert not (work / "x.csv").exists() and not database.exists()
    assert study_job.main(["results", f"db={work / 'missing.db'}", "study=s", f"output={work / 'r'}"]) == 2
    assert "no such study database" in capsys.readouterr().err
    assert study_job.main(["create", "db=postgresql://u:secret@127.0.0.1/x", f"source={source}",
                           f"invites={work / 'x.csv'}"]) == 2
    err = capsys.readouterr().err
    assert "password inside the database URL" in err and "secret" not in err
    assert storage.exists(str(source / "scores.parquet"))
