"""Every stage on a Ray cluster of two nodes that share nothing but Ray and an object store.

The module starts real components once: an S3-compatible server (moto, the session's), an MLflow
tracking server with `cluster/start_mlflow.sh` whose artifacts go to the bucket, and a Ray cluster
of a head (no CPUs: it runs only drivers, like the KubeRay head) and a worker node, each with its
own temp dir. The nodes get the store's credentials, and the tracking URI as MLFLOW_TRACKING_URI,
from their environment, as `cluster/ray-cluster.yaml` gives them; jobs name no MLflow URI.

* ``jobs/run.py`` (pool -> train -> evaluate) and then ``jobs/sweep.py`` on its pool, both with
  ``ray job submit`` and every output an ``s3://`` URI: everything lands in the bucket, the
  training workers (rank 0 included) run on the other node than the driver, nothing is left on
  the local disk outside Ray's temp dirs, MLflow has the runs and their artifacts, and the fake
  secret appears in no output, no MLflow parameter or tag, and no log.
* The trainer killed mid-run and submitted again resumes from its checkpoint in the bucket and
  ends with the adapter of the uninterrupted run.
* Bad input (an unreachable endpoint, a missing bucket, wrong or missing credentials, a sqlite
  store on two nodes) is refused with exit 2, naming the setting, before any model is loaded,
  leaving nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from servers import ACCESS_KEY, REPO, SECRET_KEY, clean_env, start_mlflow, start_ray_cluster, start_s3

pytestmark = pytest.mark.cluster

BUCKET = "hgdpo-multinode"
RUN = f"s3://{BUCKET}/runs/demo"
# The run's training: long enough to be killed half-way (a checkpoint every 4 of 20 steps: once the first is
# registered, 16 steps are left to find and kill the driver in).
TRAIN = ["max_steps=20", "global_batch=2", "micro_batch=1", "data_shards=2", "workers=2", "checkpoint_every=4",
         "metrics_every=4", "learning_rate=1e-3"]
RUN_ARGS = ["jobs/run.py", "--config", "examples/run.yaml", f"output={RUN}", "pool.images_per_prompt=4",
            "pool.steps=4", "pool.max_prompts=4", "pool.rows_per_file=2", *(f"train.{a}" for a in TRAIN),
            "evaluate.steps=4", "evaluate.images_per_prompt=1", "evaluate.bootstrap=100", "evaluate.max_prompts=3",
            "evaluate.picture_prompts=2"]
SWEEP_ARGS = ["jobs/sweep.py", "--config", "sweeps/pool_size.yaml", f"pool={RUN}/pool",
              f"output=s3://{BUCKET}/sweeps/pool-size", "parameters={pool_size: [2]}",
              "train.max_steps=2", "train.global_batch=2", "train.micro_batch=1", "train.checkpoint_every=1",
              "train.metrics_every=1", "evaluate.steps=4", "evaluate.images_per_prompt=1", "evaluate.bootstrap=100",
              "evaluate.max_prompts=2", "evaluate.picture_prompts=1"]
# What the stages write; none of it may be left on a local disk.
OUTPUT_NAMES = re.compile(r"^(pool\.json|_COMPLETE\.json|part-\d+-\w+\.parquet|state\.json|adapter\.safetensors|"
                          r"optimizer\.pt|pytorch_lora_weights\.safetensors|hgdpo_adapter\.json|report\.json|"
                          r"scores\.parquet|table\.md|side_by_side\.png|trial\.json|sweep\.json|"
                          r"checkpoint_manager_snapshot\.json|pairs\.json|index\.parquet|records-.+\.(bin|parquet)|"
                          r"s3:)$")


@pytest.fixture(scope="module")
def world(s3, tmp_path_factory):
    """The bucket, the tracking server and the two-node cluster; stopped at the end of the module."""
    work = tmp_path_factory.mktemp("multinode")
    s3.client().create_bucket(Bucket=BUCKET)
    (work / "home").mkdir()
    (work / "tmp").mkdir()
    # On the script's default address, this machine's private one: a cluster refuses a loopback server.
    server, url = start_mlflow(work, backend=f"sqlite:///{work / 'tracking' / 'mlflow.db'}",
                               artifacts=f"s3://{BUCKET}/mlartifacts", env=s3.env, host=None)
    # Every node: the store's credentials, the tracking server, and its own HOME and TMPDIR, so the
    # local-disk check below sees everything a job could have left.
    node_env = clean_env(**s3.env, MLFLOW_TRACKING_URI=url, HOME=str(work / "home"), TMPDIR=str(work / "tmp"))
    try:
        cluster = start_ray_cluster(work, node_env)
    except BaseException:
        server.stop()
        raise
    try:
        yield {"work": work, "s3": s3, "mlflow": url, "cluster": cluster}
    finally:
        cluster.stop()
        server.stop()


def job_id(log_text: str) -> str:
    return re.search(r"raysubmit_\w+", log_text).group(0)


@pytest.fixture(scope="module")
def finished(world):
    """run.py, then sweep.py on its pool, each submitted to the cluster and waited for."""
    cluster, work = world["cluster"], world["work"]
    started = time.time()
    code, run_log = cluster.submit(RUN_ARGS, work / "run.log")
    assert code == 0, run_log[-6000:]
    run_s = time.time() - started
    code, sweep_log = cluster.submit(SWEEP_ARGS, work / "sweep.log")
    assert code == 0, sweep_log[-6000:]
    print(f"run job {run_s:.0f}s, sweep job {time.time() - started - run_s:.0f}s")
    return {"run_log": run_log, "sweep_log": sweep_log}


def test_every_stage_writes_to_the_bucket(world, finished):
    s3 = world["s3"]
    keys = s3.keys(BUCKET, "runs/demo/")
    rel = [k.removeprefix("runs/demo/") for k in keys]
    assert {"pool/pool.json", "pool/_COMPLETE.json"} <= set(rel)
    assert len([k for k in rel if re.fullmatch(r"pool/part-\d+-\w+\.parquet", k)]) == 2  # 4 prompts, 2 per file
    assert {"train/adapter/pytorch_lora_weights.safetensors", "train/adapter/hgdpo_adapter.json"} <= set(rel)
    checkpoints = sorted({k.split("/")[3] for k in rel if re.match(r"train/checkpoints/train/checkpoint_\d{8}/", k)})
    assert checkpoints == ["checkpoint_00000016", "checkpoint_00000020"]  # num_to_keep = 2
    assert "train/checkpoints/train/checkpoint_00000020/adapter/hgdpo_adapter.json" in rel  # the final one
    assert {f"evaluate/{f}" for f in ("report.json", "table.md", "scores.parquet/_COMPLETE.json", "side_by_side.png")} <= set(rel)
    # The pair dataset the training workers read (by ranged GETs), beside train/.
    pairs = {k.split("/")[0] for k in rel if re.fullmatch(r"pairs-\w+/pairs\.json", k)}
    assert len(pairs) == 1 and {f"{next(iter(pairs))}/index.parquet"} <= set(rel)
    assert not [k for k in keys if "/.tmp-" in k], "a temporary object was left behind"
    sweep = [k.removeprefix("sweeps/pool-size/") for k in s3.keys(BUCKET, "sweeps/pool-size/")]
    assert {"sweep.json", "table.md"} <= set(sweep)
    assert {f"trials/pool_size=2/{f}" for f in ("trial.json", "result.json", "eval/report.json",
                                                "train/adapter/hgdpo_adapter.json")} <= set(sweep)
    assert any(k.startswith("tune/") for k in sweep), "Tune's own state is not in the bucket"
    assert any(re.fullmatch(r"pairs-\w+/pairs\.json", k) for k in sweep), "the sweep's pair dataset is not in the bucket"
    assert "| pool_size=2 | 2 |" in finished["sweep_log"]


def test_the_outputs_read_back_from_the_bucket(world, finished, s3_env):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from hgdpo.infra import storage
    from hgdpo.models import embedded
    from hgdpo.models.sampling import image_seeds
    from hgdpo.pool import store as pool
    from hgdpo.prompts import read_prompts

    table = pool.read(f"{RUN}/pool")
    assert table.num_rows == 4 and table.column_names == [f.name for f in pool.schema((4, 4, 8, 8))]
    prompts = read_prompts(REPO / "examples" / "world-train.txt", max_prompts=4)
    assert table.column("prompt").to_pylist() == [p.text for p in prompts]
    for row in table.select(["prompt_id", "seeds", "scores", "rank", "winner", "loser", "image_w"]).to_pylist():
        assert row["seeds"] == image_seeds(0, row["prompt_id"], 4) and sorted(row["rank"]) == [0, 1, 2, 3]
        assert row["winner"] == row["rank"][0] == int(np.argmax(row["scores"])) and row["loser"] == row["rank"][-1]
        assert row["image_w"][:8] == b"\x89PNG\r\n\x1a\n"
    report = storage.read_json(f"{RUN}/evaluate/report.json")
    assert report["config"]["adapter"] == f"{RUN}/train/adapter" and report["result"]["comparisons"] == 3
    info = storage.read_json(f"{RUN}/train/adapter/hgdpo_adapter.json")
    assert info["pool"] == f"{RUN}/pool" and info["config"]["output"] == f"{RUN}/train"
    with storage.local_copy(f"{RUN}/train/adapter") as local:
        ups = [v for k, v in load_file(str(local / "pytorch_lora_weights.safetensors")).items() if "lora_B" in k
               or "lora.up" in k]
        assert ups and any(float(v.abs().max()) > 0 for v in ups), "the LoRA up-projections never left zero"
        pipe = StableDiffusionPipeline.from_pretrained(embedded.pipeline_dir(), safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.load_lora_weights(str(local))
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    assert torch.isfinite(torch.tensor(report["result"]["win_rates"]["judge"]["rate"]))


def test_training_ran_away_from_the_driver_and_trials_beside_it(world, finished):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    url = world["cluster"].dashboard
    jobs = JobSubmissionClient(url)
    driver = jobs.get_job_info(job_id(finished["run_log"])).driver_node_id
    workers = list_actors(address=url, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
    assert workers, "no Ray Train worker was recorded"
    assert driver and all(a.node_id != driver for a in workers), \
        f"a training worker ran on the driver's node {driver}: {[a.node_id for a in workers]}"
    # A sweep trial's coordinator runs on the head, where the driver's working directory is.
    sweep_driver = jobs.get_job_info(job_id(finished["sweep_log"])).driver_node_id
    trials = list_actors(address=url, filters=[("class_name", "=", "ImplicitFunc")], detail=True, limit=100)  # Tune's
    assert trials and all(a.node_id == sweep_driver for a in trials), [a.node_id for a in trials]


def test_nothing_is_left_on_the_local_disk(world, finished):
    """No stage output outside Ray's temp dirs (in the nodes' HOME and TMPDIR), and no stray ``s3:``
    folder or pool/adapter file inside them either (the jobs' working dirs are there)."""
    work, cluster = world["work"], world["cluster"]
    found = []
    for top in (work, *map(Path, cluster.temp_dirs)):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d not in (".venv", ".git", "tracking")]
            inside_ray = any(dirpath.startswith(t) for t in cluster.temp_dirs)
            for name in dirnames + filenames:
                if not OUTPUT_NAMES.match(name):
                    continue
                if inside_ray and name not in ("s3:", "pool.json", "hgdpo_adapter.json", "report.json", "sweep.json",
                                               "trial.json", "pytorch_lora_weights.safetensors"):
                    continue  # Ray Train / Tune's own staging of their state
                found.append(os.path.join(dirpath, name))
    assert not found, f"stage outputs on the local disk: {found[:10]}"


