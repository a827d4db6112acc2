"""HG-DPO training on Ray Train: LoRA Diffusion-DPO + statistic matching, data parallel (paper §3.2).

``train(cfg)`` (the driver) checks the pool, the base model and any checkpoint before it starts,
then runs ``train_loop`` on ``cfg.workers`` Ray Train workers (DDP: gloo on CPU, NCCL on GPU).

Per optimizer step, each worker takes its pairs of the global batch (``hgdpo.pairs``), and per
micro-batch: encodes the prompts with the frozen text encoder; noises winner and loser with one
shared timestep and noise draw (seeded by step and pair, so the draw does not depend on how the
batch is split over workers); runs the reference (the same UNet, adapters disabled, no grad) and
the policy on winner and loser as one batch; and takes eq. 3 (+ eq. 8 from the same predictions,
eq. 9). Gradients are accumulated to the global batch, clipped, and applied with AdamW (8-bit
Adam where bitsandbytes and CUDA are present).

Checkpoints (adapter, optimizer, schedule, step) go through ``ray.train.report`` every
``checkpoint_every`` steps into Ray Train's storage at ``<output>/checkpoints`` (a local folder or
a URI: no file is left on a worker's disk); a worker failure restarts the group from the last one
(``FailureConfig``), and rerunning the same command resumes from it too. The last checkpoint also
holds the adapter, which the driver copies to ``<output>/adapter``. A non-finite loss or gradient
stops the run cleanly (rank 0's return value tells the driver) and keeps the last good checkpoint.
"""

from __future__ import annotations

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

from hgdpo import losses, models, pool, storage, tracking
from hgdpo.config import from_dict, to_dict
from hgdpo.errors import HgdpoError
from hgdpo.lora import INFO_FILE, add_lora, load_lora_state, lora_state, save_adapter
from hgdpo.pairs import PairPlan, pairs_dataset, plan as make_plan, worker_pairs
from hgdpo.train_config import TrainConfig

RUN_NAME = "train"  # Ray Train run folder inside <output>/checkpoints
ADAPTER_DIR = "adapter"
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's registered checkpoints


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


def pair_noise(seed: int, step: int, index: int, shape: tuple[int, ...], num_timesteps: int):
    """The timestep and noise of pair ``index`` at ``step``: a function of (seed, step, index) only."""
    digest = hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    t = torch.randint(0, num_timesteps, (1,), generator=gen)
    return t, torch.randn(shape, generator=gen)


def fingerprint(cfg: TrainConfig, meta: dict) -> str:
    data = dict(cfg.resume_settings(), pool_fingerprint=meta["fingerprint"])
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _autocast(cfg: TrainConfig, device: torch.device):
    if device.type != "cuda" or cfg.mixed_precision == "no":
        return torch.autocast(device_type="cpu", enabled=False), None
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" or (
        cfg.mixed_precision == "auto" and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast(device_type="cuda", dtype=dtype), scaler


