"""The study's web app (FastAPI, server-rendered pages, one small script for keyboard shortcuts).

Raters open ``/r/<token>`` (their invite link): the token goes into an HttpOnly, SameSite=Lax
cookie and they land on ``/rate``, which shows the first item they have not answered, its two
images with the sides of their assignment, and their progress; they can close the page and come
back at any time. The same flow as JSON, for scripts: ``GET /api/next`` and ``POST /api/vote``
(``{"item": id, "choice": "left"|"right"|"tie"}``; it answers with the next item), authenticated by the cookie or by
``Authorization: Bearer <token>``. Admins open ``/a/<token>``: ``/admin`` and ``/api/admin``.

The cookie is Lax, not Strict, because invite links are clicked on other sites (webmail, chat, a
QR reader): a navigation that starts on another site carries no Strict cookie, not even to the
303's follow-up on this one, so the first click would land without a token. Lax cookies go with
top-level GETs only, which change nothing here; every post carries a CSRF token (a form field, or
the ``X-CSRF-Token`` header): an HMAC of the rater's id under the study's secret, which a page of
another site cannot read. Images are served
only as ``/image/<item>/<left|right>`` of an item assigned to the asking rater, so a URL never says
which side is A. Request bodies above ``max_body`` bytes get 413 before any handler runs. The
server keeps no access log: the invite paths carry tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Form, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, StrictInt

from hgdpo.study import db
from hgdpo.study.results import summary

RATER_COOKIE = "hgdpo_rater"
ADMIN_COOKIE = "hgdpo_admin"
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; img-src 'self'; script-src 'self'; style-src 'self'; "
                                 b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the invite path holds the token
    (b"x-frame-options", b"DENY"),
]


class VoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item: StrictInt
    choice: Literal["left", "right", "tie"]


def csrf_token(secret: str, rater_id: int) -> str:
    return hmac.new(secret.encode(), f"rater:{rater_id}".encode(), hashlib.sha256).hexdigest()


class Guard:
    """ASGI middleware: refuse bodies over ``max_body`` bytes (413) and add the security headers."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        if scope["method"] in ("POST", "PUT", "PATCH"):
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
                return await self._too_large(send_with_headers)
            body, more = b"", True
            while more:  # read it all (bounded) so a chunked upload is limited too
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body:
                    return await self._too_large(send_with_headers)
            sent = False

            async def replay():
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            return await self.app(scope, replay, send_with_headers)
        return await self.app(scope, receive, send_with_headers)

    async def _too_large(self, send):
        await JSONResponse({"detail": f"request body larger than {self.max_body} bytes"}, status_code=413)(
            {"type": "http"}, None, send)


