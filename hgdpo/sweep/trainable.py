"""One trial of a sweep on Ray Tune: a function trainable that trains, evaluates and reports.

``run_trial`` opens the trial's nested MLflow run (``hgdpo.sweep.mlflow_runs``), trains its adapter
(``hgdpo.train.trainer.train``, a TorchTrainer inside) unless it evaluates another trial's adapter of
the same training, evaluates A (the adapter) against B (the base model; B's rows from the sweep's
baseline cache) with ``hgdpo.evaluate.evaluate.evaluate``, both logging into that run, writes the
trial's ``result.json`` (or ``error.txt``) and reports the win rates to Tune.
"""

from __future__ import annotations

import time

import mlflow
import ray.data
from ray import tune

from hgdpo.config.core import from_dict
from hgdpo.errors import HgdpoError
from hgdpo.evaluate.config import EvalConfig
from hgdpo.evaluate.evaluate import evaluate
from hgdpo.infra import storage
from hgdpo.infra.quiet import quiet_libraries
from hgdpo.models.lora import INFO_FILE
from hgdpo.sweep.mlflow_runs import trial_run
from hgdpo.sweep.trials import ERROR_FILE, RESULT_FILE
from hgdpo.train.config import TrainConfig
from hgdpo.train.trainer import train

# The Tune function trainable only waits on the workers and actors it starts, so it takes no CPU:
# even 0.01 CPU would keep a trial whose training needs every CPU of the cluster from ever
# starting its workers. Tune refuses an empty request; a nominal bit of memory satisfies it.
# It runs on the head, beside the driver (`ray job submit` puts it there; a local Ray has one
# node): the files the sweep names (test prompts, scorer folders) are in the driver's working
# directory, which the head alone has at that path.
TRIAL_RESOURCES = {"cpu": 0, "memory": 1 << 20, "node:__internal_head__": 0.001}


def _check_shared_adapter(payload: dict) -> None:
    """Refuse to evaluate another trial's adapter that it has not trained (it failed, or was stopped)."""
    info = storage.join(payload["evaluate"]["adapter"], INFO_FILE)
    if not storage.is_file(info) or storage.read_json(info, "adapter info").get("fingerprint") != payload["training"]:
        raise HgdpoError(f"trial {payload['shares']!r}, whose adapter this trial evaluates (the same training), has "
                         f"not trained it; see that trial's error, then rerun the sweep")


def run_trial(config: dict, payloads: dict) -> None:
    """One Tune trial (a function trainable): open its MLflow run, train (unless it evaluates another
    trial's adapter), evaluate A (adapter) vs B (base; its rows from the sweep's cache), report.

    ``config``: ``{"trial": name}``; ``payloads``: name -> plain data (the two stage configs, the
    trial folder, the MLflow parent run, the adapter it shares, the baseline cache), put in the
    object store by ``tune.with_parameters``.
    """
    payload = payloads[config["trial"]]
    train_cfg = from_dict(TrainConfig, payload["train"])
    eval_cfg = from_dict(EvalConfig, payload["evaluate"])
    quiet_libraries()
    name, folder, run_id = payload["name"], payload["folder"], None
    client = mlflow.MlflowClient(tracking_uri=train_cfg.mlflow_uri)

    def log(message: str) -> None:
        print(f"[{name}] {message}", flush=True)

    ray.data.DataContext.get_current().enable_progress_bars = False  # one trial's bars would garble the others'
    storage.delete(storage.join(folder, ERROR_FILE))
    try:
        run_id = trial_run(client, payload)
        if payload["shares"] is None:
            log(f"trial {payload['index'] + 1}: training into {train_cfg.output}")
            train(train_cfg, log=log, mlflow_run_id=run_id)
        else:
            _check_shared_adapter(payload)
            log(f"trial {payload['index'] + 1}: the training of trial {payload['shares']}; evaluating its adapter "
                f"{eval_cfg.adapter}")
        result = evaluate(eval_cfg, log=log, mlflow_run_id=run_id, baseline_cache=payload["baseline_cache"])
        metrics = result.metrics()
        if result.skipped:  # evaluated before an interruption: make sure the trial run has the figures
            client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0)
                                              for k, v in metrics.items()])
        client.set_terminated(run_id, "FINISHED")  # first: a trial stopped between the two is run again
        storage.write_json(storage.join(folder, RESULT_FILE), {
            "name": name, "params": payload["params"], "metrics": metrics, "run_id": run_id,
            "adapter": eval_cfg.adapter, "adapter_trial": payload["shares"], "evaluation": eval_cfg.output})
    except BaseException as err:
        storage.write_text(storage.join(folder, ERROR_FILE), f"{type(err).__name__}: {err}\n")
        if run_id is not None:
            client.set_terminated(run_id, "FAILED")
        raise
    log("done: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("win_rate_")
                              and not k.endswith(("_low", "_high"))))
    tune.report(metrics)
