"""Sweeps: the paper's ablations as Ray Tune trials of (train -> evaluate against the base model).

``sweep(cfg)`` (the driver) expands the sweep into trials (``hgdpo.sweep.config``) and checks
every one before any work: its train and evaluate configs, the pool (pool size, loser rank and
dataset size against the pool's N and prompts), the model, the test prompts and the scorers.
Then it opens the sweep's MLflow parent run, makes baseline B's images and scores, and runs the
unfinished trials on Ray Tune: each is a function trainable holding no CPU, which opens its
nested MLflow run when it starts (params under the common names: pool_size, loser_rank,
dataset_size, beta, lambda_stat, objective, lan, alpha, ...), runs ``hgdpo.train.trainer.train`` (a
TorchTrainer inside) and ``hgdpo.evaluate.evaluate.evaluate`` (Ray Data actors), both logging into that
run, and reports the win rates.

Work made once: B is the same for every trial (only A's settings are swept), so the driver makes
B's rows once per distinct B, before any trial starts (no two trials can race to make them), into
``<output>/baseline/<digest of B's settings and the test prompts>``; each trial's evaluation reads
them there (its run's tag ``baseline_cache``, and its metric ``generated_images_b`` = 0) and makes
only A's images. Trials whose training is the same (``hgdpo.train.trainer.fingerprint``: e.g. ``dpo`` and
``dpo`` + LAN, which differ only at sampling time) share one adapter: one of them trains it in its
own folder (the first, unless another has trained its own already), the others evaluate it (their
runs' tags ``adapter``, ``adapter_trial`` and ``adapter_run_id`` name it and the run that trained
it), after it when it is still to run: in a second round of Tune trials.

Resume: every trial folder holds ``trial.json`` (its settings) and, once done, ``result.json``.
A rerun of the same sweep runs only the trials without a result, and reuses the parent and trial
runs it finds in MLflow (by their tags), so nothing is retrained and no run is duplicated; an
interrupted trial resumes from its last training checkpoint (train and evaluate are idempotent).
A trial folder written with other settings is refused.

Concurrency: a trial's peak is its training (the workers; Ray Data's 1-CPU tasks before them) or
its evaluation (generator + scorer actors), whichever is larger. By default only as many trials
run at once as fit in the cluster at their peaks: evaluation actor pools are not reserved as a
gang, so two trials that each got half of what they need would wait on each other for ever.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from hgdpo.config.core import changed_settings, from_dict, to_dict
from hgdpo.errors import HgdpoError
from hgdpo.evaluate.config import EvalConfig
from hgdpo.infra import storage, tracking
from hgdpo.sweep.config import EVAL_PARAMETERS, PARAMETERS, TRAIN_PARAMETERS, SweepConfig, Trial, value_text
from hgdpo.train.config import TrainConfig

TRIAL_FILE = "trial.json"  # written before any work: the trial's settings
STAGE_CONFIGS = {"train": TrainConfig, "evaluate": EvalConfig}  # a trial file's sections
RESULT_FILE = "result.json"  # written when the trial is done: its parameters and metrics
ERROR_FILE = "error.txt"  # the message of the trial's last failure
SWEEP_FILE = "sweep.json"  # the sweep's resolved config, versions and MLflow parent run
BASELINE_DIR = "baseline"  # baseline B's rows, one folder per distinct B (hgdpo.evaluate.evaluate.build_baseline)
# The Tune function trainable only waits on the workers and actors it starts, so it takes no CPU:
# even 0.01 CPU would keep a trial whose training needs every CPU of the cluster from ever
# starting its workers. Tune refuses an empty request; a nominal bit of memory satisfies it.
# It runs on the head, beside the driver (`ray job submit` puts it there; a local Ray has one
# node): the files the sweep names (test prompts, scorer folders) are in the driver's working
# directory, which the head alone has at that path.
TRIAL_RESOURCES = {"cpu": 0, "memory": 1 << 20, "node:__internal_head__": 0.001}
PARENT_TAG = "mlflow.parentRunId"


def trial_params(trial: Trial, plan) -> dict[str, Any]:
    """The trial's parameters under their common names, resolved (pool_size None -> the pool's N)."""
    return {**{k: getattr(trial.train, k) for k in TRAIN_PARAMETERS},
            "pool_size": plan.pool_size, "loser_rank": plan.loser_rank, "dataset_size": plan.dataset_size,
            **{k: getattr(trial.evaluate, k) for k in EVAL_PARAMETERS},
            **({"pool": trial.values["pool"]} if "pool" in trial.values else {})}  # a trial's own pool, as given


def trial_peak(trial: Trial) -> tuple[float, float]:
    """(CPUs, GPUs) a trial holds at its peak: its training or its evaluation (the trial itself: none)."""
    t, e = trial.train, trial.evaluate
    train_cpu = max(t.workers * t.cpus_per_worker, 1.0)  # the pairs are selected by 1-CPU Ray Data tasks first
    eval_cpu = e.generator_actors * e.generator_cpus + e.scorer_actors * e.scorer_cpus
    train_gpu = t.workers * t.gpus_per_worker
    eval_gpu = e.generator_actors * e.generator_gpus + e.scorer_actors * e.scorer_gpus
    return max(train_cpu, eval_cpu), max(train_gpu, eval_gpu)


def fitting_trials(trials: list[Trial], cpus: float, gpus: float) -> int:
    """How many of ``trials`` can run at once, each at its peak, on ``cpus`` and ``gpus`` (at least 1)."""
    cpu = max(trial_peak(t)[0] for t in trials)
    gpu = max(trial_peak(t)[1] for t in trials)
    k = math.floor(cpus / cpu + 1e-9)
    if gpu > 0:
        k = min(k, math.floor(gpus / gpu + 1e-9))
    return max(1, min(k, len(trials)))


@dataclass
class Prepared:
    """A checked sweep: its trials, their resolved parameters, what they share, and where it writes."""

    cfg: SweepConfig
    trials: list[Trial]  # those that share an adapter evaluate the trial's that trains it
    params: dict[str, dict[str, Any]]  # trial name -> parameters under the common names
    output: str  # a local path or a URI
    mlflow_uri: str
    trainings: dict[str, str] = field(default_factory=dict)  # trial name -> its training's fingerprint
    shares: dict[str, str] = field(default_factory=dict)  # trial name -> the trial whose adapter it evaluates
    baselines: dict[str, str] = field(default_factory=dict)  # trial name -> the key of its baseline B's rows
    baseline_inputs: dict[str, tuple] = field(default_factory=dict)  # key -> (an EvalConfig of that B, its prompts)


def share_adapters(trials: list[Trial], trainings: dict[str, str]) -> tuple[list[Trial], dict[str, str]]:
    """Trials of the same training (fingerprint) evaluate one adapter: the first of them whose own
    adapter is trained already keeps it, else the first of them trains it; a trial whose own adapter
    is trained keeps its own. Returns the trials (the others now evaluating that adapter) and trial
    name -> the trial whose adapter it evaluates."""
    import dataclasses

    from hgdpo.models.lora import INFO_FILE

    def trained(trial: Trial) -> bool:
        info = storage.join(trial.evaluate.adapter, INFO_FILE)
        with storage.errors("sweep.output", trial.folder):
            return (storage.is_file(info)
                    and storage.read_json(info, "adapter info").get("fingerprint") == trainings[trial.name])

    groups: dict[str, list[Trial]] = {}
    for trial in trials:
        groups.setdefault(trainings[trial.name], []).append(trial)
    owners: dict[str, Trial] = {}
    for members in groups.values():
        done = [t for t in members if trained(t)]
        owner = (done or members)[0]
        owners.update({t.name: owner for t in members if t is not owner and t not in done})
    rewired = [dataclasses.replace(t, evaluate=dataclasses.replace(t.evaluate, adapter=owners[t.name].evaluate.adapter))
               if t.name in owners else t for t in trials]
    return rewired, {name: owner.name for name, owner in owners.items()}


def prepare(cfg: SweepConfig) -> Prepared:
    """Every check before any work: trials, pool, model, prompts, scorers, earlier trial folders."""
    import dataclasses

    from hgdpo.evaluate import evaluate as evaluation
    from hgdpo.pool import store as pool
    from hgdpo.train import trainer

    trials = cfg.expand()
    storage.check_writable(cfg.output, "sweep.output")
    tracking.check_store(cfg.mlflow_uri, cfg.mlflow_allow_local, "sweep.mlflow_uri")
    shared = [t for t in trials if "pool" not in t.values]  # the others name their own pool
    if shared:
        storage.check_reachable(cfg.pool, "sweep.pool")
        try:
            pool.read_meta(shared[0].train.pool)
        except HgdpoError as err:
            raise HgdpoError(f"sweep.{err}") from None  # "pool: x is not a pool" -> "sweep.pool: ..."
    params, trainings = {}, {}
    for trial in trials:
        try:
            _, plan, fingerprint = trainer.prepare(trial.train)
        except HgdpoError as err:
            raise HgdpoError(f"sweep trial {trial.name!r}: {err}") from None
        params[trial.name], trainings[trial.name] = trial_params(trial, plan), fingerprint
    trials, shares = share_adapters(trials, trainings)
    checked, baselines, baseline_inputs = {}, {}, {}
    for trial in trials:  # the test prompts and scorers; the adapter does not exist yet
        base = dataclasses.replace(trial.evaluate, adapter=None, lan=False, output="-")
        key = json.dumps(to_dict(base), sort_keys=True)
        if key not in checked:
            try:
                checked[key] = evaluation.prepare(base)
            except HgdpoError as err:
                raise HgdpoError(f"sweep trial {trial.name!r}: evaluate: {err}") from None
        baselines[trial.name] = evaluation.baseline_key(evaluation.baseline_settings(trial.evaluate, checked[key]))
        baseline_inputs.setdefault(baselines[trial.name], (trial.evaluate, checked[key]))
    for trial in trials:
        path = storage.join(trial.folder, TRIAL_FILE)
        if storage.is_file(path):
            stored = storage.read_json(path, "trial state")
            ours = {"train": to_dict(trial.train), "evaluate": to_dict(trial.evaluate)}
            # Which adapter a trial evaluates (its own, or one of the same training) is the sweep's wiring.
            changed = [f"{stage}.{k}" for stage in ours
                       for k in changed_settings(stored[stage], ours[stage], STAGE_CONFIGS[stage])
                       if (stage, k) != ("evaluate", "adapter")]
            if changed:
                raise HgdpoError(f"sweep.output: trial {trial.name!r} in {trial.folder} was run with other settings "
                                 f"({', '.join(changed[:5])}); use another output")
    return Prepared(cfg, trials, params, storage.absolute(cfg.output), trials[0].train.mlflow_uri, trainings, shares,
                    baselines, baseline_inputs)


# --- MLflow: one parent run per sweep, one nested run per trial ---------------------------------

def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in tracking.flat_params(params).items()]
    for start in range(0, len(items), 100):  # the store takes at most 100 params per batch
        client.log_batch(run_id, params=items[start: start + 100])


def parent_run(prep: Prepared) -> str:
    """The sweep's parent run: the one this output already has, else a new one."""
    cfg, uri = prep.cfg, prep.mlflow_uri
    client = _client(uri)
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


