"""Real servers the tests start and stop: an S3-compatible store (moto), an MLflow tracking server,
Ray nodes. Each runs as its own process group, so stopping it stops everything it started, and
nothing else (never `ray stop`, which stops every Ray process of the user on the machine)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Recognisable fake credentials: a test looks for them in every output and log.
ACCESS_KEY = "AKIAHGDPOTESTKEY0001"
SECRET_KEY = "hgdpo-FAKE-SECRET-never-print-7d31"


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
    """This process's environment without Ray/hgdpo/MLflow/AWS settings, plus ``extra``; this
    interpreter's bin first on PATH so that a job's `python` is the one hgdpo is installed in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HGDPO_", "MLFLOW_", "AWS_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass
class Process:
    """A server process started in its own session; ``log`` holds what it printed."""

    proc: subprocess.Popen
    log: Path
    markers: list[str] = field(default_factory=list)  # command-line words of its stray children

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        import psutil

        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        me = os.getpid()
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.pid == me:
                continue
            try:
                in_group = os.getpgid(p.pid) == self.proc.pid
                cmdline = " ".join(p.info["cmdline"] or [])
                if in_group or any(m in cmdline for m in self.markers):
                    p.kill()
            except (psutil.Error, ProcessLookupError, PermissionError):
                pass


def start(command: list[str], log: Path, env: dict, cwd: Path, markers: list[str] | None = None) -> Process:
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=cwd)
    return Process(proc, log, markers or [])


def wait_until(check, server: Process, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"{what} exited with {server.proc.returncode}:\n{server.tail()}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what} did not come up in {timeout:.0f}s:\n{server.tail()}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


# ------------------------------------------------------------------------------------- S3 (moto)

@dataclass
class S3:
    """An S3-compatible server on 127.0.0.1 and the environment a client needs for it."""

    server: Process
    endpoint: str
    env: dict  # AWS_* variables: endpoint, region, credentials

    def client(self, **credentials):
        import boto3

        keys = {"aws_access_key_id": self.env["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": self.env["AWS_SECRET_ACCESS_KEY"], **credentials}
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **keys)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def start_s3(workdir: Path, *, auth: bool = False) -> S3:
    """moto's S3 server. With ``auth``, requests are checked against IAM: the server gets one user
    with full access, and ``env`` holds that user's (generated) keys."""
    (port,) = free_ports(1)
    endpoint = f"http://127.0.0.1:{port}"
    env = clean_env(**({"INITIAL_NO_AUTH_ACTION_COUNT": "3"} if auth else {}))
    server = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                   workdir / f"moto-{port}.log", env, workdir)
    wait_until(lambda: http_ok(f"{endpoint}/moto-api/"), server, "moto_server", timeout=60)
    creds = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    if auth:
        import boto3

        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="hgdpo")
        iam.put_user_policy(UserName="hgdpo", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="hgdpo")["AccessKey"]
        creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           **creds}
    return S3(server, endpoint, env)


# ------------------------------------------------------------------------------------------ MLflow

def start_mlflow(workdir: Path, backend: str, artifacts: str, env: dict | None = None,
                 host: str | None = "127.0.0.1") -> tuple[Process, str]:
    """The tracking server as the cluster runs it (``cluster/start_mlflow.sh``); its URL. ``host=None``:
    the script's default, this machine's private address (what the nodes of a cluster reach)."""
    (port,) = free_ports(1)
    # One serving process: four start slowly on a loaded 2-core machine (one died there, the server never came up).
    env = clean_env(MLFLOW_PORT=str(port), MLFLOW_BACKEND_STORE_URI=backend, MLFLOW_ARTIFACTS_DESTINATION=artifacts,
                    MLFLOW_BIN=str(BIN / "mlflow"), MLFLOW_WORKERS="1", **({"MLFLOW_HOST": host} if host else {}),
                    **(env or {}))
    server = start(["bash", str(REPO / "cluster" / "start_mlflow.sh")], workdir / f"mlflow-{port}.log", env, workdir)
    url = {}

    def up() -> bool:
        found = re.search(r"mlflow_uri=(http://\S+)", server.tail())
        if found:
            url["url"] = found.group(1)
        return bool(url) and http_ok(f"{url['url']}/health")

    wait_until(up, server, "mlflow server")
    return server, url["url"]


