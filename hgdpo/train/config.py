"""The configuration of the trainer (``jobs/train.py``): LoRA Diffusion-DPO + statistic matching."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from hgdpo.config.core import check_fields, check_locations, doc, output_settings, rule_fields
from hgdpo.config.sections import Tracking
from hgdpo.errors import ConfigError
from hgdpo.infra import storage
from hgdpo.objectives.registry import OBJECTIVES, owner, settings_classes


@dataclass(kw_only=True)
class TrainConfig(Tracking, *settings_classes()):
    """How to train LoRA adapters on a pool (paper §3.2; eq. 3, 8, 9)."""

    SECTION = "train"

    pool: str = doc("The pool to train on (a folder or URI written by jobs/build_pool.py).", path=True, resume=True)
    output: str = doc("Folder or storage URI (s3://...) for the checkpoints and the final adapter.")
    model: str = doc("Base model (must be the pool's): `embedded`, a diffusers folder, a .safetensors file "
                     "or a hub id.", "embedded", path=True, resume=True)
    model_config: str | None = doc("For a single-file checkpoint: a diffusers folder or hub id with the configs.", None,
                                   path=True, resume=True)
    allow_pickle: bool = doc("Allow pickle weight formats. Off: safetensors only.", False)

    objective: Literal[tuple(OBJECTIVES)] = doc(
        "; ".join(f"{name}: {o.summary}" for name, o in OBJECTIVES.items())
        + " (hgdpo.objectives: each objective's own settings follow, by its name).", "hgdpo", resume=True, sweep=True)
    pool_size: int | None = doc("n: use the first n images of each prompt (paper Table 3); default all N.", None,
                                minimum=2, resume=True, sweep=True)
    loser_rank: int | None = doc("Rank (2..n) of the loser among the first n (paper Table 5); default n.", None,
                                 minimum=2, maximum="pool_size", resume=True, sweep=True)
    dataset_size: int | None = doc("D: train on the first D prompts of the pool (paper Table 6); default all.", None,
                                   minimum=1, resume=True, sweep=True)
    beta: float = doc("Diffusion-DPO beta; 2500 is the paper's value in the diffusers convention.", 2500.0,
                      above=0, resume=True, sweep=True)
    lambda_stat: float | None = doc(
        "Weight of statistic matching (eq. 8, 9), a regulariser any Diffusion-DPO-family objective takes; default: "
        "10000 (the paper's) for hgdpo, 0 (off) for the others; sft takes none.", None,
        minimum=0, resume=True, sweep=True)
    stat_step: Literal["ddpm", "sampler"] = doc(
        "The sampler step l^t -> l^(t-1) of eq. 8, whose two outcomes (policy, reference) statistic matching "
        "compares: `ddpm`, one step of the training schedule, t -> t-1 (the noise prediction's coefficient is "
        "0.004-0.012); `sampler`, one deterministic DDIM step of a `stat_sampler_steps`-step sampling schedule, "
        "t -> t - 1000/stat_sampler_steps (at 50 steps about ten times the coefficient, a hundred times the term).",
        "ddpm", resume=True, sweep=True)
    stat_sampler_steps: int = doc("Steps of the sampling schedule that `stat_step: sampler` takes one step of.", 50,
                                  minimum=1, resume=True, sweep=True)

    lora_rank: int = doc("LoRA rank on every attention projection of the UNet (paper: 8).", 8,
                         minimum=1, resume=True, sweep=True)
    lora_alpha: float | None = doc("LoRA alpha (scale = alpha / rank); default: the rank.", None, resume=True)
    learning_rate: float = doc("Peak learning rate (paper: 1e-5).", 1e-5, above=0, resume=True, sweep=True)
    lr_schedule: Literal["constant", "cosine", "linear"] = doc("Learning-rate schedule after warm-up.", "constant",
                                                               resume=True)
    warmup_steps: int = doc("Linear warm-up steps.", 0, minimum=0, resume=True)
    max_steps: int = doc("Optimizer steps.", 1000, minimum=1, resume=True, sweep=True)
    global_batch: int = doc("Pairs per optimizer step, over all workers (paper: 16).", 16, minimum=1, resume=True)
    micro_batch: int = doc("Pairs per forward pass on a worker (gradient accumulation fills the rest).", 4, minimum=1)
    data_shards: int = doc("Fixed data shards (a multiple of workers, dividing global_batch): the data order "
                           "depends on them, not on the worker count.", 4, minimum=1, resume=True)
    max_grad_norm: float = doc("Gradient clipping (global norm; 0 disables).", 1.0, minimum=0, resume=True)
    weight_decay: float = doc("AdamW weight decay.", 1e-2, resume=True)
    optimizer: Literal["auto", "adamw", "adamw8bit"] = doc(
        "`auto`: 8-bit Adam where bitsandbytes and CUDA are present (the paper's), else AdamW.", "auto", resume=True)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = doc(
        "Compute dtype on GPU, also holding the frozen UNet weights (LoRA weights stay float32): `auto` is bf16 "
        "where the GPU has bf16 tensor cores (Ampere on: A100, H100), else fp16 (V100, T4), whose loss scaler skips a step that overflows and carries on; `no`: "
        "float32. Always float32 on CPU.", "auto", resume=True)
    gradient_checkpointing: bool | None = doc(
        "Recompute the UNet's activations in the backward pass (less memory, about a third more compute); "
        "default: on when training on GPUs (gpus_per_worker > 0), off on CPU.", None)
    seed: int = doc("Seed of the LoRA initialisation, data order, timesteps and noise.", 0, resume=True)
    timestep_min: int = doc("Training timesteps (of the scheduler's 0..999 for SD1.5; higher is noisier) are drawn "
                            "uniformly from [timestep_min, timestep_max); paper: all of them. E.g. 500 trains only "
                            "the noisier half, where an image's composition forms. focus: its complexity term acts "
                            "only below focus_t_hi.", 0, minimum=0, resume="if-set", sweep=True)
    timestep_max: int | None = doc("End (exclusive) of the training timesteps; default: the scheduler's "
                                   "num_train_timesteps (SD1.5: 1000); a larger value is refused before any work.",
                                   None, above="timestep_min", resume="if-set", sweep=True)

    pairs_folder: str | None = doc(
        "Folder or URI where the pair dataset (the selected pairs' latents and their prompts' text-encoder hidden "
        "states, one per pool, base model, pool_size, loser_rank and dataset_size) is written once and reused; "
        "default: the output's parent folder.", None, path=True)

    workers: int = doc("Data-parallel workers (one per GPU).", 1, minimum=1)
    gpus_per_worker: float = doc("GPUs per worker (0: CPU with gloo; >0: CUDA with NCCL).", 0.0)
    cpus_per_worker: float = doc("CPUs per worker.", 1.0)
    checkpoint_every: int = doc("Steps between checkpoints (adapter, optimizer, schedule, step).", 100, minimum=1)
    metrics_every: int = doc("Steps between metric reports (MLflow, console).", 10, minimum=1)
    probe_every: int = doc("Steps between measurements of `stat_dpo_grad_ratio` (hgdpo: the norm of the weighted "
                           "statistic-matching term's gradient over the DPO term's; two extra backward passes of one "
                           "micro-batch each; 0: never; not at step 0, where a new adapter's gradient of that term is 0).",
                           100,
                           minimum=0)
    max_failures: int = doc("Worker failures survived by resuming from the last checkpoint.", 2, minimum=0)

    mlflow_experiment: str = doc("MLflow experiment name.", "hgdpo-train")

    def __post_init__(self) -> None:
        s = self.SECTION
        for name in ("pool", "output"):
            if not getattr(self, name):
                raise ConfigError(f"{s}.{name}: required")
        check_locations(self, "pool", "output", "pairs_folder")
        check_fields(self)
        if self.data_shards % self.workers:
            raise ConfigError(f"{s}.data_shards: must be a multiple of workers={self.workers} (got {self.data_shards})")
        if self.global_batch % self.data_shards:
            raise ConfigError(f"{s}.global_batch: must be a multiple of data_shards={self.data_shards} "
                              f"(got {self.global_batch})")
        self._check_objective()
        per_worker = self.global_batch // self.workers
        if per_worker % self.micro_batch:
            raise ConfigError(f"{s}.micro_batch: must divide the pairs per worker and step, global_batch / workers "
                              f"= {per_worker} (got {self.micro_batch})")

    def _check_objective(self) -> None:
        """The objective's own checks; a setting it does not use is refused by name, never ignored."""
        s, chosen = self.SECTION, OBJECTIVES[self.objective]
        chosen.check(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)):
            belongs = owner(name)
            if belongs not in (None, self.objective) and value != defaults[name]:
                raise ConfigError(f"{s}.{name}: a setting of the {belongs} objective, which objective {self.objective} "
                                  f"does not use; remove it")
        if not chosen.dpo_family and self.lambda_stat:
            raise ConfigError(f"{s}.lambda_stat: objective {self.objective} takes no statistic matching (it is a "
                              f"regulariser of the Diffusion-DPO family); remove it")
        if not chosen.uses_beta and self.beta != defaults["beta"]:
            raise ConfigError(f"{s}.beta: objective {self.objective} does not use it; remove it")
        if not self.stat_weight():
            for name in ("stat_step", "stat_sampler_steps"):
                if getattr(self, name) != defaults[name]:
                    raise ConfigError(f"{s}.{name}: statistic matching is off (lambda_stat 0 for objective "
                                      f"{self.objective}), so it has no effect; remove it or set lambda_stat")

    def stat_weight(self) -> float:
        """``lambda_stat`` as the objective takes it: the setting, else the objective's default."""
        if self.lambda_stat is not None:
            return float(self.lambda_stat)
        return OBJECTIVES[self.objective].default_lambda_stat

    def timesteps(self, num_train_timesteps: int) -> tuple[int, int]:
        """[low, high) of the training timesteps for a scheduler of ``num_train_timesteps``."""
        high = self.timestep_max if self.timestep_max is not None else num_train_timesteps
        if high > num_train_timesteps:
            raise ConfigError(f"{self.SECTION}.timestep_max: the model's scheduler has {num_train_timesteps} "
                              f"timesteps (got {high})")
        return self.timestep_min, high

    def accumulation_steps(self) -> int:
        """Micro-batches per worker per optimizer step."""
        return self.global_batch // self.workers // self.micro_batch

    def checkpointing(self) -> bool:
        """Whether the UNet recomputes its activations in the backward pass (``gradient_checkpointing``)."""
        return self.gpus_per_worker > 0 if self.gradient_checkpointing is None else self.gradient_checkpointing

    def pairs_root(self) -> str:
        """The folder holding this run's pair dataset (``pairs_folder``, else beside ``output``)."""
        if self.pairs_folder:
            return storage.absolute(self.pairs_folder)
        return storage.parent(storage.absolute(self.output))

    def resume_settings(self) -> dict:
        """The settings a checkpoint or an adapter must have been made with (those declared ``resume``; one
        declared ``resume="if-set"`` only off its default; ``lambda_stat`` as taken)."""
        values = output_settings(self)
        values["lambda_stat"] = self.lambda_stat if self.lambda_stat is not None else self.stat_weight()
        if self.objective != "hgdpo" and self.stat_weight() > 0:
            values["stat_regulariser"] = True  # not an adapter made when only hgdpo took lambda_stat
        return values

    def legacy_resume_settings(self) -> list[dict]:
        """What adapters made when only hgdpo took ``lambda_stat`` were fingerprinted with, where they train as this
        config does: another objective without statistic matching, whose ``lambda_stat`` was then ignored at
        either of the values configs gave it (10000, the old default, or 0)."""
        if self.objective == "hgdpo" or self.stat_weight() > 0:
            return []
        return [dict(self.resume_settings(), lambda_stat=10000.0)]


# Settings that change the trained adapter: a checkpoint written under other values of these cannot be resumed
# (declared with each field: ``resume=True``, or ``resume="if-set"`` for one added after adapters were trained
# without it). workers may change: the data order and noise do not depend on it.
RESUME_FIELDS = rule_fields(TrainConfig, "resume")
