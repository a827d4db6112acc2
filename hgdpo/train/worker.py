"""One Ray Train worker of a training run (``train_loop``), and what it needs around it.

A worker loads the UNet alone (no VAE, no text encoder) and reads only the records of its own data
shards, the next step's while the current one computes (``hgdpo.train.pairs`` fixes which pairs each
step takes). Per micro-batch it takes the objective's loss (``hgdpo.train.step``). Gradients are
accumulated to the global batch, clipped, and applied (``hgdpo.train.optim``). Rank 0 sends the
metrics to the run's MLflow run, and at the run's first step the objective's picture, if it has one
(``focus/weights.png``, ``ospo/masks.png``). Checkpoints (adapter, optimizer, schedule, loss scaler,
step) go through ``ray.train.report`` every ``checkpoint_every`` steps; the last also holds the adapter.
A non-finite loss, or a non-finite gradient without a loss scaler to explain it, stops the run: rank
0's return value tells the driver.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from diffusers import DDPMScheduler
from mlflow.entities import Metric

from hgdpo.config.core import from_dict
from hgdpo.infra import tracking
from hgdpo.infra.quiet import quiet_libraries
from hgdpo.models import loading as models
from hgdpo.models.lora import add_lora, save_adapter
from hgdpo.objectives.registry import OBJECTIVES
from hgdpo.pool.ospo import decode_nouns
from hgdpo.train import pair_records
from hgdpo.train.config import TrainConfig
from hgdpo.train.optim import (
    hold_frozen_in,
    load_checkpoint,
    lr_factor,
    make_optimizer,
    optimizer_step,
    precision,
    save_checkpoint,
)
from hgdpo.train.pairs import PairPlan
from hgdpo.train.step import first_picture, measures_stat, micro_step, pair_noise

ADAPTER_DIR = "adapter"  # inside the last checkpoint, and then <output>/adapter
PROBES = ("stat_dpo_grad_ratio",)  # metrics measured once a metrics window, not averaged over its steps


def log_picture(client, run_id: str, artifact: str, picture) -> None:
    """``picture`` (a PIL image) as the PNG ``artifact`` (a path inside the run's artifacts) of the MLflow run
    ``run_id``, through ``client``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact).name
        picture.save(path)
        client.log_artifact(run_id, str(path), artifact_path=str(Path(artifact).parent))


def _quiet_reports() -> None:
    """Ray Train 2.60 logs every ``ray.train.report`` call in full at INFO, from a logger named by its
    source file; the job prints its own metrics line instead."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # the shard iterator's bar, per worker
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(os.path.join("execution", "context.py")):
            logging.getLogger(name).setLevel(logging.WARNING)


def _metrics_client(config: dict):
    """Rank 0's MLflow client for the training curves, or None where the store is out of its reach (a
    local store on another node than the driver's, allowed by ``mlflow_allow_local``)."""
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
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def train_loop(config: dict) -> dict | None:
    """One Ray Train worker. ``config``: plain data (the config, the pair plan, the pair dataset,
    provenance). Returns ``{"nonfinite_step": k}`` when step k's loss, or its gradient without a loss
    scaler, is not finite (rank 0's value is the run's)."""
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
    reader = pair_records.PairReader(config["pairs"], config["pairs_manifest"],
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
    for step, (index, batch) in zip(steps, pair_records.prefetched(load, steps)):
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
                stamp = int(time.time() * 1000)
                mlflow_client.log_batch(config["mlflow_run_id"], metrics=[
                    Metric(k, float(v), stamp, done) for k, v in metrics.items() if k != "step"])
            if rank == 0:  # written, not printed: Ray Train's print patch would show the line twice
                sys.stdout.write(f"train: step {done}/{cfg.max_steps} loss {metrics.get('loss', float('nan')):.4f} "
                                 f"({objective.term} {metrics.get(objective.term, 0):.4f}, stat {metrics.get('stat', 0):.3g}) accuracy "
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
