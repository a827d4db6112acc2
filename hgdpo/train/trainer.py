"""HG-DPO training on Ray Train: LoRA Diffusion-DPO + statistic matching, data parallel (paper §3.2).

``train(cfg)`` (the driver) checks the pool, the base model and any checkpoint before it starts,
finds or writes the pair dataset of the run's selection (``hgdpo.train.pair_data``: winner and loser
latents and the prompts' text-encoder hidden states, once per selection, beside the output), then
runs ``train_loop`` on ``cfg.workers`` Ray Train workers (DDP: gloo on CPU, NCCL on GPU).

A worker (``hgdpo.train.worker``) takes the objective's loss per micro-batch (``hgdpo.train.step``; the
objectives are ``hgdpo.objectives``). An objective that selects pairs otherwise than one per prompt (ospo:
the self-judge's, at most one; kto: several) makes the plan's D the number of pairs it took.

Checkpoints (adapter, optimizer, schedule, loss scaler, step) go through ``ray.train.report`` every
``checkpoint_every`` steps into Ray Train's storage at ``<output>/checkpoints`` (a local folder or
a URI: no file is left on a worker's disk); a worker failure restarts the group from the last one
(``FailureConfig``), and rerunning the same command resumes from it too. The last checkpoint also
holds the adapter, which the driver copies to ``<output>/adapter``. A non-finite loss, or a
non-finite gradient without a loss scaler to explain it, stops the run cleanly (rank 0's return
value tells the driver) and keeps the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import ray
import ray.train
from ray.train.torch import TorchTrainer

from hgdpo.config.core import to_dict
from hgdpo.errors import HgdpoError
from hgdpo.infra import storage, tracking
from hgdpo.infra.raycluster import ensure_ray, warn_if_not_shared
from hgdpo.models import loading as models
from hgdpo.models.lora import INFO_FILE
from hgdpo.objectives.registry import OBJECTIVES, by_selection
from hgdpo.pool import store as pool
from hgdpo.train import pair_data
from hgdpo.train.config import TrainConfig
from hgdpo.train.optim import eight_bit_available
from hgdpo.train.pairs import PairPlan
from hgdpo.train.pairs import plan as make_plan
from hgdpo.train.worker import ADAPTER_DIR, train_loop

RUN_NAME = "train"  # Ray Train run folder inside <output>/checkpoints
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's registered checkpoints


def _digest(settings: dict, meta: dict) -> str:
    data = dict(settings, pool_fingerprint=meta["fingerprint"])
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(cfg: TrainConfig, meta: dict) -> str:
    """What a checkpoint and an adapter of ``cfg`` on this pool are stamped with."""
    return _digest(cfg.resume_settings(), meta)


def fingerprints(cfg: TrainConfig, meta: dict) -> tuple[str, ...]:
    """The stamps that match ``cfg``: its own, then those of older adapters that trained the same way."""
    return (fingerprint(cfg, meta), *(_digest(s, meta) for s in cfg.legacy_resume_settings()))


@dataclass
class TrainResult:
    output: str
    adapter: str
    steps: int
    metrics: dict
    skipped: bool = False


def _run_dir(output: str) -> str:
    """Where Ray Train keeps the run's checkpoints: ``<output>/checkpoints/train`` (local or a URI)."""
    return storage.join(output, "checkpoints", RUN_NAME)


def _latest(output: str):
    """The run's latest checkpoint as Ray Train registered it (whole: registered after its upload), or None."""
    if not storage.exists(storage.join(_run_dir(output), CHECKPOINT_SNAPSHOT)):
        return None
    return ray.train.Result.from_path(_run_dir(output)).checkpoint


def _checkpoint_state(checkpoint) -> dict:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/state.json") as f:
        return json.loads(f.read())


def check_prediction_type(cfg: TrainConfig) -> None:
    """Refuse a model that does not predict the noise: eq. 3's errors, the SFT loss and eq. 8's sampler
    step all compare the UNet's output with the noise, so a v-prediction model would train, silently,
    against the wrong target."""
    scheduler = models.scheduler_config(cfg.model, model_config=cfg.model_config)
    cfg.timesteps(scheduler.get("num_train_timesteps", 1000))  # refuses a timestep_max past the schedule
    kind = scheduler.get("prediction_type", "epsilon")
    if kind != "epsilon":
        raise HgdpoError(f"train.model: {cfg.model!r} is a {kind} model (prediction_type in its scheduler config); "
                         f"training supports epsilon-prediction models only (SD1.5 and its fine-tunes), for every "
                         f"objective: its losses compare the UNet's output with the noise")


