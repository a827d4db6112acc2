"""The optimizer side of a training worker: learning-rate schedule, AdamW (8-bit where it runs), precision and
the fp16 loss scaler, the step that decides what non-finite gradients mean, and the checkpoint files.

Precision (``precision``): float32 on CPU. On GPU the frozen UNet weights are held in the compute
dtype (bf16 where the GPU has it, else fp16) under autocast, the LoRA weights and their optimizer
state in float32; with fp16 a ``GradScaler`` scales the loss, and a step whose gradients overflow is
skipped (``optimizer_step``: the scaler halves its scale and training carries on).
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hgdpo.errors import HgdpoError
from hgdpo.infra import devices
from hgdpo.models.lora import load_lora_state, lora_state
from hgdpo.train.config import TrainConfig


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
    return importlib.util.find_spec("bitsandbytes") is not None


def make_optimizer(cfg: TrainConfig, params, device: torch.device):
    if cfg.optimizer == "adamw8bit" or (cfg.optimizer == "auto" and device.type == "cuda" and eight_bit_available()):
        import bitsandbytes as bnb  # optional: 8-bit Adam on CUDA only

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


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


def save_checkpoint(directory: Path, unet, optimizer, scheduler, step: int, fp: str,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """The training state of ``step`` in ``directory``: adapter, optimizer, LR schedule, loss scaler."""
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