def test_mlflow_runs_and_artifacts_are_on_the_server(world, finished):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=world["mlflow"])
    runs = {}
    for name in ("hgdpo-pool", "hgdpo-train", "hgdpo-evaluate", "hgdpo-sweep"):
        exp = client.get_experiment_by_name(name)
        assert exp is not None, name
        runs[name] = client.search_runs([exp.experiment_id])
    assert len(runs["hgdpo-pool"]) == 1 and len(runs["hgdpo-evaluate"]) == 1
    assert len(runs["hgdpo-sweep"]) == 2  # the parent and one run per trial
    (train_run,) = [r for r in runs["hgdpo-train"] if r.data.tags.get("output") == f"{RUN}/train"]
    # Logged by rank 0, on the worker node, straight to the server.
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "loss")] == list(range(4, 21, 4))
    pool_files = {a.path for a in client.list_artifacts(runs["hgdpo-pool"][0].info.run_id)}
    assert {"pairs.png", "pool.json"} <= pool_files
    assert "adapter/pytorch_lora_weights.safetensors" in {
        a.path for a in client.list_artifacts(train_run.info.run_id, "adapter")}
    assert {"evaluation/report.json", "evaluation/table.md", "evaluation/side_by_side.png"} <= {
        a.path for a in client.list_artifacts(runs["hgdpo-evaluate"][0].info.run_id, "evaluation")}
    stored = world["s3"].keys(BUCKET, "mlartifacts/")
    assert any(k.endswith("/pairs.png") for k in stored) and any(k.endswith("/evaluation/report.json") for k in stored)