def _kept_pairs(plan_: PairPlan, pairs) -> PairPlan:
    """A selection that does not give one pair per prompt (ospo: at most one; kto: several): the plan over the pairs
    it took (the dataset's rows), refused when they cannot fill a global batch."""
    if by_selection(plan_.selection).per_prompt == "one":
        return plan_
    kept = dataclasses.replace(plan_, dataset_size=int(pairs.manifest["rows"]))
    if kept.steps_per_epoch() < 1:
        raise HgdpoError(f"train.dataset_size: the {plan_.selection} selection took {kept.dataset_size} pairs from "
                         f"the first {plan_.dataset_size} prompts, too few for {plan_.data_shards} shards and a global "
                         f"batch of {plan_.global_batch}; lower global_batch, or build a bigger pool")
    return kept


def prepare(cfg: TrainConfig) -> tuple[dict, PairPlan, str]:
    """Every check before work: storage, MLflow store, the pool, the base model, the ablation settings,
    the optimizer."""
    storage.check_reachable(cfg.pool, "train.pool")
    storage.check_writable(cfg.output, "train.output")
    storage.check_writable(cfg.pairs_root(), "train.pairs_folder")
    tracking.check_store(cfg.mlflow_uri, cfg.mlflow_allow_local, "train.mlflow_uri")
    meta = pool.read_meta(cfg.pool, "train.pool")
    source = models.check_model(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle)
    check_prediction_type(cfg)
    base = meta.get("base_model", {})
    ours = models.fingerprint(source)
    if base.get("fingerprint") != ours:
        raise HgdpoError(f"train.model: the pool {cfg.pool} was written with base model {base.get('name')!r} "
                         f"(fingerprint {base.get('fingerprint')}), not with {cfg.model!r} (fingerprint {ours})")
    objective = OBJECTIVES[cfg.objective](cfg)
    objective.check_pool(meta)
    plan_ = make_plan(meta, pool_size=cfg.pool_size, loser_rank=cfg.loser_rank, dataset_size=cfg.dataset_size,
                      data_shards=cfg.data_shards, global_batch=cfg.global_batch, seed=cfg.seed,
                      selection=objective.selection, margin=objective.plan_margin())
    objective.check_model(models.component_config(cfg.model, "unet", model_config=cfg.model_config), cfg.model)
    if cfg.optimizer == "adamw8bit" and not eight_bit_available():
        raise HgdpoError("train.optimizer: adamw8bit needs CUDA and bitsandbytes; use `auto` or `adamw`")
    return meta, plan_, fingerprint(cfg, meta)


def _publish(checkpoint, adapter: str) -> None:
    """Copy the final checkpoint's adapter to ``<output>/adapter`` (its info file last) and into the active
    MLflow run."""
    with checkpoint.as_directory() as local:
        mlflow.log_artifacts(str(Path(local) / ADAPTER_DIR), artifact_path="adapter")  # first: a rerun retries both
        storage.copy_tree(str(Path(local) / ADAPTER_DIR), adapter, last=INFO_FILE)


