"""Sweeps on Ray Tune: trials end to end, resume after a kill, baseline B made once, one adapter per training,
MLflow parent/nested runs over REST, bad input."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from servers import start_mlflow

from hgdpo.config.core import load_config, read_yaml
from hgdpo.errors import ConfigError
from hgdpo.sweep.config import SweepConfig
from hgdpo.sweep.trials import fitting_trials, trial_peak
from hgdpo.world.prompts import write_prompts

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
import build_pool  # noqa: E402
import sweep as sweep_job  # noqa: E402

PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle on the right",
           "a yellow circle at the bottom", "a purple square in the center", "a black triangle on the left",
           "a red square above a blue circle", "a green circle left of a yellow square"]
# Two steps of 4 pairs; 4 test prompts x 1 seed at 4 sampler steps; each stage at most 1 CPU, so
# two trials fit side by side on the session's 2 CPUs.
TRAIN = {"max_steps": 2, "global_batch": 4, "micro_batch": 2, "data_shards": 2, "learning_rate": 1.0e-3,
         "lora_rank": 4, "metrics_every": 1, "cpus_per_worker": 0.5}
EVAL = {"scorers": ["judge", "pickscore"], "steps": 4, "images_per_prompt": 1, "bootstrap": 200,
        "picture_prompts": 2, "generator_cpus": 0.5, "scorer_cpus": 0.5}
# The tiny sweep's trials: the last two differ only at sampling time (LAN), so they share one adapter.
LISTED = [{"pool_size": 2}, {"pool_size": 4}, {"name": "pool_size=4+lan", "pool_size": 4, "lan": True}]
TRIALS = ["pool_size=2", "pool_size=4", "pool_size=4+lan"]
LAN = (False, False, True)
POOL_SIZES = (2, 4, 4)


@pytest.fixture(scope="module")
def work(ray_local, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert build_pool.main([f"prompts={tmp / 'prompts.txt'}", f"output={tmp / 'pool'}", "images_per_prompt=4",
                            "steps=4", "rows_per_file=4", "--no-mlflow"]) == 0
    write_prompts(tmp / "test.txt", 4, split="test", seed=5)
    return tmp


@pytest.fixture(scope="module")
def server(work):
    """The tracking server as the cluster runs it (``cluster/start_mlflow.sh``) on 127.0.0.1 with a sqlite
    store; its URL."""
    proc, url = start_mlflow(work, backend=f"sqlite:///{work / 'mlflow.db'}", artifacts=str(work / "mlartifacts"))
    try:
        yield url
    finally:
        proc.stop()


def rest(url: str, path: str, body: dict | None = None, **query) -> dict:
    """One MLflow REST call: GET with ``query``, or POST ``body``."""
    address = f"{url}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(address, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def search(url: str, experiment: str, filter_string: str) -> list[dict]:
    exp = rest(url, "experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
    return rest(url, "runs/search", {"experiment_ids": [exp], "filter": filter_string, "max_results": 1000}
                ).get("runs", [])


def tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict) -> dict:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics(run: dict) -> dict:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def sweep_file(work: Path, file: str, **settings) -> Path:
    data = {"name": "tiny", "pool": str(work / "pool"), "output": str(work / "out"),
            "parameters": {"pool_size": [2, 4]}, "train": dict(TRAIN), "evaluate": {"prompts": str(work / "test.txt"),
                                                                                     **EVAL}}
    data.update(settings)
    path = work / file
    path.write_text(yaml.safe_dump(data))
    return path


def run_main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sweep_job.main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def resumed(work, server) -> dict:
    """The tiny sweep killed (as a job) once its first trial is done, then rerun by the same command."""
    config = sweep_file(work, "tiny.yaml", max_concurrent_trials=1, mlflow_uri=server, parameters={}, trials=LISTED)
    trials = work / "out" / "trials"
    with open(work / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "sweep.py"), "--config", str(config)], cwd=work,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        try:
            while time.time() < deadline and proc.poll() is None and not (trials / TRIALS[0] / "result.json").exists():
                time.sleep(0.1)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (trials / TRIALS[0] / "result.json").exists(), (work / "killed.log").read_text()[-3000:]
    assert not (trials / TRIALS[1] / "result.json").exists()
    adapter = trials / TRIALS[0] / "train" / "adapter" / "pytorch_lora_weights.safetensors"
    before = {"adapter": adapter.stat().st_mtime_ns, "result": (trials / TRIALS[0] / "result.json").read_text()}
    code, out, err = run_main("--config", str(config))
    assert code == 0, err
    return {"config": config, "out": out, "before": before, "adapter": adapter, "trials": trials, "url": server,
            "killed_log": (work / "killed.log").read_text()}


def test_each_trial_trains_evaluates_and_reports_the_evaluation(resumed):
    for name, n, lan in zip(TRIALS, POOL_SIZES, LAN):
        folder = resumed["trials"] / name
        result = json.loads((folder / "result.json").read_text())
        report = json.loads((folder / "eval" / "report.json").read_text())
        assert result["metrics"] == report["result"]["metrics"]
        assert {"win_rate_judge", "win_rate_judge_low", "win_rate_pickscore_high", "h_change_pct"} <= set(
            result["metrics"])
        assert result["params"]["pool_size"] == n and result["params"]["loser_rank"] == n
        assert report["config"]["adapter"] == result["adapter"] and report["config"]["lan"] == lan
        assert report["config"]["baseline_adapter"] is None and report["result"]["prompts"] == 4
        info = json.loads((Path(result["adapter"]) / "hgdpo_adapter.json").read_text())
        assert info["plan"]["pool_size"] == n and info["config"]["max_steps"] == 2
    table = (resumed["trials"].parent / "table.md").read_text()
    assert "| pool_size=2 | 2 | false | " in table and "| pool_size=4+lan | 4 | true | " in table
    assert "judge win rate" in table


def test_baseline_b_is_made_once_per_sweep_and_read_by_every_trial(resumed):
    """B's images and scores are made by the driver once, before the first trial, and never again (not by the
    trials, not by the rerun); every trial's evaluation reads them and makes only A's images."""
    import pyarrow.parquet as pq

    output = resumed["trials"].parent
    caches = sorted((output / "baseline").iterdir())
    assert len(caches) == 1  # one B for the three trials
    info = json.loads((caches[0] / "baseline.json").read_text())
    assert (info["prompts"], info["images"]) == (4, 4)  # 4 test prompts x 1 seed, once
    assert resumed["killed_log"].count("baseline B (") == 1 and "baseline B (" not in resumed["out"]
    assert f"baseline B's images and scores for these settings are in {caches[0]}" in resumed["out"]
    cached = pq.read_table(caches[0] / "rows.parquet").to_pylist()
    for name in TRIALS:
        report = json.loads((resumed["trials"] / name / "eval" / "report.json").read_text())["result"]
        assert report["baseline_cache"] == str(caches[0])
        assert report["metrics"]["generated_images_a"] == 4 and report["metrics"]["generated_images_b"] == 0
        rows = pq.read_table(resumed["trials"] / name / "eval" / "scores.parquet").to_pylist()
        assert [r["image_b"] for r in rows] == [r["png_b"][0] for r in cached]
        assert [r["score_b_pickscore"] for r in rows] == [r["score_b_pickscore"][0] for r in cached]
        assert [r["image_a"] for r in rows] != [r["png_b"][0] for r in cached]  # A's own images
    parent = search(resumed["url"], "hgdpo-sweep", "tags.stage = 'sweep'")[0]
    assert tags(parent)["baseline_cache"] == str(caches[0])
    history = rest(resumed["url"], "metrics/get-history", run_id=parent["info"]["run_id"],
                   metric_key="baseline_images_generated")["metrics"]
    assert [h["value"] for h in history] == [4]  # made by the first invocation only


def test_trials_of_the_same_training_share_one_adapter(resumed):
    trials = resumed["trials"]
    assert sorted(p.parents[2].name for p in trials.glob("*/train/adapter/hgdpo_adapter.json")) == TRIALS[:2]
    assert not (trials / TRIALS[2] / "train").exists()  # it trained nothing
    shared = json.loads((trials / TRIALS[2] / "result.json").read_text())
    assert shared["adapter"] == str(trials / TRIALS[1] / "train" / "adapter") and shared["adapter_trial"] == TRIALS[1]
    assert "has the training of trial pool_size=4: it evaluates that trial's adapter, after it" in resumed["out"]
    metrics = {name: json.loads((trials / name / "result.json").read_text())["metrics"] for name in TRIALS[1:]}
    assert metrics[TRIALS[2]]["h_change_pct"] != metrics[TRIALS[1]]["h_change_pct"]  # with and without LAN


def test_rerun_after_a_kill_finishes_the_rest_and_does_not_retrain_finished_trials(resumed):
    assert f"trial {TRIALS[0]} finished earlier; not rerun" in resumed["out"]
    assert "2 of 3 trials to run" in resumed["out"]
    assert resumed["adapter"].stat().st_mtime_ns == resumed["before"]["adapter"]
    assert (resumed["trials"] / TRIALS[0] / "result.json").read_text() == resumed["before"]["result"]
    assert "sweep tiny: 2 trial(s) run, 1 finished earlier" in resumed["out"]


def test_mlflow_has_one_parent_run_and_one_nested_run_per_trial(resumed):
    url = resumed["url"]
    parents = search(url, "hgdpo-sweep", "tags.stage = 'sweep'")
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    parent = parents[0]["info"]["run_id"]
    assert tags(parents[0])["sweep"] == "tiny" and tags(parents[0])["swept"] == "pool_size,lan"
    children = search(url, "hgdpo-sweep", f"tags.`mlflow.parentRunId` = '{parent}'")
    children.sort(key=lambda c: int(tags(c)["trial_index"]))
    assert [tags(c)["trial"] for c in children] == TRIALS  # no duplicate from the rerun
    for child, name, n, lan in zip(children, TRIALS, POOL_SIZES, LAN):
        assert child["info"]["status"] == "FINISHED" and child["info"]["run_name"] == name
        p = params(child)
        assert {k: p[k] for k in ("pool_size", "loser_rank", "dataset_size", "beta", "lambda_stat", "objective",
                                  "lan", "alpha")} == {
            "pool_size": str(n), "loser_rank": str(n), "dataset_size": "8", "beta": "2500.0", "lambda_stat": "10000.0",
            "objective": "hgdpo", "lan": str(lan), "alpha": "0.5"}
        result = json.loads((resumed["trials"] / name / "result.json").read_text())
        m = metrics(child)
        assert m["win_rate_judge"] == pytest.approx(result["metrics"]["win_rate_judge"])
        assert m["win_rate_pickscore_low"] == pytest.approx(result["metrics"]["win_rate_pickscore_low"])
        report = json.loads((resumed["trials"] / name / "eval" / "report.json").read_text())["result"]
        assert m["generated_images_b"] == 0 and tags(child)["baseline_cache"] == report["baseline_cache"]
        assert tags(child)["adapter"] == result["adapter"]
    first, trainer, sharer = children
    for child in (first, trainer):
        assert "loss" in metrics(child) and "dpo" in metrics(child)  # the trial's training logged into its run
    history = rest(url, "metrics/get-history", run_id=first["info"]["run_id"], metric_key="loss")["metrics"]
    assert sorted(h["step"] for h in history) == [1, 2]  # trained once, not again by the rerun
    # The trial sharing an adapter trained nothing; its run names the adapter and the run that trained it.
    assert "loss" not in metrics(sharer) and tags(sharer)["training"] == tags(trainer)["training"]
    assert tags(sharer)["adapter_trial"] == TRIALS[1] and tags(sharer)["adapter_run_id"] == trainer["info"]["run_id"]
    assert tags(first)["training"] != tags(trainer)["training"] and "adapter_trial" not in tags(trainer)


def test_a_trial_run_starts_when_the_trial_starts(resumed):
    """One trial at a time: each trial's run starts after the one before it has ended, so a run's duration
    is its trial's own, not the time it waited for the others."""
    parent = search(resumed["url"], "hgdpo-sweep", "tags.stage = 'sweep'")[0]
    children = search(resumed["url"], "hgdpo-sweep", f"tags.`mlflow.parentRunId` = '{parent['info']['run_id']}'")
    runs = sorted((c["info"] for c in children), key=lambda r: int(r["start_time"]))
    assert [r["run_name"] for r in runs] == TRIALS
    assert int(parent["info"]["start_time"]) < int(runs[0]["start_time"])
    for before, after in itertools.pairwise(runs):
        assert int(after["start_time"]) >= int(before["end_time"]), (before, after)