def _trial_runs(client, experiment_id: str, parent_id: str, name: str | None = None) -> dict[str, str]:
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
        owner = _trial_runs(client, exp, parent_id, payload["shares"]).get(payload["shares"])
        if owner is not None:
            shared["adapter_run_id"] = owner
    found = _trial_runs(client, exp, parent_id, name).get(name)
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


# --- The Tune trial ------------------------------------------------------------------------------

def _check_shared_adapter(payload: dict) -> None:
    """Refuse to evaluate another trial's adapter that it has not trained (it failed, or was stopped)."""
    from hgdpo.models.lora import INFO_FILE

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
    import mlflow
    import ray.data
    from ray import tune

    from hgdpo.evaluate.evaluate import evaluate
    from hgdpo.infra.quiet import quiet_libraries
    from hgdpo.train.trainer import train

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


# --- The driver ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _credentials_stay_home():
    """Ray Tune copies the driver's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN into
    every trial actor's runtime env, and each node's runtime-env agent logs runtime envs in full: the
    secret would be written to Ray's logs. Trials run where the nodes have credentials of their own (the
    node's environment, an instance profile), so they need no copy: stop Tune from making one."""
    from ray.tune.execution import class_cache

    kept = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = {v for v in kept if not v.startswith("AWS_")}
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = kept


