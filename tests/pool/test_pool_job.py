"""The pool job end to end on the embedded default: contract, regeneration, resume, bad input."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from close import assert_same_latents, assert_same_pixels, latents_differ

from hgdpo.models import embedded
from hgdpo.models.sampling import image_seeds
from hgdpo.pool import store as pool
from hgdpo.prompts import read_prompts

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
import build_pool  # noqa: E402

N = 4
PROMPTS = [f"a {size} {color} {shape} on the {side}" for size, color, shape, side in [
    ("large", "red", "circle", "left"), ("small", "blue", "square", "right"), ("large", "green", "triangle", "left"),
    ("small", "yellow", "circle", "right"), ("large", "purple", "square", "left"), ("small", "orange", "triangle", "right"),
    ("small", "red", "square", "left"), ("large", "blue", "circle", "right"), ("small", "green", "circle", "left"),
    ("large", "yellow", "square", "right"),
]]


def settings(tmp: Path, output: Path, *extra: str) -> list[str]:
    return [f"prompts={tmp / 'prompts.txt'}", f"output={output}", f"images_per_prompt={N}", "steps=4",
            "rows_per_file=2", f"mlflow_uri=sqlite:///{tmp / 'mlflow.db'}", *extra]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pooljob")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return tmp


@pytest.fixture(scope="module")
def built(ray_local, work):
    """An uninterrupted pool of all prompts: the reference the other tests compare with."""
    output = work / "pool"
    assert build_pool.main(settings(work, output)) == 0
    return output


def test_pool_follows_the_data_contract(built, work):
    table = pool.read(str(built))
    prompts = read_prompts(work / "prompts.txt")
    assert table.num_rows == len(PROMPTS)
    assert table.column("prompt_id").to_pylist() == [p.id for p in prompts]
    assert table.column("prompt").to_pylist() == PROMPTS
    assert table.column("prompt_index").to_pylist() == list(range(len(PROMPTS)))
    latents = pool.latents_of(table)
    assert latents.shape == (len(PROMPTS), N, 4, 16, 16) and latents.dtype == np.float16
    for row in pool.without_latents(table).to_pylist():
        assert row["seeds"] == image_seeds(0, row["prompt_id"], N)
        assert len(set(row["seeds"])) == N
        scores = np.asarray(row["scores"])
        assert row["rank"] == np.argsort(-scores, kind="stable").tolist()
        assert row["winner"] == row["rank"][0] and row["loser"] == row["rank"][-1]
        assert scores[row["winner"]] >= scores[row["loser"]]
        assert row["latent_index"] == list(range(N))
        assert pool.png_image(row["image_w"]).shape == (64, 64, 3)
    meta = pool.read_meta(str(built))
    assert meta["num_prompts"] == len(PROMPTS) and meta["latent_shape"] == [N, 4, 16, 16]
    assert meta["config"]["images_per_prompt"] == N and meta["versions"]["diffusers"] == "0.42.1"
    assert meta["base_model"]["name"] == "embedded" and len(meta["base_model"]["fingerprint"]) == 16


def test_any_row_regenerates_alone(built):
    """A prompt's N images from its seeds alone give the stored latents, images and scores.

    Here in this process, there on a Ray actor with its own thread count: float sums in another
    order differ in their last bits, so the comparison allows float16's and uint8's rounding of
    that (tests/close.py), which still tells one seed's image from another's.
    """
    from hgdpo.models import loading as models
    from hgdpo.models.sampling import generate, set_sampler
    from hgdpo.scorers.pickscore import pickscore

    row = pool.read(str(built)).slice(3, 1)
    record = pool.without_latents(row).to_pylist()[0]
    pipe = models.load_pipeline("embedded")
    set_sampler(pipe, "dpm_multistep")
    latents, images = generate(pipe, record["prompt"], record["seeds"], steps=4, guidance_scale=5.0,
                               width=64, height=64)
    assert_same_latents(latents, pool.latents_of(row)[0])
    assert latents_differ(latents[0], latents[1])  # another seed's image would fail
    assert_same_pixels(images[record["winner"]], pool.png_image(record["image_w"]))
    assert_same_pixels(images[record["loser"]], pool.png_image(record["image_l"]))
    processor, scorer = models.load_scorer("embedded")
    np.testing.assert_allclose(pickscore(processor, scorer, record["prompt"], images), record["scores"], rtol=1e-5)


def test_run_is_recorded_in_mlflow(built, work):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["hgdpo-pool"], output_format="list")
    run = next(r for r in runs if r.data.params.get("output") == str(built))
    m = run.data.metrics
    assert m["prompts_built"] == len(PROMPTS) and m["images_per_s"] > 0
    assert m["score_gap_mean"] > 0 and m["score_winner_mean"] > m["score_loser_mean"]
    assert run.data.params["images_per_prompt"] == str(N)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"pairs.png", "pool.json"} <= artifacts


def test_rerun_of_a_finished_pool_does_nothing(built, capsys):
    before = sorted(p.name for p in built.iterdir())
    assert build_pool.main(settings(built.parent, built)) == 0
    assert "already complete (10 prompts, every part has its recorded size); nothing to do" in capsys.readouterr().out
    assert sorted(p.name for p in built.iterdir()) == before


def test_resume_finishes_what_a_dead_run_left(built, work, capsys):
    """Parts of a dead run plus a half-written file: the rerun builds only the rest."""
    partial = work / "partial"
    partial.mkdir()
    parts = sorted(p for p in built.iterdir() if p.name.startswith("part-"))
    shutil.copy(built / "pool.json", partial)
    for part in parts[:2]:
        shutil.copy(part, partial)
    (partial / f".tmp-deadbeef-{parts[2].name}").write_bytes(b"PAR1 half a file")
    with pytest.raises(Exception, match="incomplete"):
        pool.read(str(partial))
    assert build_pool.main(settings(work, partial, "--no-mlflow")) == 0
    out = capsys.readouterr().out
    assert "10 prompts, 4 already built, 6 to build" in out and "removed 1 half-written file" in out
    # progress counts the prompts built before, and tells the time left for the configured count. Whether a rate is
    # shown depends on how Ray Data bundles rows: rows delivered in one burst give no steady rate (test_quiet.py
    # times the rate itself); where one is shown, it counts against the configured 10 prompts.
    assert re.search(r"pool: 10/10 prompts done \(100%\)(, [0-9.]+ images/s, 0 s left)?\n", out), out
    assert not re.search(r"prompts done \(100%\), [0-9.]+ images/s, [1-9]", out), out
    assert pool.read(str(partial)).equals(pool.read(str(built)))
    assert not list(partial.glob(".tmp-*"))


def test_resume_after_the_job_is_killed(built, work, tmp_path):
    """Kill a real job process mid-run, rerun it, and get the uninterrupted pool."""
    output = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "build_pool.py"),
                             *settings(work, output, "rows_per_file=1", "--no-mlflow")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and len(list(output.glob("part-*"))) < 2 and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    written = list(output.glob("part-*"))
    assert 2 <= len(written) < len(PROMPTS), "the job was not interrupted mid-run"
    assert not (output / pool.COMPLETE).exists()
    assert build_pool.main(settings(work, output, "rows_per_file=1", "--no-mlflow")) == 0
    assert pool.read(str(output)).equals(pool.read(str(built)))


def test_the_job_equals_the_plain_loop_row_by_row(built, work, tmp_path):
    """The Ray job (actors of one thread each) and the plain single-process loop over the same library
    functions (one thread here too) give the same pool; only how rows are split into parts differs."""
    import torch

    from hgdpo.config.core import load_config
    from hgdpo.pool.build import build_pool
    from hgdpo.pool.config import PoolConfig

    cfg = load_config(PoolConfig, None, settings(work, tmp_path / "loop", "rows_per_file=3"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = build_pool(cfg, log=lambda *_: None, mlflow=False, local=True)
    finally:
        torch.set_num_threads(threads)
    assert result.built == len(PROMPTS) and len(pool.state(str(tmp_path / "loop")).parts) == 4  # 3+3+3+1
    loop, job = pool.read(str(tmp_path / "loop")), pool.read(str(built))
    for column in ("prompt_id", "prompt_index", "prompt", "seeds", "rank", "winner", "loser", "latent_index"):
        assert loop.column(column).to_pylist() == job.column(column).to_pylist(), column
    np.testing.assert_allclose(np.asarray(loop.column("scores").to_pylist()),
                               np.asarray(job.column("scores").to_pylist()), rtol=1e-5)
    assert_same_latents(pool.latents_of(loop), pool.latents_of(job))  # in this process and on actors
    for side in ("image_w", "image_l"):
        for a, b in zip(loop.column(side).to_pylist(), job.column(side).to_pylist()):
            assert_same_pixels(pool.png_image(a), pool.png_image(b), side)


def test_a_generator_actor_killed_mid_run_is_replaced(built, work, tmp_path):
    """SIGKILL the generator actor's process once the first part is written: Ray Data starts another
    actor, the pool completes, and every prompt has exactly one row (done_prompt_ids refuses doubles)."""
    import threading

    import psutil

    output = tmp_path / "actor-killed"
    killed: list[int] = []

    def kill_after_first_part():
        deadline = time.time() + 240
        while time.time() < deadline and not list(output.glob("part-*.parquet")):
            time.sleep(0.05)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if "MapBatches(RowMaker)" in " ".join(proc.info["cmdline"] or []):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])

    killer = threading.Thread(target=kill_after_first_part)
    killer.start()
    assert build_pool.main(settings(work, output, "rows_per_file=1", "steps=8", "--no-mlflow")) == 0
    killer.join()
    assert killed, "no generator actor was killed"
    st = pool.state(str(output))
    ids = pool.done_prompt_ids(str(output), st.parts)
    assert st.complete is not None and len(st.parts) == len(PROMPTS) and len(ids) == len(PROMPTS)
    assert pool.read(str(output)).column("prompt_id").to_pylist() == pool.read(str(built)).column("prompt_id").to_pylist()


def test_keep_pair_with_loser_rank_and_long_prompt_warning(ray_local, work, tmp_path, capsys):
    prompts = tmp_path / "long.txt"
    prompts.write_text("a red circle\n" + "a blue square " * 30 + "\n")
    output = tmp_path / "pair"
    args = settings(work, output, "keep=pair", "loser_rank=2", "--no-mlflow")
    args[0] = f"prompts={prompts}"
    assert build_pool.main(args) == 0
    assert "1 prompt(s) are longer than the text encoder's 77 tokens and will be truncated" in capsys.readouterr().err
    table = pool.read(str(output))
    assert pool.latents_of(table).shape == (2, 2, 4, 16, 16)
    for row in pool.without_latents(table).to_pylist():
        assert row["loser"] == row["rank"][1] and row["latent_index"] == [row["winner"], row["loser"]]


def test_output_holding_another_pool_is_refused(built, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    assert build_pool.main(settings(built.parent, built, "seed=1")) == 2
    err = capsys.readouterr().err
    assert "holds a pool written with another config (seed: 0 there, 1 now)" in err
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == before


@pytest.mark.parametrize("case, message", [
    ("empty", "no prompts (the file is empty"),
    ("blank", "no prompts (the file is empty or holds only blank lines)"),
    ("latin1", "prompts.txt:2: not UTF-8"),
    ("duplicate_ids", "duplicate prompt id 'a'"),
    ("one_image", "pool.images_per_prompt: must be at least 2"),
    ("loser_rank", "pool.loser_rank: must be between 2 and images_per_prompt=4 (got 5)"),
    ("missing_model", "model: /nonexistent/sd15 does not exist"),
    ("not_a_pipeline", "is not a diffusers pipeline folder (no model_index.json)"),
    ("other_pipeline", "is not a Stable Diffusion pipeline"),
    ("bad_scorer", "scorer_model: could not load"),
    ("missing_scorer", "scorer_model: /nonexistent/pickscore does not exist"),
    ("non_pool_output", "is not empty and holds no pool"),
])
def test_bad_input_fails_early_and_writes_nothing(tmp_path, capsys, case, message):
    good = tmp_path / "prompts.txt"
    good.write_text("a red circle\na blue square\n")
    output = tmp_path / "out"
    extra: list[str] = []
    if case == "empty":
        good.write_text("")
    elif case == "blank":
        good.write_text("\n  \n\n")
    elif case == "latin1":
        good.write_bytes("a red circle\ncafé\n".encode("latin-1"))
    elif case == "duplicate_ids":
        good = tmp_path / "prompts.jsonl"
        good.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    elif case == "one_image":
        extra = ["images_per_prompt=1"]
    elif case == "loser_rank":
        extra = ["loser_rank=5"]
    elif case == "missing_model":
        extra = ["model=/nonexistent/sd15"]
    elif case == "not_a_pipeline":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "unet").mkdir()
        extra = [f"model={tmp_path / 'folder'}"]
    elif case == "other_pipeline":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "model_index.json").write_text('{"_class_name": "FluxPipeline", "transformer": ["x", "y"]}')
        extra = [f"model={tmp_path / 'folder'}"]
    elif case == "bad_scorer":
        (tmp_path / "scorer").mkdir()
        (tmp_path / "scorer" / "config.json").write_text("{not json")
        extra = [f"scorer_model={tmp_path / 'scorer'}", f"scorer_processor={embedded.scorer_dir()}"]
    elif case == "missing_scorer":
        extra = ["scorer_model=/nonexistent/pickscore"]
    elif case == "non_pool_output":
        output.mkdir()
        (output / "notes.txt").write_text("mine")
    args = [f"prompts={good}", f"output={output}", f"images_per_prompt={N}", "steps=2", "--no-mlflow", *extra]
    assert build_pool.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    if case == "non_pool_output":
        assert [p.name for p in output.iterdir()] == ["notes.txt"]
    else:
        assert not output.exists()


def test_input_blocks_stay_within_a_part_and_one_output_block():
    """A block's rows must stay one Ray Data block (128 MiB) with room to spare: at the paper's shapes
    (N = 20 latents of 4x128x88 float16, 1.8 MB, and two 704x1024 images, 4.3 MB) that is 10 prompts."""
    from hgdpo.pool.build import block_size
    from hgdpo.pool.config import PoolConfig

    paper = {"latent_shape": [20, 4, 128, 88], "width": 704, "height": 1024}
    cfg = PoolConfig(prompts="p.txt", output="out", generator_actors=8, rows_per_file=64)
    assert block_size(cfg, paper, 100_000) == 10
    world = {"latent_shape": [20, 4, 16, 16], "width": 64, "height": 64}
    assert block_size(cfg, world, 100_000) == 64  # rows_per_file bounds it
    assert block_size(PoolConfig(prompts="p.txt", output="out"), world, 10) == 3  # every actor busy to the end
