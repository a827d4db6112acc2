"""The judge-ranked pool (hgdpo.world.oracle): the same latents, ranked by the world's judge."""

from __future__ import annotations

import numpy as np
import pytest

from hgdpo.config.core import from_dict
from hgdpo.errors import HgdpoError
from hgdpo.pool import store as pool
from hgdpo.pool.build import build_pool
from hgdpo.pool.config import PoolConfig
from hgdpo.world.judge import judge_details
from hgdpo.world.oracle import SCORER, main, rerank
from hgdpo.world.prompts import write_prompts


def _pool(tmp_path, name: str, **settings) -> str:
    write_prompts(tmp_path / "prompts.txt", 5, split="train", seed=2)
    cfg = from_dict(PoolConfig, {"prompts": str(tmp_path / "prompts.txt"), "output": str(tmp_path / name),
                                 "images_per_prompt": 4, "steps": 3, "rows_per_file": 2, **settings})
    build_pool(cfg, log=lambda *_: None, mlflow=False, local=True)
    return str(tmp_path / name)


def test_the_oracle_pool_keeps_the_latents_and_ranks_them_by_the_judge(tmp_path, capsys):
    source = _pool(tmp_path, "pool")
    rows = rerank(source, str(tmp_path / "oracle"), log=lambda *_: None)
    assert rows == 5 and pool.verify(tmp_path / "oracle")["checksums"]
    a, b = pool.read(source, columns=None), pool.read(tmp_path / "oracle", columns=None)
    assert np.array_equal(pool.latents_of(a), pool.latents_of(b))
    assert a.column("seeds").to_pylist() == b.column("seeds").to_pylist()
    for prompt, scores, w, lo, image_w, image_l in zip(*(b.column(c).to_pylist() for c in (
            "prompt", "scores", "winner", "loser", "image_w", "image_l"))):
        assert scores[w] == max(scores) and scores[lo] == min(scores)
        # The stored pictures are the images the ranking judged: their violations are the scores.
        assert -judge_details(pool.png_image(image_w), prompt).violation == pytest.approx(scores[w], abs=1e-5)
        assert -judge_details(pool.png_image(image_l), prompt).violation == pytest.approx(scores[lo], abs=1e-5)
    assert pool.read_meta(tmp_path / "oracle")["fingerprint"]["scorer_fingerprint"] == SCORER
    # A second run into the same folder is refused, and the first pool is left as it was.
    assert main(["--pool", source, "--out", str(tmp_path / "oracle")]) == 2
    assert "--out:" in capsys.readouterr().err and pool.verify(tmp_path / "oracle")["checksums"]


def test_a_pool_without_all_latents_is_refused(tmp_path):
    pair = _pool(tmp_path, "pair", keep="pair")
    with pytest.raises(HgdpoError, match="keeps only the winner's and loser's latents"):
        rerank(pair, str(tmp_path / "o1"))
    assert not (tmp_path / "o1").exists()