def make_baselines(prep: Prepared, pending: list[Trial], cache: str, client, parent_id: str, log=print) -> None:
    """Baseline B's images and scores for the pending trials, once per distinct B, into ``cache``: made
    here, before any trial starts, so no two trials make them; the parent run records where they are
    and how many images were made (``baseline_images_generated``, logged only when some were)."""
    from hgdpo.evaluate.evaluate import REPORT, build_baseline

    keys = sorted({prep.baselines[t.name] for t in pending
                   if not storage.is_file(storage.join(t.evaluate.output, REPORT))})  # not evaluated yet
    made, locations = 0, []
    for key in keys:
        cfg, items = prep.baseline_inputs[key]
        location, images = build_baseline(cfg, items, cache, log=log)
        made, locations = made + images, locations + [location]
    if locations:
        client.set_tag(parent_id, "baseline_cache", ",".join(locations))
    if made:
        client.log_metric(parent_id, "baseline_images_generated", made)


def _ended(trial: Trial) -> bool:
    """The trial ran to its end (a result or a failure), not stopped from outside."""
    return any(storage.is_file(storage.join(trial.folder, f)) for f in (RESULT_FILE, ERROR_FILE))


def _run_round(trials: list[Trial], payloads: dict, concurrency: int, storage_path: str, name: str) -> None:
    """``trials`` on Ray Tune, ``concurrency`` at a time: one Tune experiment (Tune's own records; ours
    are the trial folders)."""
    from ray import tune

    by_name = {t.name: t for t in trials}
    trainable = tune.with_resources(tune.with_parameters(run_trial, payloads=payloads), TRIAL_RESOURCES)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.name for t in trials])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency,
            trial_name_creator=lambda tr: tr.config["trial"],
            trial_dirname_creator=lambda tr: f"{by_name[tr.config['trial']].index:03d}-{tr.trial_id}"),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0))
    with _credentials_stay_home():
        tuner.fit()