def test_rerun_of_a_finished_sweep_runs_nothing(resumed):
    code, out, err = run_main("--config", str(resumed["config"]))
    assert code == 0, err
    assert "sweep tiny: 0 trial(s) run, 3 finished earlier" in out
    assert resumed["adapter"].stat().st_mtime_ns == resumed["before"]["adapter"]
    parent = search(resumed["url"], "hgdpo-sweep", "tags.stage = 'sweep'")
    assert len(parent) == 1
    children = search(resumed["url"], "hgdpo-sweep", f"tags.`mlflow.parentRunId` = '{parent[0]['info']['run_id']}'")
    assert len(children) == 3


def test_hgdpo_duel_compares_two_evaluations_as_the_sweep_does_and_refuses_unpaired_ones(resumed, tmp_path, capsys):
    """`hgdpo duel A B` on two trials' evaluations prints the sweep's own head-to-head row for them; evaluations
    of other seeds, or a folder that is not a finished evaluation, exit 2 naming why."""
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from hgdpo.cli import main as hgdpo

    a, b = (str(resumed["trials"] / name / "eval") for name in (TRIALS[1], TRIALS[0]))
    assert hgdpo(["duel", a, b]) == 0
    printed = capsys.readouterr().out
    swept = (resumed["trials"].parent / "table.md").read_text()
    row = next(line for line in swept.splitlines() if line.startswith(f"| {TRIALS[1]} | {TRIALS[0]} |"))
    assert printed.splitlines()[4] == row.replace(f"| {TRIALS[1]} | {TRIALS[0]} |", f"| {a} | {b} |")
    assert "colour right" in printed.split("Objects head to head")[1]

    other = tmp_path / "other-seeds"
    shutil.copytree(a, other)
    table = pq.read_table(other / "scores.parquet")  # the parts (this also tests the one-file layout)
    shutil.rmtree(other / "scores.parquet")
    pq.write_table(table.set_column(table.schema.get_field_index("seed"), "seed", pc.add(table["seed"], 1)),
                   other / "scores.parquet")
    assert hgdpo(["duel", a, str(other)]) == 2
    assert "not made on the same prompts and seeds" in capsys.readouterr().err
    assert hgdpo(["duel", a, str(tmp_path)]) == 2
    assert "is not a finished evaluation (no report.json)" in capsys.readouterr().err


