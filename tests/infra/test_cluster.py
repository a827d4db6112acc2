"""The files in cluster/ stay valid (the jobs themselves run on a real two-node cluster in
``test_multinode.py``).

Every YAML in cluster/ parses; the cluster-launcher config passes Ray's own schema validation,
installs torch before the project, starts the tracking server on the head and gives every node its
URI; the KubeRay RayJob runs jobs/build_pool.py on GPU workers with a pool config that hgdpo still
accepts, pip pins that agree with pyproject.toml and the tracking URI in every pod; the scripts
are valid bash and bind to a private address by default; the working directory that
`ray job submit --working-dir .` uploads stays under the dashboard's limit and leaves .venv out.
"""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
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
    from hgdpo.config.core import load_config
    from hgdpo.pool.config import PoolConfig

    path, job = rayjob()
    config_path = Path(entrypoint_config(job["spec"]))
    (data,) = [m["data"] for m in config_maps(path).values() if config_path.name in m["data"]]
    file = tmp_path / config_path.name
    file.write_text(data[config_path.name])
    cfg = load_config(PoolConfig, str(file))
    assert cfg.generator_gpus > 0, "a GPU cluster config should put the models on GPUs"
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


def script_text(name: str) -> str:
    """A script of cluster/, checked to be valid bash and executable."""
    script = CLUSTER / name
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{name} is not executable"
    return script.read_text()


def test_find_executable_prefers_the_override_then_path_and_names_the_setting(tmp_path):
    lib = CLUSTER / "find_executable.sh"
    run = lambda line, **env: subprocess.run(["bash", "-c", f"source {lib}; {line}"], capture_output=True, text=True,  # noqa: E731
                                             cwd=tmp_path, env={"PATH": "/usr/bin:/bin", **env})
    assert run("find_executable bash X_BIN", X_BIN="/opt/x").stdout.strip() == "/opt/x"
    assert run("find_executable bash X_BIN").stdout.strip().endswith("/bash")
    missing = run("find_executable no-such-tool-hg X_BIN")
    assert missing.returncode == 1 and "set X_BIN" in missing.stderr


def test_start_script_is_valid_bash_and_safe_by_default():
    text = script_text("start_local_head.sh")
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
    for needed in ("jobs/build_pool.py", "examples/pool.yaml", "examples/prompts.txt", "hgdpo/pool/store.py"):
        assert needed in names


# ---------------------------------------------------------------------------- MLflow on a cluster


def test_mlflow_server_script_is_valid_bash_and_binds_a_private_address_by_default():
    text = script_text("start_mlflow.sh")
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "0.0.0.0" not in code, "the tracking server must not listen on every interface by default"
    assert 'HOST="${MLFLOW_HOST:-$(private_address)}"' in code and "--serve-artifacts" in code
    # The default address, as the script computes it on this machine.
    function = code[code.index("private_address() {"):code.index("\n}\n", code.index("private_address() {")) + 2]
    address = subprocess.run(["bash", "-c", f"{function}\nprivate_address"], capture_output=True, text=True).stdout
    assert address.strip() and address.strip() != "0.0.0.0"


def test_mlflow_server_script_passes_its_settings_and_prints_no_password(tmp_path):
    """The script run for real, with an `mlflow` that only prints its arguments."""
    fake = tmp_path / "mlflow"
    fake.write_text('#!/usr/bin/env bash\necho "ARGS: $*"\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_BIN": str(fake), "MLFLOW_HOST": "10.1.2.3",
           "MLFLOW_BACKEND_STORE_URI": "postgresql://hg:db-password-77@db:5432/mlflow",
           "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlflow", "MLFLOW_ALLOWED_HOSTS": "mlflow.svc:5000"}
    result = subprocess.run(["bash", str(CLUSTER / "start_mlflow.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (banner,) = [line for line in result.stdout.splitlines() if line.startswith("MLflow tracking server")]
    assert "mlflow_uri=http://10.1.2.3:5000" in banner and "db-password-77" not in banner
    (args,) = [line for line in result.stdout.splitlines() if line.startswith("ARGS:")]
    words = args.split()[1:]
    assert words[:-1] == ["server", "--host", "10.1.2.3", "--port", "5000", "--backend-store-uri",
                          "postgresql://hg:db-password-77@db:5432/mlflow", "--workers", "4", "--serve-artifacts",
                          "--artifacts-destination", "s3://bucket/mlflow", "--allowed-hosts"]
    allowed = words[-1].split(",")
    assert {"10.1.2.3:*", "localhost:*", "172.31.*", "mlflow.svc:5000"} <= set(allowed) and "*" not in allowed


@pytest.mark.parametrize("path,cfg", launcher_configs(), ids=[p.name for p, _ in launcher_configs()])
def test_launcher_starts_the_tracking_server_and_gives_every_node_its_uri(path, cfg):
    head = cfg["head_start_ray_commands"]
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert any("cluster/start_mlflow.sh" in c for c in head), "the head does not start the tracking server"
    assert [c for c in head if "ray start --head" in c and "MLFLOW_TRACKING_URI=http://" in c]
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in workers and "ray start --address" in workers
    mounted = [remote for remote, local in cfg["file_mounts"].items() if local.rstrip("/") in (".", "./")][0]
    assert any(f"{mounted}/cluster/start_mlflow.sh" in c for c in head), "the script path is not the synced checkout's"


def test_rayjob_gives_every_pod_the_tracking_uri():
    path, job = rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI", "").startswith("http"), container["name"]
    (data,) = [m["data"] for m in config_maps(path).values()]
    pool_cfg = yaml.safe_load(next(iter(data.values())))
    assert not str(pool_cfg.get("mlflow_uri", "http")).startswith(("sqlite", "file")), "a local store on a cluster"
