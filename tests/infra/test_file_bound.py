"""Settings that would make a file over the bound on one file (``hgdpo.infra.storage.MAX_OBJECT_BYTES``, 5 GiB:
S3's limit on the CopyObject that commits every write) are refused before any work, naming the setting.

A PNG is counted at its raw RGB bytes (about its largest); a pool row adds its float16 latents.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hgdpo.config.core import from_dict
from hgdpo.errors import ConfigError
from hgdpo.evaluate.config import EvalConfig
from hgdpo.infra import storage
from hgdpo.pool.config import PoolConfig
from hgdpo.world.prompts import write_prompts

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
import build_pool as build_pool_job  # noqa: E402
import evaluate as evaluate_job  # noqa: E402

PAPER = {"width": 704, "height": 1024}  # 704 x 1024 x 3 = 2,162,688 bytes an image


def test_paper_sized_evaluation_parts_over_5_gib_are_refused_naming_rows_per_part():
    base = {"prompts": "p.txt", "output": "out", **PAPER}
    from_dict(EvalConfig, base)  # the default, 128 rows of two PNGs: ~528 MiB a part
    with pytest.raises(ConfigError) as err:
        from_dict(EvalConfig, {**base, "rows_per_part": 2000})
    assert str(err.value) == (
        "evaluate.rows_per_part: 2000 rows of ~4.1 MiB (A's and B's PNGs at 704x1024) would write parts of "
        "~8.1 GiB, over the 5 GiB bound on one file (storage.MAX_OBJECT_BYTES: S3 moves a written file onto its "
        "name with one CopyObject, which refuses more than 5 GiB); lower rows_per_part to 1241 or less")
    from_dict(EvalConfig, {**base, "rows_per_part": 1241})
    with pytest.raises(ConfigError, match=r"^evaluate\.images_per_prompt: a prompt's 3000 PNGs of B"):
        from_dict(EvalConfig, {**base, "images_per_prompt": 3000})  # one row of a baseline cache


def test_paper_sized_pool_parts_over_5_gib_are_refused_naming_rows_per_file():
    base = {"prompts": "p.txt", "output": "out", **PAPER}
    with pytest.raises(ConfigError, match=r"^pool\.rows_per_file: 2500 rows of ~4.1 MiB \(704x1024\) would write "
                                          r"parts of ~10.1 GiB, over the 5 GiB bound on one file"):
        from_dict(PoolConfig, {**base, "rows_per_file": 2500})
    cfg = from_dict(PoolConfig, {**base, "rows_per_file": 1000})  # the images alone fit: 4 GiB
    with pytest.raises(ConfigError) as err:  # with N = 20 latents of 4 x 128 x 88 (the model's, read in prepare)
        cfg.check_part_size(704, 1024, [20, 4, 128, 88])
    assert str(err.value).startswith("pool.rows_per_file: 1000 rows of ~5.8 MiB (704x1024, with latents) would "
                                     "write parts of ~5.7 GiB, over the 5 GiB bound")
    assert str(err.value).endswith("lower rows_per_file to 876 or less")
    from_dict(PoolConfig, {**base, "rows_per_file": 876}).check_part_size(704, 1024, [20, 4, 128, 88])


def test_jobs_refuse_before_any_work_at_the_models_native_size(s3_env, monkeypatch, tmp_path, capsys):
    """With the bound lowered to 100,000 bytes and no size configured, the embedded model's 64x64 images are
    what is counted: both jobs stop at their checks, naming the setting, and nothing reaches the bucket."""
    write_prompts(tmp_path / "test.txt", 2, split="test", seed=5)
    monkeypatch.setenv(storage.BOUND_ENV, "100000")
    out = f"s3://hgdpo-test/bound/{tmp_path.name}"
    assert evaluate_job.main([f"prompts={tmp_path / 'test.txt'}", f"output={out}/eval", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "evaluate.rows_per_part: 128 rows of ~24 KiB (A's and B's PNGs at 64x64) would write parts of ~3 MiB, " \
           "over the 97.7 KiB (100000 bytes) bound on one file" in err and "lower rows_per_part to 4 or less" in err
    assert build_pool_job.main([f"prompts={tmp_path / 'test.txt'}", f"output={out}/pool", "images_per_prompt=2",
                                "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "pool.rows_per_file: 64 rows of ~" in err and "(64x64, with latents)" in err and "lower rows_per_file" in err
    assert s3_env.keys("hgdpo-test", f"bound/{tmp_path.name}/") == []
