"""The cluster path: the files in cluster/ stay valid, and a pool job submitted to a real head works.

Static checks (fast): every YAML in cluster/ parses; the cluster-launcher config passes Ray's
own schema validation and installs torch before the project; the KubeRay RayJob runs
jobs/build_pool.py on GPU workers with a pool config that hgdpo still accepts and pip pins that
agree with pyproject.toml; the local-head script is valid bash; the working directory that
`ray job submit --working-dir .` uploads stays under the dashboard's limit and leaves .venv out.

``test_pool_and_train_jobs_on_a_ray_head`` (marker ``cluster``) starts a head with ``ray start --head``,
submits ``jobs/build_pool.py`` and then ``jobs/train.py`` with ``ray job submit``, and reads the pool
and the adapter they wrote. The head is
stopped on its own: never with ``ray stop``, which stops every Ray process of the user on the
machine (the session's ``ray.init()`` from conftest, other people's runs). It runs as
``ray start --block`` in a new process group; SIGTERM makes it stop every process it started,
and whatever is left in its group, or names its temporary directories, is killed by pid.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAML_FILES = sorted(p for p in CLUSTER.iterdir() if p.suffix in (".yaml", ".yml"))
RAY_VERSION = "2.60.0"


def documents(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name}: no YAML documents"
    for d in docs:
        assert isinstance(d, dict), f"{path.name}: a document is not a mapping: {d!r}"
    return docs


def all_documents() -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in documents(p)]


def launcher_configs() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in all_documents() if "provider" in d and "available_node_types" in d]


def of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in all_documents() if d.get("kind") == kind]


def pyproject_requirements() -> dict:
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def pinned(command: str, package: str) -> str | None:
    """The version ``package==X`` is pinned to in a pip command line, else None."""
    for word in shlex.split(command):
        if word.lower().startswith(package.lower() + "=="):
            return word.split("==", 1)[1]
    return None


# ----------------------------------------------------------------------------------- all files


def test_cluster_directory_has_the_deployment_files():
    names = {p.name for p in CLUSTER.iterdir()}
    assert {"start_local_head.sh", "ray-cluster.yaml", "rayjob.yaml"} <= names
    assert launcher_configs(), "no Ray cluster-launcher config in cluster/"
    assert of_kind("RayJob"), "no KubeRay RayJob in cluster/"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_yaml_parses(path):
    documents(path)


# ------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("path,cfg", launcher_configs(), ids=[p.name for p, _ in launcher_configs()])
def test_launcher_config_structure(path, cfg):
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"]
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types, f"head_node_type {head!r} is not one of {sorted(types)}"
    assert types[head]["resources"].get("GPU", 0) == 0, "the head should be a CPU node"
    gpu_workers = [n for n, t in types.items() if n != head and t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers, "no worker node type offers a GPU"
    for name in gpu_workers:
        assert types[name].get("max_workers", 0) >= 1, f"{name}: max_workers must allow a node"
        assert types[name].get("min_workers", 0) <= types[name]["max_workers"]
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]


@pytest.mark.parametrize("path,cfg", launcher_configs(), ids=[p.name for p, _ in launcher_configs()])
def test_launcher_installs_torch_before_the_project(path, cfg):
    commands = cfg["setup_commands"]
    torch_at = [i for i, c in enumerate(commands) if pinned(c, "torch")]
    project_at = [i for i, c in enumerate(commands)
                  if ("pip install" in c and " -e " in f" {c} ") or pinned(c, "hgdpo") or c.split()[-1:] == ["hgdpo"]]
    assert torch_at, f"no `pip install torch==X` in setup_commands: {commands}"
    assert project_at, f"setup_commands never install the project: {commands}"
    assert max(torch_at) < min(project_at), "torch must be installed before the project"
    torch_version = pinned(commands[torch_at[0]], "torch")
    assert pyproject_requirements()["torch"].specifier.contains(torch_version), \
        f"torch=={torch_version} is outside pyproject's {pyproject_requirements()['torch']}"
    assert pinned(commands[torch_at[0]], "torchvision"), "pin torchvision with torch (STACK.md)"


@pytest.mark.parametrize("path,cfg", launcher_configs(), ids=[p.name for p, _ in launcher_configs()])
def test_launcher_syncs_the_repository_without_the_virtualenv(path, cfg):
    mounts = cfg["file_mounts"]
    synced = [remote for remote, local in mounts.items() if local.rstrip("/") in (".", "./")]
    assert synced, f"file_mounts does not sync the checkout ('.'): {mounts}"
    # `pip install -e` must install the directory that is synced.
    assert any(synced[0] in c for c in cfg["setup_commands"]), "setup_commands install another directory"
    excluded = ".gitignore" in cfg.get("rsync_filter", []) or any(".venv" in e for e in cfg.get("rsync_exclude", []))
    assert excluded, "the rsync of the checkout would copy .venv (several GB)"


@pytest.mark.parametrize("path,cfg", launcher_configs(), ids=[p.name for p, _ in launcher_configs()])
def test_launcher_config_passes_rays_schema(path, cfg):
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))
    # The validator is really checking: a misspelt key is refused.
    bad = copy.deepcopy(cfg)
    bad["setup_comands"] = bad.pop("setup_commands")
    with pytest.raises(Exception, match="setup_comands"):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("path,cfg", launcher_configs(), ids=[p.name for p, _ in launcher_configs()])
def test_launcher_uses_this_ray_version_and_consistent_auth(path, cfg):
    import ray

    assert ray.__version__ == RAY_VERSION
    docker = cfg.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if docker.get(key):
            assert f":{RAY_VERSION}" in docker[key], f"docker.{key} is not Ray {RAY_VERSION}"
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head and "--address=" in workers
    # Every node must agree on RAY_AUTH_MODE, or workers cannot join the head.
    for mode in ("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"):
        assert (mode in head) == (mode in workers), f"{mode} on the head but not on the workers (or back)"


# ------------------------------------------------------------------------------------ KubeRay


def rayjob() -> tuple[Path, dict]:
    (found,) = of_kind("RayJob")
    return found


def config_maps(path: Path) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents(path) if d.get("kind") == "ConfigMap"}


def entrypoint_config(spec: dict) -> str:
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["python", "jobs/build_pool.py"], f"entrypoint does not run the pool job: {words}"
    assert "--config" in words, "entrypoint passes no --config"
    return words[words.index("--config") + 1]


def test_rayjob_structure():
    path, job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    entrypoint_config(spec)
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"], "the job needs the repository as working_dir"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert f":{RAY_VERSION}" in head["image"]
    groups = cluster["workerGroupSpecs"]
    gpu_groups = []
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert f":{RAY_VERSION}" in container["image"]
        limits = container.get("resources", {}).get("limits", {})
        if int(limits.get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append(group)
            assert "-gpu" in container["image"], "GPU workers need the CUDA image"
            requests = container["resources"].get("requests", {})
            assert int(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == int(limits["nvidia.com/gpu"])
        assert group.get("minReplicas", 0) <= group["replicas"] <= group.get("maxReplicas", group["replicas"])
    assert gpu_groups, "no worker group requests nvidia.com/gpu"


def test_rayjob_mounts_its_config_map_where_the_entrypoint_reads_it():
    path, job = rayjob()
    config_path = Path(entrypoint_config(job["spec"]))
    head_pod = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head_pod["containers"][0].get("volumeMounts", [])}
    volumes = {v["name"]: v for v in head_pod.get("volumes", [])}
    sources = [volumes[name]["configMap"]["name"] for name, mount in mounts.items()
               if Path(mount) == config_path.parent and "configMap" in volumes.get(name, {})]
    assert sources, f"nothing mounts a ConfigMap at {config_path.parent} on the head (the driver runs there)"
    maps = config_maps(path)
    assert sources[0] in maps, f"ConfigMap {sources[0]!r} is not in {path.name}"
    assert config_path.name in maps[sources[0]]["data"]


def test_rayjob_pool_config_is_accepted_by_hgdpo(tmp_path):
    from hgdpo.config import load_config
    from hgdpo.pool_config import PoolConfig

    path, job = rayjob()
    config_path = Path(entrypoint_config(job["spec"]))
    (data,) = [m["data"] for m in config_maps(path).values() if config_path.name in m["data"]]
    file = tmp_path / config_path.name
    file.write_text(data[config_path.name])
    cfg = load_config(PoolConfig, str(file))
    assert cfg.generator_gpus > 0 and cfg.scorer_gpus > 0, "a GPU cluster config should put the models on GPUs"
    assert "://" in cfg.output or Path(cfg.output).is_absolute(), \
        "output must be shared storage: a relative path lands in one pod's temporary working dir"
    if not Path(cfg.prompts).is_absolute():
        assert (REPO / cfg.prompts).is_file(), f"prompts {cfg.prompts!r} is not in the repository (working_dir)"


def test_rayjob_pip_pins_agree_with_pyproject():
    from packaging.requirements import Requirement

    _, job = rayjob()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    pip = runtime_env.get("pip") or []
    pip = pip.get("packages", []) if isinstance(pip, dict) else pip
    installed = {Requirement(p).name.lower(): Requirement(p) for p in pip}
    assert "torch" in installed and str(installed["torch"].specifier).startswith("=="), "pin torch exactly"
    assert pip.index(next(p for p in pip if Requirement(p).name == "torch")) == 0, "torch first"
    for name, req in pyproject_requirements().items():
        if name == "ray":
            continue  # comes with the rayproject image
        assert name in installed, f"{name} (a dependency of hgdpo) is missing from the RayJob's pip list"
        mine = installed[name].specifier
        if name in ("torch", "torchvision"):
            (version,) = [s.version for s in mine]
            assert req.specifier.contains(version), f"{name}=={version} is outside pyproject's {req}"
        else:
            assert mine == req.specifier, f"{name}: RayJob has {mine}, pyproject.toml has {req.specifier}"


# ----------------------------------------------------------------------- script, working dir


def test_start_script_is_valid_bash_and_safe_by_default():
    script = CLUSTER / "start_local_head.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), "start_local_head.sh is not executable"
    text = script.read_text()
    assert "RAY_HEAD_HOST:-127.0.0.1" in text
    assert "ray job submit --address http://$HOST:$DASHBOARD_PORT --working-dir . -- " \
           "python jobs/build_pool.py --config examples/pool.yaml" in text
    assert "ray stop" in text


def test_working_dir_upload_excludes_the_virtualenv_and_fits(tmp_path):
    """What `ray job submit --working-dir .` would upload, built by Ray's own packaging code."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / "working_dir.zip"
    create_package(str(REPO), target, include_gitignore=True,
                   excludes=ray_constants.get_runtime_env_default_excludes())
    size = target.stat().st_size
    assert size < ray_constants.DASHBOARD_CLIENT_MAX_SIZE, \
        f"the working dir zips to {size / 2**20:.1f} MiB, over the dashboard's upload limit"
    names = zipfile.ZipFile(target).namelist()
    assert not [n for n in names if n.startswith((".venv/", ".git/"))]
    for needed in ("jobs/build_pool.py", "examples/pool.yaml", "examples/prompts.txt", "hgdpo/pool.py"):
        assert needed in names


