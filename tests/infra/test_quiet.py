"""What a job prints (hgdpo.infra.quiet): Ray's repeated notices dropped where Ray forwards worker lines, Ray Data's
progress dumps off when the output is not a terminal, the job's own lines kept."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hgdpo.infra.quiet import NOISE

PROBE = """
import json, sys
from hgdpo.infra.quiet import quiet_libraries
quiet_libraries()  # before Ray is imported, as the stages call it
import logging
import ray.data
from ray._private.ray_logging import stdout_deduplicator
lines = [
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing.",
    "[2026-12-01 21:55:53,861 E 5061 5153] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' has "
    "constructor arguments in the object store and max_restarts > 0. If the arguments go out of scope...",
    "train: step 15/300 loss 0.6931 (dpo 0.6931, stat 0) accuracy 0.500",
]
kept = [l for b in stdout_deduplicator.deduplicate({"ip": "x", "pid": 1, "lines": lines}) for l in b["lines"]]
import io
from ray._private.worker import print_worker_logs
printed = io.StringIO()
print_worker_logs({"ip": "x", "localhost": "x", "pid": 7, "task_name": "RayTrainWorker", "lines": kept}, printed)
context = ray.data.DataContext.get_current()
console = [h.level for h in logging.getLogger("ray.data").handlers if type(h).__name__ != "SessionFileHandler"]
print(json.dumps({"kept": kept, "bars": context.enable_progress_bars, "console": console,
                  "printed": printed.getvalue()}))
