"""MLflow: where runs go, and the provenance every output carries (config + versions)."""

from __future__ import annotations

import contextlib
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from hgdpo.errors import HgdpoError
from hgdpo.infra.locations import check_tracking_uri
from hgdpo.infra.raycluster import node_count

PACKAGES = ("hgdpo", "torch", "diffusers", "transformers", "peft", "ray", "pyarrow", "mlflow",
            "safetensors", "open_clip_torch", "numpy")


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape an output."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def tracking_uri(configured: str | None) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else a sqlite store ``./mlflow.db``."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def is_local_store(uri: str) -> bool:
    """A store only this machine reaches: a sqlite file, a folder, or a server on the loopback address."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if uri.startswith("databricks"):  # "databricks", "databricks-uc", "databricks://profile": a hosted server
        return False
    if scheme in ("http", "https"):
        host = (parts.hostname or "").lower()
        return host == "localhost" or host.startswith("127.") or host == "::1"
    return scheme in ("", "file", "sqlite") or len(scheme) == 1  # "C:\\..." is a path


def redact(uri: str) -> str:
    """A URI as it may be shown or recorded: a password inside it replaced by ``***``."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


SERVER_HINT = ("start a tracking server on the head (`bash cluster/start_mlflow.sh`, see docs/cluster.md) "
               "and pass mlflow_uri=http://HEAD-ADDRESS:5000 or set MLFLOW_TRACKING_URI")


def check_store(configured: str | None, allow_local: bool, setting: str = "mlflow_uri") -> None:
    """Refuse a local store when the job runs on a Ray cluster of more than one node, unless allowed:
    the trainer's rank 0, on another node, logs its metrics to the store. (A cluster that will grow
    by autoscaling counts only the nodes it has now: its nodes get MLFLOW_TRACKING_URI from
    cluster/ray-cluster.yaml or cluster/rayjob.yaml.)"""
    uri = tracking_uri(configured)
    # The resolved URI reaches Ray workers and a sweep's trial configs (written into outputs).
    check_tracking_uri(uri, setting if configured else "MLFLOW_TRACKING_URI")
    if allow_local or not is_local_store(uri):
        return
    nodes = node_count()
    if nodes > 1:
        raise HgdpoError(
            f"{setting}: {redact(uri)} is a store only this node reaches, but the Ray cluster has {nodes} nodes and "
            f"the others cannot reach it (a file, or a server on the loopback address): {SERVER_HINT}. To keep the local store anyway, set "
            f"mlflow_allow_local=true (training metrics are then recorded only when rank 0 runs on this node).")


def artifact_root(uri: str) -> str | None:
    """For a sqlite store, artifacts go in ``mlartifacts/`` beside the database (not ./mlruns)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def experiment_id(name: str, uri: str) -> str:
    import mlflow  # late: mlflow reads MLFLOW_LOGGING_LEVEL (set by hgdpo.infra.quiet) when imported

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(uri)
    location = f"{root}/{name}" if root else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def run(uri: str | None, experiment: str, run_name: str | None = None, run_id: str | None = None,
        **kwargs: Any) -> Iterator[Any]:
    """Start an MLflow run in ``experiment`` at ``uri`` (see ``tracking_uri``).

    With ``run_id``, log into that existing run instead (a sweep's trial run, which the trial's
    training and evaluation share), whatever its experiment.
    """
    import mlflow  # late: mlflow reads MLFLOW_LOGGING_LEVEL (set by hgdpo.infra.quiet) when imported

    uri = tracking_uri(uri)
    if run_id is not None:
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id) as active:
            yield active
        return
    exp = experiment_id(experiment, uri)
    with mlflow.start_run(experiment_id=exp, run_name=run_name, **kwargs) as active:
        yield active


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """Config values as MLflow params (None shown as an empty string; long values cut)."""
    return {k: ("" if v is None else str(v))[:500] for k, v in config.items()}
