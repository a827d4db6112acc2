"""LoRA adapters on the UNet: adding them, their state, and the diffusers LoRA format on disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]  # every attention projection (self and cross)
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights looks for
INFO_FILE = "hgdpo_adapter.json"


def add_lora(unet, rank: int, alpha: float | None, seed: int) -> list[torch.nn.Parameter]:
    """Add LoRA of ``rank`` to every attention linear layer; only its parameters train."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    torch.manual_seed(seed)  # the same initial adapter on every worker and every run
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    return [p for p in unet.parameters() if p.requires_grad]


def lora_state(unet) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state(unet, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter state has keys the UNet's adapter lacks: {unexpected[:3]}")


def save_adapter(unet, directory: str | Path, rank: int, alpha: float | None, info: dict) -> Path:
    """Write the adapter in the diffusers LoRA format, with ``info`` (config, versions) beside it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=convert_state_dict_to_diffusers(lora_state(unet)), safe_serialization=True,
        unet_lora_adapter_metadata={"r": rank, "lora_alpha": alpha if alpha is not None else rank,
                                    "target_modules": TARGET_MODULES})
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    return directory