def test_neighbouring_trials_meet_head_to_head_on_the_same_prompts_and_seeds(resumed):
    """Each trial's adapter against the one before it, and the last against the first: the win rate of A's
    scores over B's on the same (prompt, seed) comparisons, recomputed here from the trials' scores."""
    import pyarrow.parquet as pq

    from hgdpo.report.winrates import win_rate

    def scores(name):
        return pq.read_table(resumed["trials"] / name / "eval" / "scores.parquet").sort_by(
            [("prompt_id", "ascending"), ("k", "ascending")])

    table, objects = (resumed["trials"].parent / "table.md").read_text().split("Head to head")[1].split(
        "Objects head to head")
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| pool_size=")]
    pairs = [(TRIALS[1], TRIALS[0]), (TRIALS[2], TRIALS[1]), (TRIALS[2], TRIALS[0])]
    assert [(r[0].lstrip("| "), r[1]) for r in rows] == pairs
    parent = json.loads((resumed["trials"].parent / "sweep.json").read_text())["parent_run_id"]
    logged = metrics(rest(resumed["url"], "runs/get", run_id=parent)["run"])
    for row, (a, b) in zip(rows, pairs):
        sa, sb = scores(a), scores(b)
        assert sa.column("seed").equals(sb.column("seed")) and sa.num_rows == 4 * EVAL["images_per_prompt"]
        want = win_rate(sa.column("score_a_judge").to_numpy(), sb.column("score_a_judge").to_numpy(),
                        sa.column("prompt_id").to_numpy(), resamples=EVAL["bootstrap"])
        assert row[2] == f"{100 * want.rate:.1f}% [{100 * want.low:.1f}, {100 * want.high:.1f}]"
        key = f"h2h_{TRIALS.index(a)}_over_{TRIALS.index(b)}_judge"
        assert logged[key] == pytest.approx(want.rate) and logged[f"{key}_low"] == pytest.approx(want.low)
    # The world's object-level rates, A's images against B's, on the same comparisons.
    from hgdpo.pool.store import png_image
    from hgdpo.world.objects import object_report, summarize

    object_rows = [line.split(" | ") for line in objects.splitlines() if line.startswith("| pool_size=")]
    assert [(r[0].lstrip("| "), r[1]) for r in object_rows] == pairs
    assert "| A | B | colour right | shape right |" in objects
    for row, (a, b) in zip(object_rows, pairs):
        reports = [[object_report(png_image(png), prompt) for png, prompt in
                    zip(t.column("image_a").to_pylist(), t.column("prompt").to_pylist())] for t in (scores(a), scores(b))]
        want = summarize(*reports, scores(a).column("prompt_id").to_pylist(), resamples=EVAL["bootstrap"])
        assert row[2] == (f"{100 * want['object_colour_acc_diff']:+.1f} [{100 * want['object_colour_acc_diff_low']:+.1f}, "
                          f"{100 * want['object_colour_acc_diff_high']:+.1f}]")
        key = f"h2h_{TRIALS.index(a)}_over_{TRIALS.index(b)}_objects_leakage"
        assert logged[key] == pytest.approx(want["leakage_diff"])


