"""The sweep's MLflow runs: one parent run per sweep, one nested run per trial, found again on a rerun.

The parent run (tags ``stage`` = ``sweep``, ``sweep``, ``sweep_output``) is the one this output already
has, else a new one; each trial's nested run (tags ``mlflow.parentRunId``, ``trial``, ...) is opened when
the trial starts, and is the one an earlier run of the sweep opened for it, if any, so a rerun
duplicates no run.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
from mlflow.entities import Param

from hgdpo.infra import tracking
from hgdpo.report.tables import PARENT_TAG
from hgdpo.sweep.config import PARAMETERS
from hgdpo.sweep.trials import Prepared


def mlflow_client(uri: str) -> mlflow.MlflowClient:
    """An MLflow client of the tracking store at ``uri``."""
    return mlflow.MlflowClient(tracking_uri=uri)


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, v) for k, v in tracking.flat_params(params).items()]
    for start in range(0, len(items), 100):  # the store takes at most 100 params per batch
        client.log_batch(run_id, params=items[start: start + 100])


def parent_run(prep: Prepared) -> str:
    """The sweep's parent run: the one this output already has, else a new one."""
    cfg, uri = prep.cfg, prep.mlflow_uri
    client = mlflow_client(uri)
    exp = tracking.experiment_id(cfg.mlflow_experiment, uri)
    found = [r for r in client.search_runs([exp], filter_string=f"tags.sweep = '{cfg.name}' and tags.stage = 'sweep'")
             if r.data.tags.get("sweep_output") == str(prep.output)]
    swept = sorted({k for t in prep.trials for k in t.values}, key=list(PARAMETERS).index)
    if found:
        run_id = min(found, key=lambda r: r.info.start_time).info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(exp, run_name=cfg.name, tags={
            "stage": "sweep", "sweep": cfg.name, "sweep_output": str(prep.output)}).info.run_id
        _log_params(client, run_id, {"name": cfg.name, "pool": prep.trials[0].train.pool, "output": str(prep.output),
                                     "model": cfg.model, "parameters": json.dumps(cfg.parameters),
                                     "trials": json.dumps(cfg.trials)})
    client.set_tag(run_id, "swept", ",".join(swept))
    client.set_tag(run_id, "trials", str(len(prep.trials)))
    return run_id


def trial_runs(client, experiment_id: str, parent_id: str, name: str | None = None) -> dict[str, str]:
    """Trial name -> its nested run under ``parent_id`` (the first made, should there be two); only
    trial ``name``'s when given."""
    query = f"tags.`{PARENT_TAG}` = '{parent_id}'" + (f" and tags.trial = '{name}'" if name else "")
    found: dict[str, Any] = {}
    for r in client.search_runs([experiment_id], filter_string=query, max_results=10000):
        trial = r.data.tags.get("trial")
        if trial and (trial not in found or r.info.start_time < found[trial].info.start_time):
            found[trial] = r
    return {trial: r.info.run_id for trial, r in found.items()}


def trial_run(client, payload: dict) -> str:
    """The trial's nested MLflow run, opened when the trial starts (so its duration is the trial's own):
    the one an earlier run of the sweep opened for it, else a new one (tags and params logged once)."""
    exp, parent_id, name = payload["experiment_id"], payload["parent_run_id"], payload["name"]
    shared = {}
    if payload["shares"] is not None:  # the adapter it evaluates, and the run that trained it
        shared["adapter_trial"] = payload["shares"]
        owner = trial_runs(client, exp, parent_id, payload["shares"]).get(payload["shares"])
        if owner is not None:
            shared["adapter_run_id"] = owner
    found = trial_runs(client, exp, parent_id, name).get(name)
    if found is not None:
        client.update_run(found, status="RUNNING")
        for key, value in shared.items():
            client.set_tag(found, key, value)
        return found
    run_id = client.create_run(exp, run_name=name, tags={
        PARENT_TAG: parent_id, "stage": "sweep-trial", "sweep": payload["sweep"], "trial": name,
        "trial_index": str(payload["index"]), "trial_values": json.dumps(payload["values"]),
        "output": payload["folder"], "training": payload["training"], "adapter": payload["evaluate"]["adapter"],
        **shared}).info.run_id
    _log_params(client, run_id, {"trial": name, **payload["params"],
                                 **{f"train.{k}": v for k, v in payload["train"].items()},
                                 **{f"evaluate.{k}": v for k, v in payload["evaluate"].items()}})
    return run_id
