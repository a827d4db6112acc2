"""The rating page in a real browser: Debian's Chromium driven by Playwright for Python.

A rater answers with the keyboard and the mouse, reloads and resumes, comes back later through the
invite link and finishes; the admin page shows the counts. An invite clicked on another site (as
in webmail) lands on the rating page, and a post from another site without the CSRF token is
refused. A screenshot of the rating page is saved in $HGDPO_TEST_ARTIFACTS (default
runs/test-artifacts/).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.sync_api import expect

from hgdpo.study import db
from hgdpo.study.app import Running, make_app
from studykit import read_invites, study_job, synthetic_evaluation

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
# What works here (root, a closed network): no sandbox, no GPU, no background connections.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found (Debian package chromium; .ci/run installs it)")
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh, empty profile
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=FLAGS)
        try:
            yield context
        finally:
            context.close()


def answered(page) -> int:
    return int(re.match(r"(\d+) /", page.inner_text("#count")).group(1))


def served_study(tmp_path, study: str, raters: int):
    """A study of 4 synthetic pairs and a gold item, served on 127.0.0.1: its engine, server and links."""
    source = synthetic_evaluation(tmp_path / "eval", 4, prompts=2)
    database = tmp_path / "study.db"
    assert study_job.main(["create", f"db={database}", f"source={source}", f"study={study}", f"raters={raters}",
                           "gold_items=1", f"invites={tmp_path / 'invites.csv'}"]) == 0
    engine = db.connect(str(database))
    server = Running(make_app(engine))
    links = {name: link.replace("http://127.0.0.1:8000", server.url)
             for name, link in read_invites(tmp_path / "invites.csv").items()}
    return engine, server, links


def test_a_rater_answers_by_keyboard_and_mouse_reloads_and_resumes(browser, tmp_path):
    engine, server, links = served_study(tmp_path, "browser", 2)
    try:
        page = browser.new_page()
        page.goto(links["rater-001"])
        assert page.url == f"{server.url}/rate"  # the token went into a cookie, not the address
        assert page.inner_text("#count") == "0 / 5 answered"
        assert page.inner_text("#question") == "Which image is more natural?"
        assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth === 8)")
        artefacts = Path(os.environ.get("HGDPO_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts"))
        artefacts.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(artefacts / "study-rating-page.png"))
        assert (artefacts / "study-rating-page.png").stat().st_size > 1000

        first = page.locator("input[name=item]").get_attribute("value")
        page.keyboard.press("1")  # left
        expect(page.locator("#count")).to_have_text("1 / 5 answered")
        assert page.locator("input[name=item]").get_attribute("value") != first
        page.click("#right")  # the mouse
        expect(page.locator("#count")).to_have_text("2 / 5 answered")
        page.keyboard.press("ArrowDown")  # tie
        expect(page.locator("#count")).to_have_text("3 / 5 answered")
        shown = page.locator("input[name=item]").get_attribute("value")
        page.reload()
        assert answered(page) == 3 and page.locator("input[name=item]").get_attribute("value") == shown
        page.close()

        later = browser.new_page()  # another visit through the invite link resumes where it stopped
        later.goto(links["rater-001"])
        assert answered(later) == 3
        later.keyboard.press("ArrowRight")
        expect(later.locator("#count")).to_have_text("4 / 5 answered")
        later.keyboard.press("2")
        later.wait_for_selector("#done")
        assert later.inner_text("#count") == "5 / 5 answered"

        votes = db.votes_table(engine, "browser")
        assert [v["choice"] for v in votes] == ["left", "right", "tie", "right", "right"]
        assert all(v["answer"] == ({"left": "b", "right": "a"}[v["choice"]] if v["flip"] else
                                   {"left": "a", "right": "b"}[v["choice"]]) for v in votes if v["choice"] != "tie")

        admin = browser.new_page()
        admin.goto(links["admin"])
        assert admin.url == f"{server.url}/admin"
        assert admin.inner_text("#votes") == "5"
        rows = admin.locator("#raters tr").all_inner_texts()
        assert "5 / 5" in rows[1] and "0 / 5" in rows[2]
        admin.goto(links["rater-002"])  # the same browser now holds a rater cookie too: still only its items
        assert admin.inner_text("#count") == "0 / 5 answered"
        admin.close()
    finally:
        server.stop()
        engine.dispose()


@contextlib.contextmanager
def other_site(pages: dict[str, str]):
    """A plain web server of another site: ``http://localhost:PORT`` (the study runs on 127.0.0.1, another
    host name, hence another site), answering each path of ``pages`` with its HTML."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path, "not here").encode()
            self.send_response(200 if self.path in pages else 404)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_invite_clicked_on_another_site_works_and_that_site_cannot_post_a_vote(browser, tmp_path):
    engine, server, links = served_study(tmp_path, "mail", 1)
    invite = links["rater-001"]
    last = db.sa.select(db.assignments.c.item_id).order_by(db.assignments.c.position.desc()).limit(1)
    item = engine.connect().execute(last).scalar()  # still unanswered when the other site posts
    forged = (f'<form method="post" action="{server.url}/rate"><input name="item" value="{item}">'
              f'<input name="choice" value="left"></form><script>document.forms[0].submit()</script>')
    browser.clear_cookies()  # no cookie of the other test's visit to 127.0.0.1
    try:
        with other_site({"/": f'<a id="invite" href="{invite}">Start the study</a>', "/forged": forged}) as mail:
            page = browser.new_page()
            page.goto(f"{mail}/")
            page.click("#invite")  # one click, from another site, as in webmail or chat
            page.wait_for_url(f"{server.url}/rate")
            expect(page.locator("#count")).to_have_text("0 / 5 answered")  # the cookie came with the 303's GET
            cookie = next(c for c in browser.cookies(server.url) if c["name"] == "hgdpo_rater")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
            page.reload()
            expect(page.locator("#count")).to_have_text("0 / 5 answered")
            page.keyboard.press("1")
            expect(page.locator("#count")).to_have_text("1 / 5 answered")
            page.reload()
            assert answered(page) == 1

            with page.expect_response(lambda r: r.url == f"{server.url}/rate" and r.request.method == "POST") as sent:
                page.goto(f"{mail}/forged")  # another site posts a vote (no CSRF token) with the rater's browser
            assert sent.value.status in (401, 403, 422)
            assert len(db.votes_table(engine, "mail")) == 1  # only the rater's own vote
            page.close()
    finally:
        server.stop()
        engine.dispose()
