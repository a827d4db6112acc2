"""What a CUDA device can do, from its compute capability: the decisions of every ``auto`` setting
that depends on the GPU generation, in one place (and testable on CPU by faking the capability).

``torch.cuda.is_bf16_supported()`` counts emulation by default: it answers True on V100 (sm70) and
T4 (sm75), which have no bf16 tensor cores, so bf16 there runs several times slower than fp16.
bf16 tensor cores start with Ampere (sm80: A100, A10, RTX 30xx).
"""

from __future__ import annotations

import torch

BF16_TENSOR_CORES = (8, 0)  # Ampere
TRITON_MINIMUM = (7, 0)  # torch.compile's Inductor refuses older GPUs (Triton's own minimum)


def capability(device: torch.device | str) -> tuple[int, int]:
    """(major, minor) of a CUDA device; (0, 0) for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return (0, 0)
    return tuple(torch.cuda.get_device_capability(device))


def has_bf16_tensor_cores(device: torch.device | str) -> bool:
    """bf16 at full speed: ROCm GPUs, and CUDA GPUs from Ampere on (not emulated bf16 on Volta/Turing)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return True
    return capability(device) >= BF16_TENSOR_CORES


def compiles(device: torch.device | str) -> bool:
    """Whether ``torch.compile``'s Triton backend runs on ``device``."""
    return torch.device(device).type == "cuda" and (torch.version.hip or capability(device) >= TRITON_MINIMUM)