@dataclass
class TrialResult:
    name: str
    params: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "FINISHED"  # FINISHED, FAILED, UNFINISHED (stopped from outside)
    skipped: bool = False  # finished by an earlier run of the sweep
    error: str | None = None


@dataclass
class SweepResult:
    name: str
    output: str
    parent_run_id: str
    trials: list[TrialResult]
    swept: list[str]
    scorers: list[str]
    concurrency: int = 0
    duels: list = field(default_factory=list)  # Duel, in the table's order

    def table(self) -> str:
        rows = [{"trial": t.name, "params": t.params, "metrics": t.metrics, "status": t.status} for t in self.trials]
        return format_table(rows, self.swept, self.scorers)


def sweep(cfg: SweepConfig, log=print) -> SweepResult:
    """Run the sweep's unfinished trials on Ray Tune; every trial's result, and the MLflow runs."""
    import ray

    from hgdpo.infra.raycluster import ensure_ray, warn_if_not_shared

    prep = prepare(cfg)
    warn_if_not_shared(prep.output, "sweep.output", log)  # trials run on any node
    storage.probe_write(prep.output, "sweep.output")
    parent_id = parent_run(prep)
    client = _client(prep.mlflow_uri)
    experiment = client.get_run(parent_id).info.experiment_id
    cache = storage.join(prep.output, BASELINE_DIR)
    storage.write_json(storage.join(prep.output, SWEEP_FILE), {
        "config": to_dict(cfg), "mlflow_uri": tracking.redact(prep.mlflow_uri), "parent_run_id": parent_id,
        "versions": tracking.versions(), "trials": [t.name for t in prep.trials], "shares": prep.shares})
    payloads = {}
    for trial in prep.trials:
        storage.makedirs(trial.folder)
        payload = {"name": trial.name, "index": trial.index, "values": trial.values, "folder": str(trial.folder),
                   "train": to_dict(trial.train), "evaluate": to_dict(trial.evaluate), "params": prep.params[trial.name],
                   "training": prep.trainings[trial.name], "shares": prep.shares.get(trial.name),
                   "baseline_cache": cache, "sweep": cfg.name, "parent_run_id": parent_id, "experiment_id": experiment}
        storage.write_json(storage.join(trial.folder, TRIAL_FILE), payload)
        payloads[trial.name] = payload
    pending = [t for t in prep.trials if not storage.is_file(storage.join(t.folder, RESULT_FILE))]
    for trial in prep.trials:
        if trial not in pending:
            log(f"sweep: trial {trial.name} finished earlier; not rerun")
    # A trial sharing the adapter of a trial still to run runs after it, in a second round.
    later = [t for t in pending if prep.shares.get(t.name) in {p.name for p in pending}]
    rounds = [r for r in ([t for t in pending if t not in later], later) if r]
    for trial in pending:
        if trial.name in prep.shares:
            log(f"sweep: trial {trial.name} has the training of trial {prep.shares[trial.name]}: it evaluates that "
                f"trial's adapter{', after it' if trial in later else ''}")

    concurrency = 0
    if pending:
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # Train reports cost ~0.1 s, not ~2 s
        ensure_ray()
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        fits = fitting_trials(pending, cpus, gpus)
        concurrency = min(cfg.max_concurrent_trials or fits, len(pending))
        peak_cpu, peak_gpu = (max(trial_peak(t)[i] for t in pending) for i in (0, 1))
        if peak_cpu > cpus or peak_gpu > gpus:
            log(f"sweep: warning: a trial needs {peak_cpu:g} CPUs and {peak_gpu:g} GPUs at its peak, the cluster "
                f"has {cpus:g} and {gpus:g}; it waits until the cluster grows")
        elif concurrency > fits:
            log(f"sweep: warning: max_concurrent_trials={concurrency}, but only {fits} trial(s) fit at their peak "
                f"({peak_cpu:g} CPUs, {peak_gpu:g} GPUs each, of {cpus:g}, {gpus:g}): trials may wait on each "
                f"other's actors")
        log(f"sweep: {len(pending)} of {len(prep.trials)} trials to run, {concurrency} at a time "
            f"(each at most {peak_cpu:g} CPUs, {peak_gpu:g} GPUs; cluster {cpus:g}, {gpus:g})")
        try:
            make_baselines(prep, pending, cache, client, parent_id, log)
        except BaseException:
            client.set_terminated(parent_id, "FAILED")
            raise
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        for number, trials in enumerate(rounds, 1):
            if number > 1 and not all(_ended(t) for t in rounds[0]):  # stopped from outside: start no more
                break
            _run_round(trials, payloads, min(concurrency, len(trials)), storage.join(prep.output, "tune"),
                       f"{stamp}-{number}")

    out = _collect(prep, parent_id, pending, concurrency)
    results, duels = out.trials, out.duels
    failed = [t for t in results if t.status == "FAILED"]
    unfinished = [t for t in results if t.status == "UNFINISHED"]
    runs = _trial_runs(client, experiment, parent_id) if unfinished else {}
    for trial in unfinished:
        if trial.name in runs:  # started, then stopped; one never started has no run
            client.set_terminated(runs[trial.name], "KILLED")
    text = out.table()
    if duels:
        text += "\n\n" + format_duels(duels, out.scorers)
        import mlflow

        stamp = int(time.time() * 1000)
        client.log_batch(parent_id, metrics=[mlflow.entities.Metric(key, value, stamp, 0)
                                             for d in duels for key, value in duel_metrics(d).items()])
    storage.write_text(storage.join(prep.output, "table.md"), text + "\n")
    client.log_text(parent_id, text + "\n", "sweep/table.md")
    client.set_terminated(parent_id, "FAILED" if failed else "KILLED" if unfinished else "FINISHED")
    problems = []
    if failed:
        listed = "; ".join(f"{t.name}: {t.error}" for t in failed)
        problems.append(f"{len(failed)} of {len(results)} trials failed ({listed})")
    if unfinished:
        problems.append(f"{len(unfinished)} of {len(results)} trials were stopped before they ended "
                        f"({', '.join(t.name for t in unfinished)})")
    if problems:
        raise HgdpoError(f"sweep: {'; '.join(problems)}; rerun the same command to run them again (after fixing "
                         f"the cause of a failure)")
    return out