"""


def test_rays_repeated_notices_are_dropped_and_a_jobs_lines_kept():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["kept"] == ["train: step 15/300 loss 0.6931 (dpo 0.6931, stat 0) accuracy 0.500"]
    assert found["bars"] is False  # stdout is a pipe here: the stages' own progress lines, no dumps
    assert found["printed"].endswith("pid=7) train: step 15/300 loss 0.6931 (dpo 0.6931, stat 0) accuracy 0.500\n")
    assert "\x1b[" not in found["printed"], found["printed"]  # no colour codes in a log file
    assert found["console"] and all(level >= 30 for level in found["console"])  # WARNING and up on the console
    assert len(NOISE) == 2


def test_a_stage_shows_its_progress_per_5_percent_at_its_end_and_after_a_quiet_minute():
    from hgdpo.infra.quiet import show_progress

    shown, lines = 0, []
    for done in range(1, 301):  # 300 prompts arriving one by one, quickly
        if show_progress(done, 300, shown, since=1.0):
            shown = done * 20 // 300
            lines.append(done)
    assert lines == list(range(15, 301, 15))  # 20 lines: 5%, 10%, ... 100%
    assert show_progress(3, 100_000, 0, since=61.0)  # a big run's stage still speaks once a minute
    assert not show_progress(3, 100_000, 0, since=59.0)


def test_pool_progress_rate_and_time_left_from_whole_parts_after_the_first(monkeypatch):
    """Rows arrive a part at a time; the rate and the time left come from the parts after the first
    (whose time is start-up), not from the start, nor from two rows of one part a millisecond apart."""
    from hgdpo.pool import build as pool_builder
    from hgdpo.pool.config import PoolConfig

    clock = [0.0]
    monkeypatch.setattr(pool_builder.time, "perf_counter", lambda: clock[0])
    lines: list[str] = []
    progress = pool_builder.Progress(PoolConfig(prompts="p", output="o", images_per_prompt=2), total=40, done=0,
                                     log=lines.append)
    for part in range(3):  # 8 prompts a part: the first after 30 s of start-up, then one every 10 s
        clock[0] = 30.0 + 10 * part
        for row in range(8):
            clock[0] += 0.001
            progress.row(f"part-{part}", 8)
        if part == 0:
            assert lines[-1] == "pool: 8/40 prompts done (20%)"  # no estimate from start-up alone
    assert lines[-1].startswith("pool: 24/40 prompts done (60%)")
    # 16 prompts x 2 images in the 20 s after the first part: 1.6 images/s; 16 prompts x 2 left: 20 s
    assert lines[-1].endswith(", 1.60 images/s, 20 s left"), lines[-1]
    clock[0] = 0.0
    doubled = pool_builder.Progress(PoolConfig(prompts="p", output="o", images_per_prompt=2,
                                               hard_negatives=["replace"]), total=40, done=0, log=lines.append)
    for part in range(3):
        clock[0] = 30.0 + 10 * part
        for row in range(8):
            clock[0] += 0.001
            doubled.row(f"part-{part}", 8)
    assert lines[-1].endswith(", 3.20 images/s, 20 s left"), lines[-1]  # each seed's negative counts


def test_steady_rate_with_a_slow_start_and_two_actors_gives_the_right_time_left():
    """A fake clock: two actors load for 60 s, then each finishes a 10-image part every 5 s. The rate
    from the start would say 2.0 images/s at 100 s; the steady rate is 4.0 from the first estimate on."""
    from hgdpo.infra.progress import SteadyRate, duration

    rate = SteadyRate(actors=2)
    assert rate.rate() is None and rate.seconds_left(100) is None
    rate.part(10, 60.0)
    rate.part(10, 60.2)  # the first wave: start-up
    rate.part(10, 65.0)
    assert rate.rate() is None  # one part after the wave is not yet an estimate with two actors
    rate.part(10, 65.2)
    assert rate.rate() == pytest.approx(20 / 5.0)
    for k in range(2, 9):
        rate.part(10, 60.0 + 5 * k)
        rate.part(10, 60.2 + 5 * k)
    assert rate.rate() == pytest.approx(4.0)
    assert rate.seconds_left(400) == pytest.approx(100.0) and duration(rate.seconds_left(400)) == "2 min"
    assert duration(None) == "?" and duration(30) == "30 s" and duration(7200) == "2.0 h"


def test_steady_rate_counts_rows_delivered_together_as_one_delivery():
    """Ray Data hands the driver a block of rows at once: 25 rows a few microseconds apart, every 10 s.
    Timed row by row, three rows of one block said 12,000 images/s; the rate is 25 rows x 4 images / 10 s."""
    from hgdpo.infra.progress import SteadyRate

    rate = SteadyRate(actors=2)
    for block in range(8):
        for row in range(25):
            rate.part(4, 30.0 + 10 * block + 1e-5 * row)
    assert rate.rate() == pytest.approx(10.0)
    assert rate.seconds_left(100) == pytest.approx(10.0)


def test_steady_rate_follows_a_recent_window():
    """The rate is the recent one: after the work slows to half, an hour later it says so."""
    from hgdpo.infra.progress import SteadyRate

    rate = SteadyRate(actors=1, window_s=300.0)
    t = 0.0
    for _ in range(60):  # an hour at 1 image/s
        t += 60.0
        rate.part(60, t)
    assert rate.rate() == pytest.approx(1.0)
    for _ in range(60):  # then an hour at 0.5 image/s
        t += 120.0
        rate.part(60, t)
    assert rate.rate() == pytest.approx(0.5)


STARTUP = """
import sys
from hgdpo.infra.quiet import quiet_libraries
quiet_libraries()
from hgdpo.infra.raycluster import ensure_ray
import mlflow, ray
ensure_ray()
mlflow.MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}").search_experiments()  # creates the store
ray.shutdown()
print("done")
"""


def test_a_local_ray_and_a_new_mlflow_store_start_without_notices(tmp_path):
    """Ray's notice that token authentication is on (its default) and MLflow's INFO lines about creating
    its tables stay out of a job's output."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_LOGGING_LEVEL")}
    out = subprocess.run([sys.executable, "-c", STARTUP, str(tmp_path / "mlflow.db")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
    assert (tmp_path / "mlflow.db").exists()
    assert "Token authentication" not in out.stderr and "MLflow database tables" not in out.stderr, out.stderr