def train(cfg: TrainConfig, log=print, mlflow_run_id: str | None = None) -> TrainResult:
    """Train (or resume, or find finished) the adapter described by ``cfg``.

    The run is recorded in a new MLflow run, or in ``mlflow_run_id`` (a sweep's trial run).
    """
    meta, plan_, fp = prepare(cfg)
    accepted = fingerprints(cfg, meta)
    output = storage.absolute(cfg.output)
    adapter = storage.join(output, ADAPTER_DIR)
    if storage.is_file(storage.join(adapter, INFO_FILE)):
        info = storage.read_json(storage.join(adapter, INFO_FILE), "adapter info")
        if info.get("fingerprint") not in accepted:
            raise HgdpoError(f"output: {output} holds an adapter trained with another config; use another output")
        log(f"train: {adapter} is already trained with this config; nothing to do")
        return TrainResult(output, adapter, cfg.max_steps, {}, skipped=True)
    latest = _latest(output)
    if latest is not None:
        state = _checkpoint_state(latest)
        if state.get("fingerprint") not in accepted:
            raise HgdpoError(f"output: the checkpoint {storage.join(_run_dir(output), storage.name(latest.path))} was "
                             f"written with another config (pool, model or training settings differ); use another output")
        log(f"train: resuming from {storage.name(latest.path)} (step {state['step']})")
    # Read and written by Ray tasks and workers on any node.
    for location, setting in ((cfg.pool, "train.pool"), (output, "train.output"),
                              (cfg.pairs_root(), "train.pairs_folder")):
        warn_if_not_shared(location, setting, log)
    storage.probe_write(output, "train.output")
    storage.probe_write(cfg.pairs_root(), "train.pairs_folder")

    ensure_ray()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # reports cost ~0.1 s, not ~2 s
    info = {"fingerprint": fp, "config": to_dict(cfg), "plan": asdict(plan_), "pool": storage.absolute(cfg.pool),
            "base_model": meta["base_model"], "versions": tracking.versions()}
    with tracking.run(cfg.mlflow_uri, cfg.mlflow_experiment, run_name=f"train:{storage.name(output)}",
                      run_id=mlflow_run_id) as run:
        if mlflow_run_id is None:
            mlflow.log_params(tracking.flat_params(dict(to_dict(cfg),
                                                        **{f"plan_{k}": v for k, v in asdict(plan_).items()})))
            mlflow.set_tags({"stage": "train", "output": output, "objective": cfg.objective})
        if latest is not None and _checkpoint_state(latest)["step"] >= cfg.max_steps:
            _publish(latest, adapter)  # trained before an interruption that came before the adapter was copied
            log(f"train: adapter written to {adapter}")
            return TrainResult(output, adapter, cfg.max_steps, {})
        loop_config = {
            "train": to_dict(cfg), "plan": asdict(plan_), "fingerprint": fp, "accepted": list(accepted),
            "latent_shape": meta["latent_shape"][1:], "adapter_info": info,
            "mlflow_run_id": run.info.run_id, "mlflow_uri": tracking.tracking_uri(cfg.mlflow_uri),
            "driver_node": ray.get_runtime_context().get_node_id(),
        }
        use_gpu = cfg.gpus_per_worker > 0
        # Selected (once per selection) while the CPUs are free; workers then read only their shards' records.
        pairs = pair_data.ensure(cfg, meta, plan_, models.fingerprint(models.resolve_model(
            cfg.model, allow_pickle=cfg.allow_pickle)), log)
        mlflow.set_tag("pairs", pairs.location)
        plan_ = _kept_pairs(plan_, pairs)
        if plan_.selection == "ospo":
            log(f"train: ospo: the self-judge kept {plan_.dataset_size} pairs")
            mlflow.set_tag("ospo_pairs", plan_.dataset_size)
        elif by_selection(plan_.selection).per_prompt != "one":
            log(f"train: {cfg.objective}: {plan_.dataset_size} pairs from the pool")
        info["plan"] = asdict(plan_)
        loop_config.update(pairs=pairs.location, pairs_manifest=pairs.manifest, plan=asdict(plan_))
        trainer = TorchTrainer(
            train_loop, train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.workers, use_gpu=use_gpu,
                resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}),
            # Checkpoints go to the output's storage (a URI on a cluster): never to a worker's disk.
            run_config=ray.train.RunConfig(
                name=RUN_NAME, storage_path=storage.join(output, "checkpoints"),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                # Ray Train's INFO lines (worker group, process group, each checkpoint) stay in its log files;
                # rank 0's step lines are the job's progress.
                logging_config=ray.train.LoggingConfig(log_level="WARNING")))
        result = trainer.fit()
        metrics = result.metrics or {}
        stopped = result.return_value or {}
        if stopped.get("nonfinite_step"):
            kept = (f"; the last good checkpoint is {storage.join(_run_dir(output), storage.name(result.checkpoint.path))}"
                    if result.checkpoint is not None else "")
            raise HgdpoError(f"train: the loss or its gradient became NaN/infinite at step {stopped['nonfinite_step']} "
                             f"(a corrupt pool row, or learning_rate/beta too high){kept}")
        final = result.checkpoint
        if final is None or _checkpoint_state(final)["step"] != cfg.max_steps:
            raise HgdpoError(f"train: the run ended without its final checkpoint in {_run_dir(output)}")
        _publish(final, adapter)
    log(f"train: adapter written to {adapter}")
    return TrainResult(output, adapter, cfg.max_steps, metrics)
