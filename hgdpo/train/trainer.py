"""HG-DPO training on Ray Train: LoRA Diffusion-DPO + statistic matching, data parallel (paper §3.2).

``train(cfg)`` (the driver) checks the pool, the base model and any checkpoint before it starts,
finds or writes the pair dataset of the run's selection (``hgdpo.train.pair_data``: winner and loser
latents and the prompts' text-encoder hidden states, once per selection, beside the output), then
runs ``train_loop`` on ``cfg.workers`` Ray Train workers (DDP: gloo on CPU, NCCL on GPU).

A worker loads the UNet alone (no VAE, no text encoder) and reads only the records of its own data
shards, the next step's while the current one computes (``hgdpo.train.pairs`` fixes which pairs each
step takes). Per micro-batch it noises winner and loser with one shared timestep and noise draw
(seeded by step and pair, so the draw does not depend on how the batch is split over workers);
runs the reference (the same UNet, adapters disabled, no grad) and the policy on winner and loser
as one batch; and takes eq. 3 (+ eq. 8 from the same predictions, eq. 9). Gradients are accumulated
to the global batch, clipped, and applied with AdamW (8-bit Adam where bitsandbytes and CUDA are
present). Rank 0 sends the metrics to the run's MLflow run; with ``objective: focus`` also, at the run's first
step, ``focus/weights.png``: the focus weight of the first pairs at three timesteps (``focus_picture``); with
``objective: ospo``, ``ospo/masks.png``: their winners' and losers' object-mask weights (``ospo_picture``).

``objective: ospo`` reads a pool with hard negatives through the self-judge's pairs (``hgdpo.pool.ospo``; the plan's
D becomes the number of pairs it kept), and weights each image's error by its object mask, read from the
reference pass's cross-attention to the prompt's nouns (``hgdpo.models.attention.capture``: the same forward pass).

Precision (``precision``): float32 on CPU. On GPU the frozen UNet weights are held in the compute
dtype (bf16 where the GPU has it, else fp16) under autocast, the LoRA weights and their optimizer
state in float32; with fp16 a ``GradScaler`` scales the loss, and a step whose gradients overflow is
skipped (``optimizer_step``: the scaler halves its scale and training carries on).

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
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hgdpo.config.core import from_dict, to_dict
from hgdpo.errors import HgdpoError
from hgdpo.infra import devices, storage, tracking
from hgdpo.models import loading as models
from hgdpo.models.lora import INFO_FILE, add_lora, load_lora_state, lora_state, save_adapter
from hgdpo.objectives.registry import OBJECTIVES, by_selection
from hgdpo.pool import store as pool
from hgdpo.pool.ospo import decode_nouns
from hgdpo.train import pair_data
from hgdpo.train.config import TrainConfig
from hgdpo.train.pairs import PairPlan
from hgdpo.train.pairs import plan as make_plan
from hgdpo.train.step import first_picture, measures_stat, micro_step, pair_noise

RUN_NAME = "train"  # Ray Train run folder inside <output>/checkpoints
ADAPTER_DIR = "adapter"
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's registered checkpoints
PROBES = ("stat_dpo_grad_ratio",)  # metrics measured once a metrics window, not averaged over its steps


def lr_factor(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else max(0.0, 1 - progress)

    return factor


def eight_bit_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def make_optimizer(cfg: TrainConfig, params, device: torch.device):
    if cfg.optimizer == "adamw8bit" or (cfg.optimizer == "auto" and device.type == "cuda" and eight_bit_available()):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _digest(settings: dict, meta: dict) -> str:
    data = dict(settings, pool_fingerprint=meta["fingerprint"])
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(cfg: TrainConfig, meta: dict) -> str:
    """What a checkpoint and an adapter of ``cfg`` on this pool are stamped with."""
    return _digest(cfg.resume_settings(), meta)


def fingerprints(cfg: TrainConfig, meta: dict) -> tuple[str, ...]:
    """The stamps that match ``cfg``: its own, then those of older adapters that trained the same way."""
    return (fingerprint(cfg, meta), *(_digest(s, meta) for s in cfg.legacy_resume_settings()))


@dataclass(frozen=True)
class Precision:
    """How a worker computes: the autocast dtype, which also holds the frozen UNet weights (LoRA weights
    stay float32), and the fp16 loss scaler (None otherwise)."""

    dtype: torch.dtype
    device_type: str
    scaler: torch.amp.GradScaler | None = None

    def autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(device_type=self.device_type, enabled=False)
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def precision(cfg: TrainConfig, device: torch.device) -> Precision:
    """``mixed_precision`` on ``device``: float32 on CPU or with `no`; bf16 where the GPU has bf16 tensor
    cores (`auto`: Ampere on, not emulated bf16 on V100/T4; see ``hgdpo.infra.devices``) or when asked; else
    fp16 with a ``GradScaler`` (fp16 gradients underflow without one)."""
    if device.type != "cuda" or cfg.mixed_precision == "no":
        return Precision(torch.float32, device.type)
    if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and devices.has_bf16_tensor_cores(device)):
        return Precision(torch.bfloat16, "cuda")
    return Precision(torch.float16, "cuda", torch.amp.GradScaler("cuda"))


def hold_frozen_in(unet, dtype: torch.dtype) -> None:
    """Cast the frozen (base) weights to ``dtype``, leaving the trainable (LoRA) ones in float32: half the
    UNet's memory and weight reads under autocast, while the optimizer still updates float32 weights.
    (After ``add_lora``, so the adapter's initial values are the same in every precision.)"""
    for param in unet.parameters():
        if not param.requires_grad:
            param.data = param.data.to(dtype)


@dataclass(frozen=True)
class StepOutcome:
    """What ``optimizer_step`` did."""

    grad_norm: float  # of the unscaled gradients, before clipping (inf/NaN when they were not finite)
    applied: bool  # the optimizer updated the adapter
    diverged: bool  # non-finite gradients with no loss scaler to explain them: the run must stop


def optimizer_step(optimizer, params, max_grad_norm: float, scaler: torch.amp.GradScaler | None = None) -> StepOutcome:
    """Clip and apply the accumulated gradients, deciding what non-finite gradients mean.

    With a loss scaler (fp16), inf/NaN gradients are its normal overflow, not divergence: the step is
    skipped, the scaler multiplies its scale by its backoff factor (a half) and training carries on
    (the scale grows back after ``growth_interval`` good steps). Without one (float32, bf16) they mean
    the run diverged: nothing is applied and the caller stops. Under DDP the gradients were all-reduced
    before, so every worker decides alike."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")))
    if scaler is None:
        if not math.isfinite(grad_norm):
            return StepOutcome(grad_norm, applied=False, diverged=True)
        optimizer.step()
        return StepOutcome(grad_norm, applied=True, diverged=False)
    scale = scaler.get_scale()
    scaler.step(optimizer)  # skips optimizer.step() when unscale_ found inf/NaN
    scaler.update()  # ...and then lowers the scale: it only falls after an overflow
    return StepOutcome(grad_norm, applied=scaler.get_scale() >= scale, diverged=False)


def log_picture(client, run_id: str, artifact: str, picture) -> None:
    """``picture`` (a PIL image) as the PNG ``artifact`` (a path inside the run's artifacts) of the MLflow run
    ``run_id``, through ``client``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact).name
        picture.save(path)
        client.log_artifact(run_id, str(path), artifact_path=str(Path(artifact).parent))


def save_checkpoint(directory: Path, unet, optimizer, scheduler, step: int, fp: str,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """The training state of ``step`` in ``directory``: adapter, optimizer, LR schedule, loss scaler."""
    from safetensors.torch import save_file

    save_file(lora_state(unet), str(directory / "adapter.safetensors"))
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    torch.save(state, directory / "optimizer.pt")
    (directory / "state.json").write_text(json.dumps({"step": step, "fingerprint": fp}))


def load_checkpoint(directory: Path, unet, optimizer, scheduler, fp: str | tuple[str, ...],
                    scaler: torch.amp.GradScaler | None = None) -> int:
    """Restore what ``save_checkpoint`` wrote; returns its step. A checkpoint without a scaler's state (one
    written in bf16 or float32, ``mixed_precision: auto`` on other GPUs) leaves ``scaler`` as it starts."""
    from safetensors.torch import load_file

    state = json.loads((directory / "state.json").read_text())
    if state["fingerprint"] not in ((fp,) if isinstance(fp, str) else fp):
        raise HgdpoError(f"checkpoint {directory} was written with another config; use another output")
    load_lora_state(unet, load_file(str(directory / "adapter.safetensors")))
    # Our own file (tensors, numbers, dicts), so the safe weights-only unpickler suffices.
    opt = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if scaler is not None and "scaler" in opt:
        scaler.load_state_dict(opt["scaler"])
    return int(state["step"])


def _quiet_reports() -> None:
    """Ray Train 2.60 logs every ``ray.train.report`` call in full at INFO, from a logger named by its
    source file; the job prints its own metrics line instead."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the shard iterator's bar, per worker
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(os.path.join("execution", "context.py")):
            logging.getLogger(name).setLevel(logging.WARNING)


def _metrics_client(config: dict):
    """Rank 0's MLflow client for the training curves, or None where the store is out of its reach (a
    local store on another node than the driver's, allowed by ``mlflow_allow_local``)."""
    import mlflow
    import ray

    if not config.get("mlflow_run_id"):
        return None
    uri = tracking.tracking_uri(config["mlflow_uri"])
    if tracking.is_local_store(uri) and ray.get_runtime_context().get_node_id() != config["driver_node"]:
        sys.stdout.write(f"train: warning: rank 0 runs on another node than the local MLflow store "
                         f"{tracking.redact(uri)}; the training curves are not recorded\n")
        return None
    return mlflow.MlflowClient(tracking_uri=uri)


def _any_worker(flag: bool, world: int, device: torch.device) -> bool:
    """Whether ``flag`` holds on any worker (every worker must take the same decision, or the ones that
    carry on wait forever for the ones that stopped)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def train_loop(config: dict) -> dict | None:
    """One Ray Train worker. ``config``: plain data (the config, the pair plan, the pair dataset,
    provenance). Returns ``{"nonfinite_step": k}`` when step k's loss, or its gradient without a loss
    scaler, is not finite (rank 0's value is the run's)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from diffusers import DDPMScheduler

    from hgdpo.infra.quiet import quiet_libraries

    cfg = from_dict(TrainConfig, config["train"])
    plan_ = PairPlan(**config["plan"])
    quiet_libraries()
    _quiet_reports()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    prec = precision(cfg, device)
    objective = OBJECTIVES[cfg.objective](cfg)

    # The UNet alone: the hidden states come with the pairs, and the latents need no VAE.
    unet = models.load_unet(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle)
    # DDPM maths of the forward process and of eq. 8's sampler step; x0 clipping would make the
    # step non-linear in the prediction, and SD1.5's schedule has it off.
    noise_scheduler = DDPMScheduler.from_config(models.scheduler_config(cfg.model, model_config=cfg.model_config),
                                                clip_sample=False)
    params = add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    hold_frozen_in(unet, prec.dtype)
    unet.to(device)
    if cfg.checkpointing():
        unet.enable_gradient_checkpointing()
    model = ray.train.torch.prepare_model(unet, move_to_device=False) if world > 1 else unet
    optimizer = make_optimizer(cfg, params, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            start = load_checkpoint(Path(d), unet, optimizer, scheduler, tuple(config["accepted"]), prec.scaler)

    shards = plan_.worker_shards(rank, world)
    reader = pair_data.PairReader(config["pairs"], config["pairs_manifest"],
                                  owned=lambda index: np.isin(index % plan_.data_shards, shards))

    def load(step: int):
        index = np.concatenate([plan_.step_indices(step, v) for v in shards])  # this worker's pairs
        return index, reader.read(index)

    shape = tuple(config["latent_shape"])
    timesteps = cfg.timesteps(noise_scheduler.config.num_train_timesteps)
    mlflow_client = _metrics_client(config) if rank == 0 else None
    per_worker = cfg.global_batch // world
    sums: dict[str, float] = {}
    probes: dict[str, float] = {}  # measured once a window (every worker alike: their all-reduce needs one key set)
    counted, applied, skipped, tick = 0, 0, 0, time.perf_counter()
    steps = range(start, cfg.max_steps)
    for step, (index, batch) in zip(steps, pair_data.prefetched(load, steps)):
        if step == 0 and objective.picture_name and mlflow_client is not None:  # rank 0, once a run
            log_picture(mlflow_client, config["mlflow_run_id"], objective.picture_name,
                        first_picture(cfg, objective, unet, noise_scheduler, batch, index, step, device, prec.autocast()))
        for k in range(0, per_worker, cfg.micro_batch):
            part = slice(k, k + cfg.micro_batch)
            ids = index[part]
            drawn = [pair_noise(cfg.seed, step, int(i), shape, timesteps) for i in ids]
            t = torch.cat([d[0] for d in drawn]).to(device)
            noise = torch.stack([d[1] for d in drawn]).to(device)
            lat_w = torch.from_numpy(batch.latents_w[part]).to(device, torch.float32)
            lat_l = torch.from_numpy(batch.latents_l[part]).to(device, torch.float32)
            emb = torch.from_numpy(batch.hidden[part]).to(device, torch.float32)  # (m, L, D)
            last = k + cfg.micro_batch >= per_worker
            sync = model.no_sync() if (world > 1 and not last) else _null()
            # Not at step 0: a new adapter's policy is the reference there, so the statistic term's gradient is 0.
            probing = (k == 0 and cfg.probe_every > 0 and step > 0 and step % cfg.probe_every == 0
                       and measures_stat(cfg, objective))
            with sync:
                nouns = None if batch.nouns is None else [decode_nouns(x) for x in batch.nouns[part]]
                loss, stats = micro_step(cfg, model, unet, noise_scheduler, emb, lat_w, lat_l, t, noise,
                                         prec.autocast(), probe=params if probing else None, nouns=nouns,
                                         objective=objective)
                scaled = loss * (len(ids) / per_worker)
                (prec.scaler.scale(scaled) if prec.scaler else scaled).backward()
            for name, value in stats.items():
                if name in PROBES:
                    probes[name] = float(value)
                else:
                    sums[name] = sums.get(name, 0.0) + float(value) * len(ids) / per_worker
        # A non-finite loss is divergence (or a corrupt pair) in any precision; rank 0's return value
        # reaches the driver as Result.return_value (no file on any node's disk).
        if _any_worker(not all(math.isfinite(v) for v in sums.values()), world, device):
            return {"nonfinite_step": step + 1}
        outcome = optimizer_step(optimizer, params, cfg.max_grad_norm, prec.scaler)
        optimizer.zero_grad(set_to_none=True)
        if outcome.diverged:
            return {"nonfinite_step": step + 1}
        if outcome.applied:
            scheduler.step()  # the schedule counts updates made (as accelerate does for a skipped step)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + outcome.grad_norm
            applied += 1
        else:
            skipped += 1
        counted += 1
        done = step + 1
        is_ckpt = done % cfg.checkpoint_every == 0 or done == cfg.max_steps
        if done % cfg.metrics_every == 0 or is_ckpt:
            window = {k: v / (applied if k == "grad_norm" else counted) for k, v in sums.items()} | probes
            values = torch.tensor([window[k] for k in sorted(window)], dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(values)
                values /= world
            now = time.perf_counter()
            metrics = {k: float(v) for k, v in zip(sorted(window), values.cpu())}
            metrics.update(step=done, lr=scheduler.get_last_lr()[0],
                           pairs_per_s=counted * cfg.global_batch / (now - tick))
            if prec.scaler is not None:
                metrics.update(loss_scale=prec.scaler.get_scale(), skipped_steps=float(skipped))
            if mlflow_client is not None:
                from mlflow.entities import Metric

                stamp = int(time.time() * 1000)
                mlflow_client.log_batch(config["mlflow_run_id"], metrics=[
                    Metric(k, float(v), stamp, done) for k, v in metrics.items() if k != "step"])
            if rank == 0:  # written, not printed: Ray Train's print patch would show the line twice
                sys.stdout.write(f"train: step {done}/{cfg.max_steps} loss {metrics.get('loss', float('nan')):.4f} "
                                 f"(dpo {metrics.get('dpo', 0):.4f}, stat {metrics.get('stat', 0):.3g}) accuracy "
                                 f"{metrics.get('accuracy', 0):.3f} lr {metrics['lr']:.3g} "
                                 f"{metrics['pairs_per_s']:.1f} pairs/s"
                                 + (f", {skipped} steps skipped (fp16 overflow)" if skipped else "") + "\n")
                sys.stdout.flush()
            sums, probes, counted, applied, skipped, tick = {}, {}, 0, 0, 0, time.perf_counter()
            if is_ckpt:  # Ray Train uploads it to the run's storage (local or a URI); the last holds the adapter
                with tempfile.TemporaryDirectory() as tmp:
                    if rank == 0:
                        save_checkpoint(Path(tmp), unet, optimizer, scheduler, done, config["fingerprint"],
                                        prec.scaler)
                        if done == cfg.max_steps:
                            save_adapter(unet, Path(tmp) / ADAPTER_DIR, cfg.lora_rank, cfg.lora_alpha,
                                         config["adapter_info"])
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                                     checkpoint_dir_name=f"checkpoint_{done:08d}")
            else:
                ray.train.report(metrics)
    reader.close()
    return None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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
    import ray.train

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
    import mlflow

    with checkpoint.as_directory() as local:
        mlflow.log_artifacts(str(Path(local) / ADAPTER_DIR), artifact_path="adapter")  # first: a rerun retries both
        storage.copy_tree(str(Path(local) / ADAPTER_DIR), adapter, last=INFO_FILE)


def train(cfg: TrainConfig, log=print, mlflow_run_id: str | None = None) -> TrainResult:
    """Train (or resume, or find finished) the adapter described by ``cfg``.

    The run is recorded in a new MLflow run, or in ``mlflow_run_id`` (a sweep's trial run).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from hgdpo.infra.raycluster import ensure_ray, warn_if_not_shared

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
        import mlflow

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