def _collect(prep: Prepared, parent_id: str, pending: list[Trial], concurrency: int = 0) -> SweepResult:
    """What the trial folders hold: each trial's result (finished, failed or unfinished) and the duels of
    the finished ones."""
    results = []
    for trial in prep.trials:
        done, failed = storage.join(trial.folder, RESULT_FILE), storage.join(trial.folder, ERROR_FILE)
        if storage.is_file(done):
            stored = storage.read_json(done, "trial result")
            results.append(TrialResult(trial.name, stored["params"], stored["metrics"], skipped=trial not in pending))
        elif storage.is_file(failed):
            message = storage.read_text(failed).strip()
            results.append(TrialResult(trial.name, prep.params[trial.name], status="FAILED", error=message))
        else:  # stopped from outside (Ctrl-C, a lost node) before it ended, or not started
            results.append(TrialResult(trial.name, prep.params[trial.name], status="UNFINISHED"))
    swept = sorted({k for t in prep.trials for k in t.values}, key=list(PARAMETERS).index)
    finished = [t for t, r in zip(prep.trials, results) if r.status == "FINISHED"]
    return SweepResult(prep.cfg.name, str(prep.output), parent_id, results, swept,
                       list(prep.trials[0].evaluate.scorers), concurrency, head_to_head(finished, prep.cfg.duels))


