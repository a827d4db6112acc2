"""Sweeps: the paper's ablations as Ray Tune trials of (train -> evaluate against the base model).

``sweep(cfg)`` (the driver) expands the sweep into trials (``hgdpo.sweep.config``) and checks
every one before any work (``hgdpo.sweep.trials``): its train and evaluate configs, the pool (pool
size, loser rank and dataset size against the pool's N and prompts), the model, the test prompts and
the scorers. Then it opens the sweep's MLflow parent run (``hgdpo.sweep.mlflow_runs``), makes baseline
B's images and scores, and runs the unfinished trials on Ray Tune (``hgdpo.sweep.trainable``): each is
a function trainable holding no CPU, which opens its nested MLflow run when it starts (params under
the common names: pool_size, loser_rank, dataset_size, beta, lambda_stat, objective, lan, alpha,
...), runs ``hgdpo.train.trainer.train`` (a TorchTrainer inside) and ``hgdpo.evaluate.evaluate.evaluate``
(Ray Data actors), both logging into that run, and reports the win rates. Last, the finished trials
meet head to head (``hgdpo.report.duel``) and the table is written (``hgdpo.report.tables``).

Work made once: B is the same for every trial (only A's settings are swept), so the driver makes
B's rows once per distinct B, before any trial starts (no two trials can race to make them), into
``<output>/baseline/<digest of B's settings and the test prompts>`` (``hgdpo.evaluate.baseline``); each trial's evaluation reads
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
import os
import time
from dataclasses import dataclass, field
from typing import Any

import mlflow
import ray
from ray import tune
from ray.tune.execution import class_cache

from hgdpo.config.core import to_dict
from hgdpo.errors import HgdpoError
from hgdpo.evaluate.baseline import build_baseline
from hgdpo.evaluate.evaluate import REPORT
from hgdpo.infra import storage, tracking
from hgdpo.infra.raycluster import ensure_ray, warn_if_not_shared
from hgdpo.report.duel import Duel, duel_metrics, head_to_head
from hgdpo.report.tables import format_duels, format_table
from hgdpo.sweep.config import PARAMETERS, SweepConfig, Trial
from hgdpo.sweep.mlflow_runs import mlflow_client, parent_run, trial_runs
from hgdpo.sweep.trainable import TRIAL_RESOURCES, run_trial
from hgdpo.sweep.trials import (
    BASELINE_DIR,
    ERROR_FILE,
    RESULT_FILE,
    SWEEP_FILE,
    TRIAL_FILE,
    Prepared,
    fitting_trials,
    prepare,
    trial_peak,
)


@contextlib.contextmanager
def _credentials_stay_home():
    """Ray Tune copies the driver's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN into
    every trial actor's runtime env, and each node's runtime-env agent logs runtime envs in full: the
    secret would be written to Ray's logs. Trials run where the nodes have credentials of their own (the
    node's environment, an instance profile), so they need no copy: stop Tune from making one."""
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
    duels: list[Duel] = field(default_factory=list)  # in the table's order

    def table(self) -> str:
        rows = [{"trial": t.name, "params": t.params, "metrics": t.metrics, "status": t.status} for t in self.trials]
        return format_table(rows, self.swept, self.scorers)


def sweep(cfg: SweepConfig, log=print) -> SweepResult:
    """Run the sweep's unfinished trials on Ray Tune; every trial's result, and the MLflow runs."""
    prep = prepare(cfg)
    warn_if_not_shared(prep.output, "sweep.output", log)  # trials run on any node
    storage.probe_write(prep.output, "sweep.output")
    parent_id = parent_run(prep)
    client = mlflow_client(prep.mlflow_uri)
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
    runs = trial_runs(client, experiment, parent_id) if unfinished else {}
    for trial in unfinished:
        if trial.name in runs:  # started, then stopped; one never started has no run
            client.set_terminated(runs[trial.name], "KILLED")
    text = out.table()
    if duels:
        text += "\n\n" + format_duels(duels, out.scorers)
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
