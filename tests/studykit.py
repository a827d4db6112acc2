"""What the study tests share: a synthetic evaluation folder, invites, a rater through the JSON API,
and the study, pool and evaluation jobs as modules."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hgdpo.pool.store import png_image
from hgdpo.world.judge import judge

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
import build_pool as pool_job  # noqa: E402
import evaluate as evaluate_job  # noqa: E402
import study as study_job  # noqa: E402

__all__ = ["Rater", "evaluate_job", "judge_rater", "pool_job", "read_invites", "study_job", "synthetic_evaluation",
           "token_of"]


def synthetic_evaluation(folder: Path, n: int, prompts: int = 4) -> Path:
    """An evaluation output folder holding only ``scores.parquet`` with ``n`` rows of small solid-colour
    PNGs (for the tests of the web and database layers, where the pictures do not matter)."""
    def png(value: int) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (8, 8), (value % 256, (value * 7) % 256, 40)).save(out, format="PNG")
        return out.getvalue()

    folder.mkdir(parents=True, exist_ok=True)
    rows = range(n)
    pq.write_table(pa.table({
        "prompt_id": [f"p{i % prompts}" for i in rows], "prompt_index": [i % prompts for i in rows],
        "prompt": [f"prompt number {i % prompts}" for i in rows], "k": [i // prompts for i in rows],
        "seed": list(rows), "score_a_judge": [float(i % 3) for i in rows], "score_b_judge": [1.0 for _ in rows],
        "image_a": [png(2 * i) for i in rows], "image_b": [png(2 * i + 1) for i in rows]}),
        folder / "scores.parquet")
    return folder


def read_invites(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()[1:]
    return dict(line.split(",", 1) for line in lines)


def token_of(link: str) -> str:
    return link.rsplit("/", 1)[1]


class Rater:
    """A rater through the JSON API, as a script (or the load test) uses it."""

    def __init__(self, url: str, token: str):
        self.http = httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=30)

    def next(self) -> dict:
        response = self.http.get("/api/next")
        response.raise_for_status()
        return response.json()

    def vote(self, item: int, choice: str, csrf: str) -> httpx.Response:
        return self.http.post("/api/vote", json={"item": item, "choice": choice}, headers={"x-csrf-token": csrf})

    def image(self, path: str) -> np.ndarray:
        response = self.http.get(path)
        response.raise_for_status()
        return png_image(response.content)


def judge_rater(rater: Rater) -> int:
    """Answer every item by the world's judge of the two images shown; returns the votes cast."""
    cast, state = 0, rater.next()
    while not state["done"]:
        left, right = (judge(rater.image(state[side]), state["prompt"]) for side in ("left", "right"))
        choice = "left" if left > right else "right" if right > left else "tie"
        response = rater.vote(state["item"], choice, state["csrf"])
        assert response.status_code == 201
        state, cast = response.json(), cast + 1
    return cast