def test_table_command_prints_the_sweep_from_mlflow(resumed):
    proc = subprocess.run([sys.executable, "-m", "hgdpo", "table", "--sweep", "tiny", "--mlflow-uri", resumed["url"]],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    main, duels = proc.stdout.split("Head to head")
    assert "Objects head to head" in duels and "| A | B | colour right |" in duels  # from the parent run's metrics
    lines = main.splitlines()
    assert "| trial | pool_size | lan | judge win rate [interval] | pickscore win rate [interval] | H change " \
           "| S change | V change |" in lines
    rows = [line for line in lines if line.startswith("| pool_size=")]
    assert [r.split(" | ")[1:3] for r in rows] == [["2", "false"], ["4", "false"], ["4", "true"]]
    result = json.loads((resumed["trials"] / TRIALS[1] / "result.json").read_text())["metrics"]
    assert f"{100 * result['win_rate_judge']:.1f}% [{100 * result['win_rate_judge_low']:.1f}, " in rows[1]
    assert rows[1].endswith(f"{result['v_change_pct']:+.2f}% |")
    assert duels == (resumed["trials"].parent / "table.md").read_text().split("Head to head")[1].rstrip("\n") + "\n"
    missing = subprocess.run([sys.executable, "-m", "hgdpo", "table", "--sweep", "nope", "--mlflow-uri",
                              resumed["url"]], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert missing.returncode == 2 and "no sweep named 'nope'" in missing.stderr


def test_a_trial_folder_written_with_other_settings_is_refused(resumed):
    code, _, err = run_main("--config", str(resumed["config"]), "train.max_steps=3")
    assert code == 2 and "was run with other settings (train.max_steps)" in err, err


def test_a_failing_trial_is_reported_and_marked_failed_and_a_rerun_tries_it_again(resumed, work, tmp_path):
    """A trial whose training refuses its output (an adapter of another config there) fails alone."""
    import shutil

    import mlflow

    output = tmp_path / "out"
    shutil.copytree(resumed["trials"] / TRIALS[1] / "train" / "adapter",
                    output / "trials" / TRIALS[0] / "train" / "adapter")  # trained with pool_size=4
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = sweep_file(work, "failing.yaml", name="failing", output=str(output), mlflow_uri=uri,
                        parameters={"pool_size": [2]})
    code, _, err = run_main("--config", str(config))
    assert code == 2, err
    assert "sweep: 1 of 1 trials failed (pool_size=2: HgdpoError: output: " in err
    assert "holds an adapter trained with another config" in err and "rerun the same command" in err
    assert not (output / "trials" / TRIALS[0] / "result.json").exists()
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("hgdpo-sweep").experiment_id
    runs = {r.data.tags["stage"]: r for r in client.search_runs([exp])}
    assert runs["sweep"].info.status == "FAILED" and runs["sweep-trial"].info.status == "FAILED"
    assert "pool_size=2 | 2 | FAILED | FAILED | - | - | - |" in (output / "table.md").read_text()
    code, _, err = run_main("--config", str(config))  # not fixed: tried again, fails again, same runs
    assert code == 2 and "1 of 1 trials failed" in err
    assert len(client.search_runs([exp])) == 2


@pytest.mark.parametrize("case, settings, message", [
    ("unknown", {"parameters": {"pool_sizes": [2]}}, "sweep.parameters.pool_sizes: unknown parameter (did you mean "
                                                     "'pool_size'?)"),
    ("empty", {"parameters": {"beta": []}}, "sweep.parameters.beta: empty list of values"),
    ("not_a_list", {"parameters": {"beta": 2500}}, "sweep.parameters.beta: must be a list of values"),
    ("trial_unknown", {"parameters": {}, "trials": [{"objective": "dpo", "gamma": 1}]},
     "sweep.trials[0].gamma: unknown parameter"),
    ("config_refuses", {"parameters": {"beta": [2500, -1]}}, "sweep trial 'beta=-1': train.beta: must be positive"),
    ("eval_refuses", {"parameters": {"alpha": [0.5, 9]}}, "sweep trial 'alpha=9': evaluate.alpha: must be between"),
    ("pool_size_above_n", {"parameters": {"pool_size": [2, 5]}},
     "sweep trial 'pool_size=5': train.pool_size: 5 is larger than the pool's N=4"),
    ("loser_rank_above_n", {"parameters": {"loser_rank": [2, 5]}},
     "sweep trial 'loser_rank=5': train.loser_rank: must be between 2 and pool_size=4 (got 5)"),
    ("dataset_size", {"parameters": {"dataset_size": [4, 9]}},
     "sweep trial 'dataset_size=9': train.dataset_size: 9 prompts asked, but the pool has 8"),
    ("missing_pool", {"pool": "MISSING"}, "sweep.pool: "),
    ("wired", {"train": {**TRAIN, "output": "x"}}, "sweep.train.output: set by the sweep itself"),
    ("duplicate", {"parameters": {"pool_size": [2, 2]}}, "are both named 'pool_size=2'"),
    ("duel_unknown", {"duels": [["pool_size=4", "pool_size=2"], ["pool_size=4", "pool_size=3"]]},
     "sweep.duels[1]: no trial named 'pool_size=3'"),
    ("duel_shape", {"duels": [["pool_size=4"]]}, "sweep.duels[0]: must be [A trial, B trial]"),
    ("no_test_prompts", {"evaluate": {**EVAL}}, "evaluate.prompts: required"),
    ("grid_pool", {"parameters": {"pool": ["a", "b"]}}, "sweep.parameters.pool: a trial's own pool goes in "
                                                         "`trials:`"),
    ("trial_pool_unnamed", {"parameters": {}, "trials": [{"objective": "dpo", "pool": "elsewhere"}]},
     "sweep: trial 0 trains on its own pool (elsewhere); give it a `name`"),
    ("trial_pool_missing", {"parameters": {}, "trials": [{"name": "own", "objective": "dpo", "pool": "MISSING"}]},
     "sweep trial 'own': train.pool: "),
])
def test_bad_input_is_refused_before_any_work(work, tmp_path, case, settings, message):
    if settings.get("pool") == "MISSING":
        settings = {**settings, "pool": str(tmp_path / "no-pool")}
    for trial in settings.get("trials", []):
        if trial.get("pool") == "MISSING":
            trial["pool"] = str(tmp_path / "no-pool")
    config = sweep_file(work, f"bad-{case}.yaml", output=str(tmp_path / "out"),
                        mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", **settings)
    code, _, err = run_main("--config", str(config))
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


# --- The sweep files: each loads and expands into trials the demo pool can train --------------------

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def test_there_is_a_sweep_file_per_paper_ablation():
    assert {p.stem for p in SWEEPS} >= {"pool_size", "loser_rank", "dataset_size", "beta_sml", "lan_vs_sml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_expands_into_valid_trials_for_the_demo_pool(path, monkeypatch):
    from hgdpo.train.pairs import plan

    monkeypatch.chdir(REPO)  # the files' paths are relative to the checkout, like the examples'

    run = read_yaml(REPO / "examples" / "run.yaml")  # the demo writes the pool the sweeps read
    cfg = load_config(SweepConfig, str(path), [])
    head = path.read_text().split("\nname:")[0]
    if any(t.train.objective == "ospo" for t in cfg.expand()):  # its pool: the demo's settings with hard negatives
        assert f"output={cfg.pool}" in head and "hard_negatives=[replace,swap,drop]" in head
    else:
        assert cfg.pool == f"{run['output']}/pool"
    for listed in cfg.trials:  # a trial's own pool (Table 1's public sets): the header says how it is made
        if "pool" in listed:
            assert f"output={listed['pool']}" in head, listed
    assert cfg.name == path.stem.replace("_", "-")
    assert f"python jobs/sweep.py --config sweeps/{path.name}" in head and f"hgdpo table --sweep {cfg.name}" in head
    trials = cfg.expand()
    assert len(trials) >= 2 and len({t.name for t in trials}) == len(trials)
    meta = {"images_per_prompt": run["pool"]["images_per_prompt"], "num_prompts": run["pool"]["max_prompts"],
            "config": {"keep": "all"}, "fingerprint": {"loser_rank": run["pool"]["images_per_prompt"]}}
    for trial in trials:
        t = trial.train
        if "pool" in trial.values:
            continue  # an imported pool of pairs, N = 2
        plan(meta, pool_size=t.pool_size, loser_rank=t.loser_rank, dataset_size=t.dataset_size,
             data_shards=t.data_shards, global_batch=t.global_batch, seed=t.seed)
        assert Path(trial.evaluate.prompts).is_file() and trial.evaluate.adapter.endswith(f"{trial.name}/train/adapter")
    assert fitting_trials(trials, 2, 0) == 1  # the files' settings take both cores at each trial's peak


def test_the_paper_values_are_swept():
    values = {p.stem: [t.values for t in load_config(SweepConfig, str(p), []).expand()] for p in SWEEPS}
    assert [v["pool_size"] for v in values["pool_size"]] == [2, 5, 10, 20]
    assert [v["loser_rank"] for v in values["loser_rank"]] == [2, 5, 10, 20]
    assert {(v["beta"], v["lambda_stat"]) for v in values["beta_sml"]} == {
        (b, s) for b in (2500, 10000, 50000) for s in (10000, 0)}
    lan = {t.name: (t.train.objective, t.evaluate.lan)
           for t in load_config(SweepConfig, str(REPO / "sweeps" / "lan_vs_sml.yaml"), []).expand()}
    assert lan["dpo+lan"] == ("dpo", True) and lan["hgdpo-sml"] == ("hgdpo", False)


def test_dpo_and_dpo_with_lan_share_one_adapter(monkeypatch):
    """In the LAN ablation, dpo and dpo+lan differ only at sampling time: one training, whose adapter both
    evaluate; hgdpo-sml trains its own."""
    from hgdpo.sweep.trials import share_adapters
    from hgdpo.train.trainer import fingerprint

    monkeypatch.chdir(REPO)
    trials = load_config(SweepConfig, str(REPO / "sweeps" / "lan_vs_sml.yaml"), []).expand()
    trainings = {t.name: fingerprint(t.train, {"fingerprint": {"pool": "demo"}}) for t in trials}
    rewired, shares = share_adapters(trials, trainings)
    assert shares == {"dpo+lan": "dpo"}
    adapters = {t.name: t.evaluate.adapter for t in rewired}
    assert adapters["dpo+lan"] == adapters["dpo"] == trials[0].evaluate.adapter != adapters["hgdpo-sml"]
    assert [t.evaluate.lan for t in rewired] == [False, True, False]


# --- Trial names and concurrency ---------------------------------------------------------------------

def _cfg(**settings) -> SweepConfig:
    from hgdpo.config.core import from_dict

    data = {"name": "t", "pool": "p", "output": "/tmp/o", "evaluate": {"prompts": "x.txt"}}
    data.update(settings)
    return from_dict(SweepConfig, data)


def test_listed_trials_are_crossed_with_the_grid_and_named_by_their_values():
    cfg = _cfg(trials=[{"name": "dpo", "objective": "dpo"}, {"objective": "hgdpo", "lan": False}],
               parameters={"beta": [2500, 1.0e4]})
    assert [t.name for t in cfg.expand()] == ["dpo,beta=2500", "dpo,beta=10000", "objective=hgdpo,lan=false,beta=2500",
                                              "objective=hgdpo,lan=false,beta=10000"]
    trial = cfg.expand()[1]
    assert (trial.train.objective, trial.train.beta) == ("dpo", 10000.0)
    assert trial.train.output == "/tmp/o/trials/dpo,beta=10000/train"
    assert trial.evaluate.adapter == "/tmp/o/trials/dpo,beta=10000/train/adapter"
    with pytest.raises(ConfigError, match="nothing to sweep"):
        _cfg()


def test_a_named_trial_trains_on_its_own_pool_and_says_so():
    from hgdpo.sweep.config import absolute
    from hgdpo.sweep.trials import trial_params
    from hgdpo.train.pairs import plan

    cfg = _cfg(trials=[{"name": "own", "objective": "hgdpo"}, {"name": "public", "objective": "dpo",
                                                               "pool": "/data/public-pool"}])
    own, public = cfg.expand()
    assert public.train.pool == "/data/public-pool" and own.train.pool == absolute("p")  # the sweep's pool
    assert public.evaluate.adapter == "/tmp/o/trials/public/train/adapter"
    pairs = plan({"images_per_prompt": 2, "num_prompts": 16, "config": {"keep": "all"},
                  "fingerprint": {"loser_rank": 2}}, pool_size=None, loser_rank=None, dataset_size=None,
                 data_shards=1, global_batch=4, seed=0)
    assert trial_params(public, pairs)["pool"] == "/data/public-pool" and "pool" not in trial_params(own, pairs)


def test_concurrency_defaults_to_the_trials_that_fit_at_their_peak():
    small = _cfg(parameters={"beta": [1, 2, 3]}, train={"cpus_per_worker": 0.5},
                 evaluate={"prompts": "x.txt", "generator_cpus": 0.5, "scorer_cpus": 0.5}).expand()
    assert trial_peak(small[0]) == (1.0, 0.0)
    assert fitting_trials(small, 2, 0) == 2 and fitting_trials(small, 8, 0) == 3 and fitting_trials(small, 0.5, 0) == 1
    wide = _cfg(parameters={"beta": [1, 2]}, train={"workers": 2, "data_shards": 2, "global_batch": 16},
                evaluate={"prompts": "x.txt", "generator_actors": 2, "generator_cpus": 0.75,
                          "scorer_cpus": 0.5}).expand()
    assert trial_peak(wide[0]) == (2.0, 0.0) and fitting_trials(wide, 2, 0) == 1 and fitting_trials(wide, 4, 0) == 2
    gpu = _cfg(parameters={"beta": [1, 2, 3, 4]}, train={"gpus_per_worker": 1},
               evaluate={"prompts": "x.txt", "generator_gpus": 0.5, "scorer_gpus": 0.5}).expand()
    assert trial_peak(gpu[0]) == (2.0, 1.0) and fitting_trials(gpu, 16, 2) == 2


def test_trials_get_no_copy_of_the_drivers_aws_keys(monkeypatch):
    """Tune copies the driver's AWS keys into every trial's runtime env, which Ray's runtime-env agent logs;
    while a sweep runs its trials it copies none (the nodes have their own)."""
    from ray.tune.execution import class_cache

    from hgdpo.sweep.sweep import _credentials_stay_home

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-to-be-copied")
    assert "AWS_SECRET_ACCESS_KEY" in class_cache.ENV_VARS_TO_PROPAGATE  # Ray's behaviour, which this undoes

    def env_vars() -> dict:
        def trial():
            pass
        return class_cache._ActorClassCache().get(trial)._default_options["runtime_env"]["env_vars"]

    assert env_vars()["AWS_SECRET_ACCESS_KEY"] == "not-to-be-copied"
    with _credentials_stay_home():
        assert "AWS_SECRET_ACCESS_KEY" not in env_vars()
    assert "AWS_SECRET_ACCESS_KEY" in class_cache.ENV_VARS_TO_PROPAGATE