def test_the_secret_appears_in_no_output_parameter_or_log(world, finished):
    import mlflow

    s3, cluster = world["s3"], world["cluster"]
    leaks = []
    for key in s3.keys(BUCKET):  # every object: JSON, parquet, pickles of Tune's state, weights
        blob = s3.read(BUCKET, key)
        if SECRET_KEY.encode() in blob or ACCESS_KEY.encode() in blob:
            leaks.append(f"s3://{BUCKET}/{key}")
    client = mlflow.MlflowClient(tracking_uri=world["mlflow"])
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id]):
            values = " ".join(list(r.data.params.values()) + list(r.data.tags.values()))
            if SECRET_KEY in values or ACCESS_KEY in values:
                leaks.append(f"MLflow run {r.info.run_name}")
    logs = {"run job": finished["run_log"], "sweep job": finished["sweep_log"]}
    for temp in cluster.temp_dirs:
        for path in Path(temp).glob("session_*/logs/**/*"):
            if path.is_file():
                logs[str(path)] = path.read_text(errors="replace")
    leaks += [f"log {name}" for name, text in logs.items() if SECRET_KEY in text]
    assert not leaks, leaks


def test_a_killed_training_job_resumes_from_the_bucket(world, finished, s3_env):
    """SIGKILL the trainer's driver once a checkpoint is in the bucket; the same submission again resumes
    from the bucket's checkpoint and ends with the adapter the uninterrupted run (run.py's) wrote."""
    import psutil
    from safetensors.torch import load_file

    from hgdpo.infra import storage

    cluster, work = world["cluster"], world["work"]
    output = f"s3://{BUCKET}/runs/killed"
    # run.yaml's train section with TRAIN on top, as the run's training had it.
    args = ["jobs/train.py", f"pool={RUN}/pool", f"output={output}", "objective=hgdpo", "beta=2500",
            "lambda_stat=10000", *TRAIN]
    run_train = storage.read_json(f"{RUN}/train/adapter/hgdpo_adapter.json")["config"]
    # Ray Train registers a checkpoint in its snapshot once the upload is whole; kill after that.
    registered = f"{output}/checkpoints/train/checkpoint_manager_snapshot.json"
    job = cluster.submit(args, work / "killed.log", wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and not storage.exists(registered):
        time.sleep(0.2)
    assert storage.exists(registered), (work / "killed.log").read_text()[-3000:]
    commands = {p: " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["pid", "cmdline"])}
    drivers = [p for p, c in commands.items() if "jobs/train.py" in c and output in c and "job submit" not in c]
    assert drivers, "the trainer's driver process was not found"
    for p in drivers:
        os.kill(p.pid, signal.SIGKILL)
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(cluster.dashboard)
    while jobs.get_job_status(job) not in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED):
        time.sleep(0.5)
    assert jobs.get_job_status(job) == JobStatus.FAILED
    assert not storage.exists(f"{output}/adapter/hgdpo_adapter.json"), "the job finished before it was killed"
    done = sorted(n for n in storage.listdir(f"{output}/checkpoints/train") if re.fullmatch(r"checkpoint_\d{8}", n))
    assert done and done[-1] < "checkpoint_00000020", f"not killed half-way: {done}"
    time.sleep(2)  # Ray frees the dead job's workers

    code, text = cluster.submit(args, work / "resumed.log")
    assert code == 0, text[-6000:]
    assert re.search(r"train: resuming from checkpoint_000000(0[4-9]|1[0-9]) \(step \d+\)", text), text[-3000:]
    resumed = storage.read_json(f"{output}/adapter/hgdpo_adapter.json")
    assert {k: v for k, v in resumed["config"].items() if k != "output"} == \
        {k: v for k, v in run_train.items() if k != "output"}
    with storage.local_copy(f"{output}/adapter") as a, storage.local_copy(f"{RUN}/train/adapter") as b:
        ours, theirs = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (a, b))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert (ours[key] == theirs[key]).all(), key