# --------------------------------------------------------------------------------------------- Ray

@dataclass
class RayCluster:
    """A Ray cluster of a head and one worker node on this machine, each with its own temp dir."""

    head: Process
    worker: Process
    gcs: str  # host:port, what RAY_ADDRESS takes
    dashboard: str  # http://..., what `ray job submit --address` takes
    temp_dirs: list[str]
    env: dict  # the nodes' environment; jobs inherit it

    def submit(self, args: list[str], log: Path, *, timeout: float = 900, wait: bool = True):
        """`ray job submit --working-dir <repo> -- python ...args`: with ``wait``, its exit code and output;
        else the job id (the job runs on)."""
        command = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO)]
        if not wait:
            command.append("--no-wait")
        command += ["--", "python", *args]
        with open(log, "wb") as out:
            result = subprocess.run(command, env=clean_env(RAY_AUTH_MODE="disabled"), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout,
                                    cwd=log.parent)
        text = log.read_text(errors="replace")
        if wait:
            return result.returncode, text
        assert result.returncode == 0, text[-3000:]
        return next(w.strip("'\"") for w in text.split() if w.strip("'\"").startswith("raysubmit_"))

    def stop(self) -> None:
        self.worker.stop()
        self.head.stop()


def start_ray_cluster(workdir: Path, env: dict, *, head_cpus: int = 0, worker_cpus: int = 2) -> RayCluster:
    """`ray start --head` and `ray start --address` for a second node, both on 127.0.0.1 with their own
    ports and temp dirs (short paths: Ray puts unix sockets under them). The head has ``head_cpus``
    (0: like a cluster whose head runs only drivers, so every task, actor and training worker runs on
    the other node) and the worker node a custom resource ``worker_node``."""
    import tempfile

    gcs, dashboard, agent, client, w_agent, w_grpc, w_metrics, w_runtime, w_node, w_object, h_grpc, h_metrics, \
        h_runtime = free_ports(13)
    temp = [tempfile.mkdtemp(prefix="hgr", dir="/tmp") for _ in range(2)]
    node_env = dict(env, RAY_AUTH_MODE="disabled", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                    RAY_USAGE_STATS_ENABLED="0")
    ray = str(BIN / "ray")
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--object-store-memory=500000000"]
    head = start([ray, "start", "--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                  f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
                  f"--dashboard-agent-grpc-port={h_grpc}", f"--metrics-export-port={h_metrics}",
                  f"--runtime-env-agent-port={h_runtime}", f"--ray-client-server-port={client}",
                  f"--num-cpus={head_cpus}", f"--temp-dir={temp[0]}", *common],
                 workdir / "ray-head.log", node_env, workdir, markers=[temp[0]])
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_until(lambda: http_ok(f"{url}/api/version") and socket.create_connection(("127.0.0.1", agent), 2),
                   head, "the Ray head")
        worker = start([ray, "start", f"--address=127.0.0.1:{gcs}", f"--num-cpus={worker_cpus}",
                        '--resources={"worker_node": 1}', f"--dashboard-agent-listen-port={w_agent}",
                        f"--dashboard-agent-grpc-port={w_grpc}", f"--metrics-export-port={w_metrics}",
                        f"--runtime-env-agent-port={w_runtime}", f"--node-manager-port={w_node}",
                        f"--object-manager-port={w_object}", f"--temp-dir={temp[1]}", *common],
                       workdir / "ray-worker.log", node_env, workdir, markers=[temp[1]])
    except BaseException:
        head.stop()
        raise
    cluster = RayCluster(head, worker, f"127.0.0.1:{gcs}", url, temp, node_env)

    def two_nodes() -> bool:
        from ray.util.state import list_nodes

        return len([n for n in list_nodes(address=url) if n.state == "ALIVE"]) == 2

    try:
        wait_until(two_nodes, worker, "the second Ray node")
    except BaseException:
        cluster.stop()
        raise
    return cluster
