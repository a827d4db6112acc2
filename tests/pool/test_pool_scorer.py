"""A pool ranked by another scorer than PickScore (``pool.scorer``), in one process on the embedded models:
its rows follow that scorer's scores, its metadata names it, and a rerun with another scorer is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hgdpo.config.core import from_dict
from hgdpo.errors import ConfigError
from hgdpo.pool import store as pool
from hgdpo.pool.config import PoolConfig, pool_scorer
from hgdpo.scorers.base import ScorerSpec
from hgdpo.scorers.registry import SCORER_NAMES, load_scorer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
import build_pool  # noqa: E402

N = 4
PROMPTS = ["a large red circle on the left", "a small blue square on the right", "a large green triangle on the left"]


def settings(work: Path, output: Path, *extra: str) -> list[str]:
    return [f"prompts={work / 'prompts.txt'}", f"output={output}", f"images_per_prompt={N}", "steps=2",
            "rows_per_file=2", "--no-ray", "--no-mlflow", *extra]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("pool-scorer")
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return work


@pytest.fixture(scope="module")
def clip_pool(work):
    """A pool ranked by the CLIP score of the embedded CLIP."""
    output = work / "clip-pool"
    assert build_pool.main(settings(work, output, "scorer=clip")) == 0
    return output


def test_a_pool_ranked_by_clip_follows_the_clip_scores(clip_pool):
    clip = load_scorer(ScorerSpec("clip"))
    rows = pool.without_latents(pool.read(str(clip_pool))).to_pylist()
    assert [r["prompt"] for r in rows] == PROMPTS
    for row in rows:
        scores = np.asarray(row["scores"], np.float32)
        assert row["rank"] == np.argsort(-scores, kind="stable").tolist()
        w, lo = row["winner"], row["loser"]
        assert w == row["rank"][0] and lo == row["rank"][-1] and scores[w] > scores[lo]
        # The stored winner's and loser's images, scored again by the evaluation's CLIP score: the pool's scores.
        images = np.stack([pool.png_image(row["image_w"]), pool.png_image(row["image_l"])])
        again = clip([row["prompt"]] * 2, images)
        np.testing.assert_allclose(again, scores[[w, lo]], rtol=1e-4)
        assert np.all((scores >= 0) & (scores <= 100))  # 100 * max(cos, 0)
    meta = pool.read_meta(str(clip_pool))
    assert meta["scorer"] == {"name": "clip", "model": "embedded", "processor": None}
    assert pool_scorer(meta) == "clip" and meta["fingerprint"]["scorer"] == "clip"


def test_a_rerun_with_another_scorer_is_refused(clip_pool, work, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in clip_pool.iterdir()}
    assert build_pool.main(settings(work, clip_pool)) == 2  # the default, pickscore
    err = capsys.readouterr().err
    assert "holds a pool written with another config (scorer: 'clip' there, 'pickscore' now)" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in clip_pool.iterdir()} == before
    assert build_pool.main(settings(work, clip_pool, "scorer=clip")) == 0
    assert "already complete" in capsys.readouterr().out


def test_a_pool_whose_metadata_names_no_scorer_was_ranked_by_pickscore(work, tmp_path, capsys):
    """A pool written before ``scorer`` existed: its metadata names no scorer, and it is PickScore's."""
    output = tmp_path / "pickscore-pool"
    args = settings(work, output, "images_per_prompt=2")
    assert build_pool.main(args) == 0
    meta_file = output / "pool.json"
    meta = json.loads(meta_file.read_text())
    assert meta["scorer"]["name"] == "pickscore" and "scorer" not in meta["fingerprint"]  # the default: left out
    del meta["scorer"], meta["config"]["scorer"]
    meta_file.write_text(json.dumps(meta, indent=2))
    meta = pool.read_meta(str(output))
    assert pool_scorer(meta) == "pickscore"
    assert from_dict(PoolConfig, meta["config"]).scorer == "pickscore"
    capsys.readouterr()
    assert build_pool.main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert build_pool.main(args + ["scorer=clip"]) == 2
    assert "(scorer: 'pickscore' there, 'clip' now)" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("unknown", "pool.scorer: unknown scorer 'picscore'; known: " + ", ".join(SCORER_NAMES)),
    ("aesthetic_without_mlp", "scorer_model: required: the LAION aesthetic MLP weights"),
    ("aesthetic_missing_mlp", "scorer_model: /nonexistent/mlp.safetensors does not exist"),
    ("judge_with_a_model", "scorer_processor: the judge is a program and loads no model"),
    ("judge_of_other_prompts", "prompt 1 ('a photo of an astronaut') is not a caption of the miniature world's"),
])
def test_a_bad_scorer_is_refused_naming_the_setting_before_any_work(work, tmp_path, capsys, case, message):
    output = tmp_path / "out"
    args = settings(work, output, {
        "unknown": "scorer=picscore",
        "aesthetic_without_mlp": "scorer=aesthetic",
        "aesthetic_missing_mlp": "scorer=aesthetic",
        "judge_with_a_model": "scorer=judge",
        "judge_of_other_prompts": "scorer=judge",
    }[case])
    if case == "aesthetic_missing_mlp":
        args.append("scorer_model=/nonexistent/mlp.safetensors")
    elif case == "judge_with_a_model":
        args.append("scorer_processor=embedded")
    elif case == "judge_of_other_prompts":
        (tmp_path / "other.txt").write_text("a photo of an astronaut\n")
        args[0] = f"prompts={tmp_path / 'other.txt'}"
    assert build_pool.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not output.exists()


def test_the_pool_config_refuses_an_unknown_scorer_naming_the_field():
    with pytest.raises(ConfigError, match=r"^pool\.scorer: unknown scorer 'PickScore'; known: judge, pickscore"):
        PoolConfig(prompts="p.txt", output="out", scorer="PickScore")
    assert PoolConfig(prompts="p.txt", output="out").scorer == "pickscore"
    assert PoolConfig(prompts="p.txt", output="out").scorer_spec() == ScorerSpec("pickscore", None, None)
