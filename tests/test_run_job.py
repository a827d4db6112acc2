"""The end-to-end job (the README's main command) on tiny settings: pool -> HG-DPO -> evaluation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hgdpo.models.lora import INFO_FILE
from hgdpo.pool import store as pool
from hgdpo.world.prompts import write_prompts

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
import run as run_job  # noqa: E402

TINY = ["pool.images_per_prompt=4", "pool.steps=4", "pool.max_prompts=4", "pool.rows_per_file=2",
        "train.max_steps=2", "train.global_batch=2", "train.micro_batch=1", "train.checkpoint_every=1",
        "train.metrics_every=1", "evaluate.steps=4", "evaluate.images_per_prompt=1", "evaluate.bootstrap=100",
        "evaluate.max_prompts=3", "evaluate.picture_prompts=2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    write_prompts(tmp / "train.txt", 6, split="train", seed=3)
    write_prompts(tmp / "test.txt", 3, split="test", seed=3)
    return tmp


def main(work: Path, *extra: str) -> int:
    """examples/run.yaml with the stages shrunk, and this test's prompts, output and MLflow store."""
    return run_job.main(["--config", str(REPO / "examples" / "run.yaml"), f"output={work / 'out'}",
                         f"train_prompts={work / 'train.txt'}", f"test_prompts={work / 'test.txt'}",
                         f"mlflow_uri=sqlite:///{work / 'mlflow.db'}", *TINY, *extra])


@pytest.fixture(scope="module")
def finished(ray_local, work):
    assert main(work) == 0
    return work / "out"


def test_the_run_writes_every_stage_wired_together(finished, capsys):
    meta = pool.read_meta(finished / "pool")
    assert meta["num_prompts"] == 4 and meta["images_per_prompt"] == 4
    assert pool.state(finished / "pool").complete is not None
    info = json.loads((finished / "train" / "adapter" / INFO_FILE).read_text())
    assert info["pool"] == str(finished / "pool") and info["config"]["max_steps"] == 2
    report = json.loads((finished / "evaluate" / "report.json").read_text())
    assert report["config"]["adapter"] == str(finished / "train" / "adapter")
    assert report["config"]["alpha"] == 1.0  # from examples/run.yaml's evaluate section
    assert set(report["result"]["win_rates"]) == {"judge", "pickscore"}
    assert report["result"]["comparisons"] == 3


def test_the_run_keeps_what_it_printed_in_a_log_file_beside_its_stages(finished):
    (log,) = (finished / "logs").glob("run-*.log")
    text = log.read_text()
    assert "pool: 4/4 prompts done (100%)" in text and "train: adapter written to" in text
    assert "evaluate: 3/3 prompts done (100%)" in text and "  judge: A wins " in text and "run: pool " in text
    # Not a terminal: Ray Data prints no progress dumps and no notices; the stages' own lines say it (hgdpo.infra.quiet).
    assert "logging_progress.py" not in text and "streaming_executor.py" not in text


def test_the_mlflow_store_holds_a_run_per_stage(finished, work):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    for experiment in ("hgdpo-pool", "hgdpo-train", "hgdpo-evaluate"):
        exp = client.get_experiment_by_name(experiment)
        assert exp is not None and len(client.search_runs([exp.experiment_id])) == 1, experiment


def test_rerun_does_nothing_and_prints_the_table(finished, work, capsys):
    stamp = (finished / "evaluate" / "report.json").stat().st_mtime_ns
    assert main(work) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "already trained" in out and "already holds this evaluation" in out
    # The run ends with the short report; the full one is the evaluation's table.md.
    report = json.loads((finished / "evaluate" / "report.json").read_text())["result"]
    judge = report["win_rates"]["judge"]
    assert f"  judge: A wins {100 * judge['rate']:.1f}% (95% interval {100 * judge['low']:.1f} to " in out
    assert "  A's colours against B's: hue " in out and f"the full report: {finished / 'evaluate' / 'table.md'}" in out
    assert "| colour | H | S | V |" in (finished / "evaluate" / "table.md").read_text()
    assert (finished / "evaluate" / "report.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("extra, message", [
    (["pool.bogus=1"], "run.pool.bogus: unknown setting"),
    (["train.pool=/elsewhere"], "run.train.pool: set by the run itself"),
    (["pool.model=/another/model"], "run.pool.model: set by the run itself"),  # the pool is the run.model's
    (["evaluate.scorers=[judge,nope]"], "run.evaluate.scorers[1]: unknown scorer"),
    (["train.loser_rank=1"], "run.train.loser_rank"),
    (["other.steps=3"], "unknown section 'other'"),
])
def test_bad_settings_are_refused_before_any_work(work, tmp_path, capsys, extra, message):
    code = run_job.main(["--config", str(REPO / "examples" / "run.yaml"), f"output={tmp_path / 'out'}", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_test_prompt_the_judge_cannot_read_is_refused_before_the_pool(work, tmp_path, capsys):
    (tmp_path / "foreign.txt").write_text("a portrait of a smiling woman\n")
    code = run_job.main(["--config", str(REPO / "examples" / "run.yaml"), f"output={tmp_path / 'out'}",
                         f"train_prompts={work / 'train.txt'}", f"test_prompts={tmp_path / 'foreign.txt'}"])
    assert code == 2 and "judge" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