# ------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def guarded_store(tmp_path_factory):
    """An S3 server that checks credentials (IAM), with a bucket; stopped at the end of the module."""
    store = start_s3(tmp_path_factory.mktemp("s3auth"), auth=True)
    try:
        store.client().create_bucket(Bucket="guarded")
        yield store
    finally:
        store.server.stop()


def _no_model_loading(monkeypatch):
    from hgdpo.models import loading as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad setting was refused")

    monkeypatch.setattr(models, "load_pipeline", refuse)
    monkeypatch.setattr(models, "load_scorer", refuse)


def _main(job: str, args: list[str]) -> tuple[int, str]:
    sys.path.insert(0, str(REPO / "jobs"))
    module = __import__(job)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = module.main(args)
    return code, err.getvalue()


CASES = {
    "unreachable endpoint": ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "run.output",
                             "cannot reach the store's endpoint (AWS_ENDPOINT_URL=http://127.0.0.1:9)"),
    "bucket that does not exist": ({}, "run.output", "the bucket does not exist"),
    "wrong credentials": ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "run.output", "access denied: check the credentials"),
    "missing credentials": ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "run.output",
                            "check the credentials in the environment"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_store_that_cannot_be_used_is_refused_before_any_work(case, guarded_store, monkeypatch, tmp_path):
    env, setting, message = CASES[case]
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    for key, value in {**guarded_store.env, **env}.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    _no_model_loading(monkeypatch)
    bucket = "no-such-bucket-hg" if case == "bucket that does not exist" else "guarded"
    code, err = _main("run", ["--config", str(REPO / "examples" / "run.yaml"), f"output=s3://{bucket}/runs/bad",
                              f"mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert code == 2, err
    assert err.startswith(f"error: {setting}: s3://{bucket}/runs/bad: ") and message in err, err
    assert guarded_store.keys("guarded") == [], "something was written"
    assert not (tmp_path / "mlflow.db").exists()
    assert SECRET_KEY not in err and guarded_store.env["AWS_SECRET_ACCESS_KEY"] not in err


def test_a_pool_in_a_bucket_that_does_not_exist_is_refused(guarded_store, monkeypatch, tmp_path):
    for key, value in guarded_store.env.items():
        monkeypatch.setenv(key, value)
    _no_model_loading(monkeypatch)
    code, err = _main("train", ["pool=s3://no-such-bucket-hg/pool", f"output={tmp_path / 'out'}"])
    assert code == 2 and err.startswith("error: train.pool: s3://no-such-bucket-hg/pool: the bucket does not exist"), err
    assert not (tmp_path / "out").exists()


def _on_the_cluster(world, *args: str) -> subprocess.CompletedProcess:
    """A job's command run on this machine against the two-node cluster, as a driver on the head is."""
    env = dict(world["cluster"].env, RAY_ADDRESS=world["cluster"].gcs)
    env.pop("MLFLOW_TRACKING_URI")
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_sqlite_store_on_two_nodes_is_refused_and_the_opt_in_allows_it(world, finished, tmp_path):
    import mlflow

    db = tmp_path / "mlflow.db"
    output = f"s3://{BUCKET}/runs/sqlite-refused"
    result = _on_the_cluster(world, "jobs/run.py", "--config", "examples/run.yaml", f"output={output}",
                             f"mlflow_uri=sqlite:///{db}")
    assert result.returncode == 2, result.stderr[-3000:]
    err = result.stderr
    assert f"error: run.mlflow_uri: sqlite:///{db} is a store only this node reaches, but the Ray cluster has 2 nodes" in err
    assert "bash cluster/start_mlflow.sh" in err and "mlflow_allow_local=true" in err
    assert not db.exists() and world["s3"].keys(BUCKET, "runs/sqlite-refused") == []
    result = _on_the_cluster(world, "jobs/train.py", f"pool={RUN}/pool", f"output={output}",
                             "mlflow_uri=http://127.0.0.1:5000")  # a server on the loopback address
    assert result.returncode == 2 and "error: train.mlflow_uri: http://127.0.0.1:5000 is a store only this node " \
        "reaches" in result.stderr, result.stderr[-3000:]
    # With the opt-in the job runs; rank 0, on the other node, cannot reach the store and says so.
    code, text = world["cluster"].submit(
        ["jobs/train.py", f"pool={RUN}/pool", f"output=s3://{BUCKET}/runs/local-store", "max_steps=2",
         "global_batch=2", "micro_batch=1", "data_shards=2", "workers=2", "checkpoint_every=2", "metrics_every=1",
         f"mlflow_uri=sqlite:///{db}", "mlflow_allow_local=true"], tmp_path / "opt-in.log")
    assert code == 0, text[-5000:]
    assert "rank 0 runs on another node than the local MLflow store" in text
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("hgdpo-train").experiment_id])
    assert "adapter/pytorch_lora_weights.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id,
                                                                                                   "adapter")}
    assert client.get_metric_history(run.info.run_id, "loss") == []