def collect(cfg: SweepConfig) -> SweepResult:
    """The sweep as its output holds it now, running nothing (e.g. to report while trials are left)."""
    prep = prepare(cfg)
    sweep_file = storage.join(prep.output, SWEEP_FILE)
    parent = storage.read_json(sweep_file, "sweep state")["parent_run_id"] if storage.is_file(sweep_file) else ""
    return _collect(prep, parent, [])


# --- The paper-style table -----------------------------------------------------------------------

def _number(value: str) -> str:
    """A parameter value as shown: ``2500.0`` -> ``2500``, ``True`` -> ``true``."""
    try:
        return value_text(float(value)) if value not in ("True", "False") else value.lower()
    except ValueError:
        return value


def format_table(rows: list[dict], swept: list[str], scorers: list[str]) -> str:
    """One row per trial: swept parameters, win rate per scorer with its interval, H/S/V change.

    ``rows``: ``{"trial", "params" (name -> value), "metrics" (as ``EvalResult.metrics``), "status"}``.
    """
    head = ["trial", *swept, *(f"{s} win rate [interval]" for s in scorers), "H change", "S change", "V change"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        m, cells = row["metrics"], [row["trial"]]
        cells += [_number(str(row["params"].get(k, ""))) for k in swept]
        for s in scorers:
            if f"win_rate_{s}" in m:
                cells.append(f"{100 * m[f'win_rate_{s}']:.1f}% [{100 * m[f'win_rate_{s}_low']:.1f}, "
                             f"{100 * m[f'win_rate_{s}_high']:.1f}]")
            else:
                cells.append(row.get("status") or "-")
        cells += [f"{m[f'{c}_change_pct']:+.2f}%" if f"{c}_change_pct" in m else "-" for c in "hsv"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Duel:
    """Trial ``a``'s adapter against trial ``b``'s, on the same prompts and seeds (their A sides)."""

    a: Trial
    b: Trial
    rates: dict[str, Any]  # scorer -> winrates.WinRate
    objects: dict[str, float] = field(default_factory=dict)  # the world's object-level rates, A's minus B's


def object_reports(output: str) -> tuple[list[str], list]:
    """The prompt of each (prompt, seed) comparison of the evaluation in ``output``, in ``_a_scores``'s order,
    and the world's object-level report (``hgdpo.world.objects.object_report``) of its A image."""
    from hgdpo.evaluate.evaluate import read_scores
    from hgdpo.pool.store import png_image
    from hgdpo.world.objects import object_report

    table = read_scores(output, columns=["prompt_id", "k", "prompt", "image_a"])
    table = table.sort_by([("prompt_id", "ascending"), ("k", "ascending")])
    return table.column("prompt_id").to_pylist(), [
        object_report(png_image(png), prompt)
        for png, prompt in zip(table.column("image_a").to_pylist(), table.column("prompt").to_pylist())]


def _a_scores(output: str, scorers: list[str]) -> Any:
    from hgdpo.evaluate.evaluate import read_scores

    columns = ["prompt_id", "k", "seed", *(f"score_a_{s}" for s in scorers)]
    table = read_scores(output, columns=columns)
    return table.sort_by([("prompt_id", "ascending"), ("k", "ascending")])


def compare_outputs(a: str, b: str, scorers: list[str], *, resamples: int = 2000, confidence: float = 0.95,
                    seed: int = 0, reports: dict | None = None) -> tuple[dict[str, Any], dict[str, float]] | None:
    """The A images of evaluation folder ``a`` against those of ``b``, paired by (prompt, seed): each
    scorer's win rate (``winrates.WinRate``) with a bootstrap interval over prompts and, with the world's
    judge among ``scorers``, the object-level rates A's minus B's (``hgdpo.world.objects.summarize``).
    None when the two were not made on the same prompts and seeds. ``reports``: object reports by folder,
    filled here, so that a folder in several comparisons is judged once."""
    from hgdpo.report.winrates import win_rate
    from hgdpo.world.objects import summarize

    sa, sb = _a_scores(a, scorers), _a_scores(b, scorers)
    if not all(sa.column(c).equals(sb.column(c)) for c in ("prompt_id", "k", "seed")):
        return None
    groups = sa.column("prompt_id").to_numpy()
    rates = {s: win_rate(sa.column(f"score_a_{s}").to_numpy(), sb.column(f"score_a_{s}").to_numpy(), groups,
                         resamples=resamples, confidence=confidence, seed=seed) for s in scorers}
    if "judge" not in scorers:
        return rates, {}
    reports = {} if reports is None else reports
    for output in (a, b):
        if output not in reports:
            reports[output] = object_reports(output)
    (prompts, ra), (_, rb) = reports[a], reports[b]
    return rates, summarize(ra, rb, prompts, resamples=resamples, confidence=confidence, seed=seed)


def duel_pairs(trials: list[Trial], named: list[list[str]] | None = None) -> list[tuple[Trial, Trial]]:
    """Which trials meet head to head: the ``named`` [A, B] pairs whose trials are both among ``trials``;
    by default each with the one before it in the sweep's order, and (with more than two) the last with
    the first: N-20 against N-2, the tables' extremes."""
    if named:
        by_name = {t.name: t for t in trials}
        return [(by_name[a], by_name[b]) for a, b in named if a in by_name and b in by_name]
    pairs = list(zip(trials[1:], trials[:-1]))
    return pairs + ([(trials[-1], trials[0])] if len(trials) > 2 else [])


def head_to_head(trials: list[Trial], named: list[list[str]] | None = None) -> list[Duel]:
    """The paired comparisons of finished trials (``duel_pairs``, ``compare_outputs``): every trial is
    evaluated on the same prompts and seeds, so the win rate of one adapter over another is measured on the
    same comparisons, with a bootstrap interval over prompts (the evaluate config's ``bootstrap``,
    ``confidence``, ``seed``). Trials evaluated on other prompts or seeds, or with no scorer in common, are
    not paired."""
    reports: dict[str, tuple[list[str], list]] = {}  # the world's object reports by evaluation, made once
    duels = []
    for a, b in duel_pairs(trials, named):
        common = [s for s in a.evaluate.scorers if s in b.evaluate.scorers]
        ev = a.evaluate
        found = compare_outputs(a.evaluate.output, b.evaluate.output, common, resamples=ev.bootstrap,
                                confidence=ev.confidence, seed=ev.seed, reports=reports) if common else None
        if found is not None:
            duels.append(Duel(a, b, *found))
    return duels


def duel_metrics(duel: Duel) -> dict[str, float]:
    """A duel as the parent run's metrics: ``h2h_<a index>_over_<b index>_<scorer>`` and its ``_low`` / ``_high``."""
    out = {}
    for scorer, r in duel.rates.items():
        key = f"h2h_{duel.a.index}_over_{duel.b.index}_{scorer}"
        out.update({key: r.rate, f"{key}_low": r.low, f"{key}_high": r.high})
    for rate in _object_rates(duel.objects):
        key = f"h2h_{duel.a.index}_over_{duel.b.index}_objects_{rate}"
        out.update({key: duel.objects[f"{rate}_diff"], f"{key}_low": duel.objects[f"{rate}_diff_low"],
                    f"{key}_high": duel.objects[f"{rate}_diff_high"]})
    return out


def _object_rates(objects: dict[str, float]) -> list[str]:
    from hgdpo.evaluate.evaluate import OBJECT_RATES

    return [rate for rate, _ in OBJECT_RATES if f"{rate}_diff" in objects]


def format_duels(duels: list[Duel], scorers: list[str]) -> str:
    return format_comparisons([(d.a.name, d.b.name, d.rates, d.objects) for d in duels], scorers)


def format_comparisons(rows: list[tuple[str, str, dict, dict]], scorers: list[str]) -> str:
    """The head-to-head tables of (A name, B name, scorer -> WinRate, object rates) rows: win rates, then
    (where the world's judge scored them) the object-level differences."""
    text = _duel_table([(a, b, rates) for a, b, rates, _ in rows], scorers)
    objects = [(a, b, {r: (found[f"{r}_diff"], found[f"{r}_diff_low"], found[f"{r}_diff_high"])
                       for r in _object_rates(found)}) for a, b, _, found in rows if found]
    return text + ("\n\n" + _objects_table(objects) if objects else "")


def _objects_table(rows: list[tuple[str, str, dict]]) -> str:
    """The object-level head-to-head table: one row per (A trial, B trial, rate -> (A - B, low, high))."""
    from hgdpo.evaluate.evaluate import OBJECT_RATES

    shown = [(rate, label) for rate, label in OBJECT_RATES if any(rate in cells for _, _, cells in rows)]
    lines = ["Objects head to head (the world's judge; A's rate minus B's in points, paired by prompt and seed):", "",
             "| A | B | " + " | ".join(label for _, label in shown) + " |", "|" + "---|" * (2 + len(shown))]
    for a, b, cells in rows:
        lines.append("| " + " | ".join([a, b, *(f"{100 * cells[r][0]:+.1f} [{100 * cells[r][1]:+.1f}, "
                                                f"{100 * cells[r][2]:+.1f}]" if r in cells else "-"
                                                for r, _ in shown)]) + " |")
    return "\n".join(lines)


def _duel_table(rows: list[tuple[str, str, dict]], scorers: list[str]) -> str:
    """The head-to-head table: one row per (A trial, B trial, scorer -> WinRate)."""
    head = ["A", "B", *(f"{s} win rate of A [interval]" for s in scorers)]
    lines = ["Head to head (A's adapter against B's, on the same prompts and seeds):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a, b, rates in rows:
        lines.append("| " + " | ".join([a, b, *(rate_cell(rates[s]) if s in rates else "-" for s in scorers)]) + " |")
    return "\n".join(lines)


def table_from_mlflow(name: str, uri: str | None = None, experiment: str = "hgdpo-sweep") -> str:
    """The table of sweep ``name`` as MLflow holds it (its latest parent run of that name)."""
    import ast

    uri = tracking.tracking_uri(uri)
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise HgdpoError(f"table: no experiment {experiment!r} at {uri}")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.sweep = '{name}' and tags.stage = 'sweep'",
                                 order_by=["attributes.start_time DESC"])
    if not parents:
        raise HgdpoError(f"table: no sweep named {name!r} in experiment {experiment!r} at {uri}")
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], max_results=10000,
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    children.sort(key=lambda r: int(r.data.tags.get("trial_index", 0)))
    swept = [k for k in parent.data.tags.get("swept", "").split(",") if k]
    scorers: list[str] = []
    for child in children:
        raw = child.data.params.get("evaluate.scorers")
        for s in (ast.literal_eval(raw) if raw else []):
            if s not in scorers:
                scorers.append(s)
    rows = [{"trial": c.data.tags.get("trial", c.info.run_name), "params": c.data.params, "metrics": c.data.metrics,
             "status": c.info.status} for c in children]
    output = parent.data.tags.get("sweep_output", "")
    head = (f"sweep {name}: {len(children)} trials, {parent.info.status.lower()} ({output}); "
            f"A = the trial's adapter, B = the base model")
    if len(parents) > 1:
        head += f"\n(the latest of {len(parents)} sweeps named {name!r}; the others wrote elsewhere)"
    text = head + "\n\n" + format_table(rows, swept, scorers)
    names = {int(c.data.tags.get("trial_index", 0)): rows[i]["trial"] for i, c in enumerate(children)}
    duels = duels_from_metrics(parent.data.metrics, names, scorers)
    return text + ("\n\n" + duels if duels else "")


def duels_from_metrics(metrics: dict[str, float], names: dict[int, str], scorers: list[str]) -> str:
    """``format_duels``'s table again, from the parent run's ``h2h_*`` metrics."""
    from hgdpo.report.winrates import WinRate

    found: dict[tuple[int, int], dict] = {}
    objects: dict[tuple[int, int], dict] = {}
    for key, value in metrics.items():
        parts = key.split("_")
        if key.startswith("h2h_") and len(parts) >= 5 and parts[2] == "over" and parts[-1] not in ("low", "high"):
            a, b, what = int(parts[1]), int(parts[3]), "_".join(parts[4:])
            low, high = metrics[f"{key}_low"], metrics[f"{key}_high"]
            if what.startswith("objects_"):
                objects.setdefault((a, b), {})[what.removeprefix("objects_")] = (value, low, high)
            else:
                found.setdefault((a, b), {})[what] = WinRate(value, low, high, 0, 0, 0, 0)
    order = sorted(found, key=lambda ab: (ab[0] - ab[1] != 1, ab[0]))  # neighbours, then the last against the first
    rows = [(names.get(a, str(a)), names.get(b, str(b)), found[a, b]) for a, b in order]
    text = _duel_table(rows, scorers) if rows else ""
    object_rows = [(names.get(a, str(a)), names.get(b, str(b)), objects[a, b]) for a, b in order if (a, b) in objects]
    return text + ("\n\n" + _objects_table(object_rows) if object_rows else "")


def rate_cell(r) -> str:
    """A WinRate as a table cell: ``53.2% [50.0, 56.8]``."""
    return f"{100 * r.rate:.1f}% [{100 * r.low:.1f}, {100 * r.high:.1f}]"