# --------------------------------------------------------------------- a real head (cluster)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def clean_env(**extra: str) -> dict:
    """This process's environment without Ray/hgdpo/MLflow settings (a session ray.init() sets
    RAY_AUTH_MODE=token here, for instance), plus ``extra``; this interpreter's bin first on PATH
    so that the job's `python` is the one hgdpo is installed in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HGDPO_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def wait_for_head(proc, log: Path, dashboard: int, agent: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=2) as r:
                if r.status == 200:
                    with socket.create_connection(("127.0.0.1", agent), timeout=2):
                        return  # the dashboard answers and the job agent listens
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the Ray head did not come up in {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def stop_head(proc: subprocess.Popen, markers: list[str]) -> None:
    """Stop this head and nothing else: its `ray start --block` process, then leftovers by pid."""
    import psutil

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the --block process stops all it started, then exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == me:
            continue
        try:
            in_group = os.getpgid(p.pid) == proc.pid  # the group id stays ours while it has members
            cmdline = " ".join(p.info["cmdline"] or [])
            if in_group or any(m in cmdline for m in markers):
                p.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


@pytest.mark.cluster
def test_pool_and_train_jobs_on_a_ray_head(tmp_path):
    """`ray start --head` + `ray job submit --working-dir <repo>` builds the pool it is asked for, then
    trains an adapter on it through the same head."""
    from hgdpo import pool
    from hgdpo.prompts import read_prompts
    from hgdpo.sampling import image_seeds

    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        pytest.skip(f"no ray executable beside {sys.executable}")
    gcs, dashboard, agent, client = free_ports(4)
    # Ray puts unix sockets under its temp dir (limit ~107 characters): keep the path short.
    ray_tmp = tempfile.mkdtemp(prefix="hgr", dir="/tmp")
    output = tmp_path / "pool"
    head_log, submit_log, train_log = tmp_path / "head.log", tmp_path / "submit.log", tmp_path / "train.log"
    head_env = clean_env(RAY_AUTH_MODE="disabled", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                         RAY_USAGE_STATS_ENABLED="0")
    started = time.monotonic()
    with open(head_log, "wb") as log:
        proc = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
             "--num-cpus=2", f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
            env=head_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=tmp_path)
    try:
        wait_for_head(proc, head_log, dashboard, agent)
        head_up = time.monotonic() - started
        command = [
            str(ray_bin), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
            "--working-dir", str(REPO),
            "--", "python", "jobs/build_pool.py", "--config", "examples/pool.yaml",
            f"output={output}", "images_per_prompt=3", "steps=3", "max_prompts=3",
            f"mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ]
        with open(submit_log, "wb") as log:
            # Blocks until the job ends; its exit code is the job's outcome.
            result = subprocess.run(command, env=clean_env(RAY_AUTH_MODE="disabled"), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=600, cwd=tmp_path)
        text = submit_log.read_text(errors="replace")
        assert result.returncode == 0, f"ray job submit failed ({result.returncode}):\n{text[-5000:]}"
        assert "succeeded" in text and "pool: complete, 3 prompts" in text, text[-5000:]
        # The trainer on the pool the first job wrote, through the same head: 2 workers x 1 CPU.
        command = [
            str(ray_bin), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
            "--working-dir", str(REPO),
            "--", "python", "jobs/train.py", "--config", "examples/train.yaml", f"pool={output}",
            f"output={tmp_path / 'train'}", "max_steps=4", "global_batch=2", "micro_batch=1", "data_shards=2",
            "workers=2", "checkpoint_every=2", "metrics_every=2", "learning_rate=1e-3",
            f"mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ]
        with open(train_log, "wb") as log:
            result = subprocess.run(command, env=clean_env(RAY_AUTH_MODE="disabled"), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=600, cwd=tmp_path)
        text = train_log.read_text(errors="replace")
        assert result.returncode == 0, f"ray job submit of the trainer failed ({result.returncode}):\n{text[-5000:]}"
        assert "succeeded" in text and "train: step 4/4" in text and "adapter written" in text, text[-5000:]
        print(f"head up in {head_up:.1f}s, jobs done {time.monotonic() - started:.1f}s after start")
    finally:
        stop_head(proc, markers=[ray_tmp, str(tmp_path)])
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert (output / "pool.json").is_file() and (output / "_COMPLETE.json").is_file()
    assert list(output.glob("part-*.parquet"))
    table = pool.read(str(output))
    assert table.num_rows == 3
    assert table.column_names == [f.name for f in pool.schema((3, 4, 8, 8))]
    prompts = read_prompts(REPO / "examples" / "prompts.txt", max_prompts=3)
    assert table.column("prompt").to_pylist() == [p.text for p in prompts]
    for row in table.select(["prompt_id", "seeds", "scores", "rank", "winner", "loser", "image_w"]).to_pylist():
        assert len(row["seeds"]) == 3 and len(row["scores"]) == 3
        assert row["seeds"] == image_seeds(0, row["prompt_id"], 3)
        assert sorted(row["rank"]) == [0, 1, 2]
        assert row["winner"] == row["rank"][0] and row["loser"] == row["rank"][-1]
        assert np.argmax(row["scores"]) == row["winner"]
        assert row["image_w"][:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "mlflow.db").is_file(), "the job did not record its MLflow run"
    _check_trained_adapter(tmp_path)


def _check_trained_adapter(tmp_path: Path) -> None:
    """The submitted trainer's adapter: diffusers LoRA format, trained (B moved from zero), loadable
    into a plain pipeline, with its metrics in MLflow."""
    import mlflow
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from hgdpo import embedded
    from hgdpo.lora import ADAPTER_FILE, INFO_FILE

    adapter = tmp_path / "train" / "adapter"
    assert (adapter / INFO_FILE).is_file()
    weights = load_file(str(adapter / ADAPTER_FILE))
    ups = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(float(v.abs().max()) > 0 for v in ups), "the LoRA up-projections never left zero"
    pipe = StableDiffusionPipeline.from_pretrained(embedded.pipeline_dir(), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(adapter))
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hgdpo-train")
    (run,) = client.search_runs([exp.experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    assert torch.isfinite(torch.tensor(run.data.metrics["loss"]))
