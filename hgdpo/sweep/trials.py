"""A checked sweep (``prepare``): its trials, their parameters and peaks, what they share, the trial files.

``prepare`` makes every check before any work: the trials' train and evaluate configs, the pool
(pool size, loser rank and dataset size against the pool's N and prompts), the model, the test
prompts and the scorers, and the trial folders of an earlier run (one written with other settings is
refused). It also finds what trials share: trials of the same training (``hgdpo.train.trainer.fingerprint``)
evaluate one adapter (``share_adapters``), and trials of the same baseline B read one set of B's rows
(``hgdpo.evaluate.baseline``). ``trial_peak`` and ``fitting_trials`` size how many trials run at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from hgdpo.config.core import changed_settings, to_dict
from hgdpo.errors import HgdpoError
from hgdpo.evaluate import evaluate as evaluation
from hgdpo.evaluate.baseline import baseline_key, baseline_settings
from hgdpo.evaluate.config import EvalConfig
from hgdpo.infra import storage, tracking
from hgdpo.models.lora import INFO_FILE
from hgdpo.pool import store as pool
from hgdpo.sweep.config import EVAL_PARAMETERS, TRAIN_PARAMETERS, SweepConfig, Trial
from hgdpo.train import trainer
from hgdpo.train.config import TrainConfig

TRIAL_FILE = "trial.json"  # written before any work: the trial's settings
STAGE_CONFIGS = {"train": TrainConfig, "evaluate": EvalConfig}  # a trial file's sections
RESULT_FILE = "result.json"  # written when the trial is done: its parameters and metrics
ERROR_FILE = "error.txt"  # the message of the trial's last failure
SWEEP_FILE = "sweep.json"  # the sweep's resolved config, versions and MLflow parent run
BASELINE_DIR = "baseline"  # baseline B's rows, one folder per distinct B (hgdpo.evaluate.baseline.build_baseline)


def _param(train, name: str) -> Any:
    """A train setting as the trial used it: an unset ``lambda_stat`` is the objective's default."""
    value = getattr(train, name)
    return train.stat_weight() if name == "lambda_stat" and value is None else value


def trial_params(trial: Trial, plan) -> dict[str, Any]:
    """The trial's parameters under their common names, resolved (pool_size None -> the pool's N)."""
    return {**{k: _param(trial.train, k) for k in TRAIN_PARAMETERS},
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
        baselines[trial.name] = baseline_key(baseline_settings(trial.evaluate, checked[key]))
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