def micro_step(cfg: TrainConfig, model, unet, text_encoder, tokenizer, noise_scheduler, prompts, lat_w, lat_l,
               t, noise, autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch of m pairs. ``lat_*``, ``noise``: (m, C, h, w); ``t``: (m,)."""
    device = lat_w.device
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        emb = text_encoder(ids)[0]  # (m, 77, D)
    if cfg.objective == "sft":
        noisy_w = noise_scheduler.add_noise(lat_w, noise, t)
        with autocast:
            policy_w = model(noisy_w, t, encoder_hidden_states=emb).sample
        loss = losses.sft_loss(policy_w.float(), noise)
        return loss, {"loss": loss.detach(), "sft": loss.detach()}
    x0 = torch.cat([lat_w, lat_l])  # winner and loser in one batch: (2m, C, h, w)
    noise2, t2, emb2 = torch.cat([noise, noise]), torch.cat([t, t]), torch.cat([emb, emb])
    noisy = noise_scheduler.add_noise(x0, noise2, t2)
    with torch.no_grad(), autocast:
        unet.disable_adapters()  # the reference: the same UNet without its adapters
        try:
            ref = unet(noisy, t2, encoder_hidden_states=emb2).sample.float()
        finally:
            unet.enable_adapters()
    with autocast:
        policy = model(noisy, t2, encoder_hidden_states=emb2).sample.float()
    policy_err = losses.per_sample_error(noise2, policy)
    ref_err = losses.per_sample_error(noise2, ref)
    m = len(lat_w)
    loss_dpo, stats = losses.dpo_loss(policy_err[:m], policy_err[m:], ref_err[:m], ref_err[m:], beta=cfg.beta)
    stats = dict(stats, dpo=loss_dpo.detach())
    loss = loss_dpo
    if cfg.objective == "hgdpo":
        coef = losses.ddpm_eps_coefficient(noise_scheduler, t).to(device)
        loss_stat = losses.stat_matching_loss(policy[:m], ref[:m], coef)
        loss = losses.total_loss(loss_dpo, loss_stat, cfg.lambda_stat)
        stats["stat"] = loss_stat.detach()
    stats["loss"] = loss.detach()
    return loss, stats


def _save_checkpoint(directory: Path, unet, optimizer, scheduler, step: int, fp: str) -> None:
    from safetensors.torch import save_file

    save_file(lora_state(unet), str(directory / "adapter.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / "optimizer.pt")
    (directory / "state.json").write_text(json.dumps({"step": step, "fingerprint": fp}))


def _load_checkpoint(directory: Path, unet, optimizer, scheduler, fp: str) -> int:
    from safetensors.torch import load_file

    state = json.loads((directory / "state.json").read_text())
    if state["fingerprint"] != fp:
        raise HgdpoError(f"checkpoint {directory} was written with another config; use another output")
    load_lora_state(unet, load_file(str(directory / "adapter.safetensors")))
    # Our own file (tensors, numbers, dicts), so the safe weights-only unpickler suffices.
    opt = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
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


def train_loop(config: dict) -> dict | None:
    """One Ray Train worker. ``config``: plain data (the config, the pair plan, provenance). Returns
    ``{"nonfinite_step": k}`` when step k's loss or gradient is not finite (rank 0's value is the run's)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from diffusers import DDPMScheduler

    from hgdpo.quiet import quiet_libraries

    cfg = from_dict(TrainConfig, config["train"])
    plan_ = PairPlan(**config["plan"])
    quiet_libraries()
    _quiet_reports()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    pipe = models.load_pipeline(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle)
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder.to(device).requires_grad_(False), pipe.tokenizer
    # DDPM maths of the forward process and of eq. 8's sampler step; x0 clipping would make the
    # step non-linear in the prediction, and SD1.5's schedule has it off.
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    params = add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    unet.to(device)
    if cfg.gradient_checkpointing and device.type == "cuda":
        unet.enable_gradient_checkpointing()
    model = ray.train.torch.prepare_model(unet, move_to_device=False) if world > 1 else unet
    optimizer = make_optimizer(cfg, params, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    autocast, scaler = _autocast(cfg, device)

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            start = _load_checkpoint(Path(d), unet, optimizer, scheduler, config["fingerprint"])

    shards = [v for v in range(plan_.data_shards) if v % world == rank]
    batches = ray.train.get_dataset_shard("pairs").iter_batches(batch_format="pyarrow", batch_size=256)
    data = worker_pairs(batches, plan_, shards, config["latent_shape"])
    position = {int(i): k for k, i in enumerate(data["index"])}
    shape = tuple(config["latent_shape"])
    mlflow_client = _metrics_client(config) if rank == 0 else None

    per_worker = cfg.global_batch // world
    sums: dict[str, float] = {}
    counted, tick = 0, time.perf_counter()
    for step in range(start, cfg.max_steps):
        index = np.concatenate([plan_.step_indices(step, v) for v in shards])  # this worker's pairs
        rows = [position[int(i)] for i in index]
        for k in range(0, per_worker, cfg.micro_batch):
            chunk, ids = rows[k: k + cfg.micro_batch], index[k: k + cfg.micro_batch]
            drawn = [pair_noise(cfg.seed, step, int(i), shape, noise_scheduler.config.num_train_timesteps) for i in ids]
            t = torch.cat([d[0] for d in drawn]).to(device)
            noise = torch.stack([d[1] for d in drawn]).to(device)
            lat_w = torch.from_numpy(data["latents_w"][chunk]).float().to(device)
            lat_l = torch.from_numpy(data["latents_l"][chunk]).float().to(device)
            last = k + cfg.micro_batch >= per_worker
            sync = model.no_sync() if (world > 1 and not last) else _null()
            with sync:
                loss, stats = micro_step(cfg, model, unet, text_encoder, tokenizer, noise_scheduler,
                                         data["prompt"][chunk], lat_w, lat_l, t, noise, autocast)
                scaled = loss * (len(chunk) / per_worker)
                (scaler.scale(scaled) if scaler else scaled).backward()
            for name, value in stats.items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(chunk) / per_worker
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        # Gradients are all-reduced, so every worker sees the same norm and stops together; rank 0's
        # return value reaches the driver as Result.return_value (no file on any node's disk).
        if not torch.isfinite(grad_norm) or not all(math.isfinite(v) for v in sums.values()):
            return {"nonfinite_step": step + 1}
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
        counted += 1
        done = step + 1
        is_ckpt = done % cfg.checkpoint_every == 0 or done == cfg.max_steps
        if done % cfg.metrics_every == 0 or is_ckpt:
            values = torch.tensor([sums[k] for k in sorted(sums)], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(values)
                values /= world
            now = time.perf_counter()
            metrics = {k: float(v) / counted for k, v in zip(sorted(sums), values)}
            metrics.update(step=done, lr=scheduler.get_last_lr()[0],
                           pairs_per_s=counted * cfg.global_batch / (now - tick))
            if mlflow_client is not None:
                from mlflow.entities import Metric

                stamp = int(time.time() * 1000)
                mlflow_client.log_batch(config["mlflow_run_id"], metrics=[
                    Metric(k, float(v), stamp, done) for k, v in metrics.items() if k != "step"])
            if rank == 0:  # written, not printed: Ray Train's print patch would show the line twice
                sys.stdout.write(f"train: step {done}/{cfg.max_steps} loss {metrics.get('loss', float('nan')):.4f} "
                                 f"(dpo {metrics.get('dpo', 0):.4f}, stat {metrics.get('stat', 0):.3g}) accuracy "
                                 f"{metrics.get('accuracy', 0):.3f} lr {metrics['lr']:.3g} "
                                 f"{metrics['pairs_per_s']:.1f} pairs/s\n")
                sys.stdout.flush()
            sums, counted, tick = {}, 0, time.perf_counter()
            if is_ckpt:  # Ray Train uploads it to the run's storage (local or a URI); the last holds the adapter
                with tempfile.TemporaryDirectory() as tmp:
                    if rank == 0:
                        _save_checkpoint(Path(tmp), unet, optimizer, scheduler, done, config["fingerprint"])
                        if done == cfg.max_steps:
                            save_adapter(unet, Path(tmp) / ADAPTER_DIR, cfg.lora_rank, cfg.lora_alpha,
                                         config["adapter_info"])
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                                     checkpoint_dir_name=f"checkpoint_{done:08d}")
            else:
                ray.train.report(metrics)
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


def prepare(cfg: TrainConfig) -> tuple[dict, PairPlan, str]:
    """Every check before work: storage, MLflow store, the pool, the base model, the ablation settings,
    the optimizer."""
    storage.check_reachable(cfg.pool, "train.pool")
    storage.check_writable(cfg.output, "train.output")
    tracking.check_store(cfg.mlflow_uri, cfg.mlflow_allow_local, "train.mlflow_uri")
    meta = pool.read_meta(cfg.pool)
    source = models.check_model(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle)
    base = meta.get("base_model", {})
    ours = models.fingerprint(source)
    if base.get("fingerprint") != ours:
        raise HgdpoError(f"train.model: the pool {cfg.pool} was written with base model {base.get('name')!r} "
                         f"(fingerprint {base.get('fingerprint')}), not with {cfg.model!r} (fingerprint {ours})")
    plan_ = make_plan(meta, pool_size=cfg.pool_size, loser_rank=cfg.loser_rank, dataset_size=cfg.dataset_size,
                      data_shards=cfg.data_shards, global_batch=cfg.global_batch, seed=cfg.seed)
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

    from hgdpo.raycluster import ensure_ray, warn_if_not_shared

    meta, plan_, fp = prepare(cfg)
    output = storage.absolute(cfg.output)
    adapter = storage.join(output, ADAPTER_DIR)
    if storage.is_file(storage.join(adapter, INFO_FILE)):
        info = storage.read_json(storage.join(adapter, INFO_FILE), "adapter info")
        if info.get("fingerprint") != fp:
            raise HgdpoError(f"output: {output} holds an adapter trained with another config; use another output")
        log(f"train: {adapter} is already trained with this config; nothing to do")
        return TrainResult(output, adapter, cfg.max_steps, {}, skipped=True)
    latest = _latest(output)
    if latest is not None:
        state = _checkpoint_state(latest)
        if state.get("fingerprint") != fp:
            raise HgdpoError(f"output: the checkpoint {storage.join(_run_dir(output), storage.name(latest.path))} was "
                             f"written with another config (pool, model or training settings differ); use another output")
        log(f"train: resuming from {storage.name(latest.path)} (step {state['step']})")
    for location, setting in ((cfg.pool, "train.pool"), (output, "train.output")):  # read and written by workers
        warn_if_not_shared(location, setting, log)
    storage.probe_write(output, "train.output")

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
            "train": to_dict(cfg), "plan": asdict(plan_), "fingerprint": fp,
            "latent_shape": meta["latent_shape"][1:], "adapter_info": info,
            "mlflow_run_id": run.info.run_id, "mlflow_uri": tracking.tracking_uri(cfg.mlflow_uri),
            "driver_node": ray.get_runtime_context().get_node_id(),
        }
        use_gpu = cfg.gpus_per_worker > 0
        # Pairs are selected by Ray Data now, while the CPUs are free; every worker reads the
        # materialized rows and keeps its own shards (the data order needs fixed shards).
        pairs = pairs_dataset(cfg.pool, plan_)
        trainer = TorchTrainer(
            train_loop, train_loop_config=loop_config, datasets={"pairs": pairs},
            dataset_config=ray.train.DataConfig(datasets_to_split=[]),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.workers, use_gpu=use_gpu,
                resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}),
            # Checkpoints go to the output's storage (a URI on a cluster): never to a worker's disk.
            run_config=ray.train.RunConfig(
                name=RUN_NAME, storage_path=storage.join(output, "checkpoints"),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
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