def make_app(engine, *, max_body: int = 16384, secure_cookies: bool = False) -> Guard:
    """The ASGI app serving every study in ``engine``'s database."""
    app = FastAPI(title="hgdpo user study", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(resources.files("hgdpo.study") / "templates"))
    script = (resources.files("hgdpo.study") / "static" / "rate.js").read_bytes()
    style = (resources.files("hgdpo.study") / "static" / "study.css").read_bytes()

    def rater_of(request: Request, authorization: str | None) -> db.Rater:
        token = None
        if authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        elif request.cookies.get(RATER_COOKIE):
            token = request.cookies[RATER_COOKIE]
        if not token:
            raise HTTPException(401, "no rater token")
        rater = db.rater_by_token(engine, token)
        if rater is None:
            raise HTTPException(401, "unknown or revoked rater token")
        return rater

    def check_csrf(rater: db.Rater, given: str | None) -> None:
        if not given or not hmac.compare_digest(given, csrf_token(rater.secret, rater.id)):
            raise HTTPException(403, "missing or wrong CSRF token")

    def admin_of(request: Request) -> str:
        token = request.cookies.get(ADMIN_COOKIE)
        if not token:
            raise HTTPException(401, "no admin token")
        study_id = db.study_by_admin_token(engine, token)
        if study_id is None:
            raise HTTPException(403, "not an admin token")
        return study_id

    def enter(token: str, cookie: str, target: str) -> Response:
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(cookie, token, httponly=True, samesite="lax", secure=secure_cookies, path="/")
        return response

    @app.get("/r/{token}")
    def invite(token: str):
        if db.rater_by_token(engine, token) is None:
            return HTMLResponse("<h1>This invite link is not valid (unknown or revoked).</h1>", status_code=401)
        return enter(token, RATER_COOKIE, "/rate")

    @app.get("/a/{token}")
    def admin_invite(token: str):
        if db.study_by_admin_token(engine, token) is None:
            return HTMLResponse("<h1>This admin link is not valid.</h1>", status_code=401)
        return enter(token, ADMIN_COOKIE, "/admin")

    questions: dict[str, str] = {}  # a study's question never changes

    def current(rater: db.Rater) -> dict:
        now = db.state(engine, rater.id)
        item = now["item"]
        if rater.study_id not in questions:
            questions[rater.study_id] = db.question(engine, rater.study_id)
        out = {"done": item is None, "answered": now["answered"], "total": now["total"],
               "question": questions[rater.study_id], "csrf": csrf_token(rater.secret, rater.id)}
        if item is not None:
            out.update(item=item["id"], prompt=item["prompt"], left=f"/image/{item['id']}/left",
                       right=f"/image/{item['id']}/right")
        return out

    @app.get("/rate", response_class=HTMLResponse)
    def rate_page(request: Request, authorization: str | None = Header(None)):
        rater = rater_of(request, authorization)
        return templates.TemplateResponse(request, "rate.html", {"s": current(rater), "rater": rater.name})

    @app.post("/rate")
    def rate_form(request: Request, item: int = Form(...), choice: Literal["left", "right", "tie"] = Form(...),
                  csrf: str = Form(...), authorization: str | None = Header(None)):
        rater = rater_of(request, authorization)
        check_csrf(rater, csrf)
        try:
            db.vote(engine, rater.id, item, choice)
        except db.Refused as err:
            if err.status != 409:  # a double submit of the same answer just moves on
                raise HTTPException(err.status, str(err)) from None
        return RedirectResponse("/rate", status_code=303)

    @app.get("/api/next")
    def api_next(request: Request, authorization: str | None = Header(None)):
        return current(rater_of(request, authorization))

    @app.post("/api/vote", status_code=201)
    def api_vote(request: Request, body: VoteBody, authorization: str | None = Header(None),
                 x_csrf_token: str | None = Header(None)):
        rater = rater_of(request, authorization)
        check_csrf(rater, x_csrf_token)
        try:
            db.vote(engine, rater.id, body.item, body.choice)
        except db.Refused as err:
            raise HTTPException(err.status, str(err)) from None
        return current(rater)  # the next item, so a script needs one request per vote

    @app.get("/image/{item_id}/{side}")
    def image(request: Request, item_id: int, side: Literal["left", "right"],
              authorization: str | None = Header(None)):
        rater = rater_of(request, authorization)
        png = db.image_for(engine, rater.id, item_id, side)
        if png is None:
            raise HTTPException(404, "no such image among your items")
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})

    def admin_view(study_id: str) -> dict:
        study = db.study(engine, study_id)
        return {"study": study_id, "kind": study["kind"], "source": study["source"], "question": study["question"],
                "counts": db.counts(engine, study_id), "raters": db.rater_progress(engine, study_id),
                "results": summary(engine, study_id, resamples=500)}

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request):
        return templates.TemplateResponse(request, "admin.html", {"v": admin_view(admin_of(request))})

    @app.get("/api/admin")
    def api_admin(request: Request):
        return admin_view(admin_of(request))

    @app.get("/static/rate.js")
    def rate_js():
        return Response(script, media_type="text/javascript", headers={"cache-control": "max-age=3600"})

    @app.get("/static/study.css")
    def study_css():
        return Response(style, media_type="text/css", headers={"cache-control": "max-age=3600"})

    return Guard(app, max_body)


class Running:
    """A uvicorn server in a background thread (tests, notebooks): ``url``, then ``stop()``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=False,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the study server did not start on {host}:{port}")
            time.sleep(0.02)
        bound = self.server.servers[0].sockets[0].getsockname()
        self.url = f"http://{bound[0]}:{bound[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
