"""Sampling a prompt's N images from seeds derived from (run seed, prompt id, j).

One prompt's N images are one batch: the prompt is encoded once, each image has its own
``torch.Generator``, so any prompt can be regenerated alone and gives the same images.
The sampler's final latents are returned beside the decoded images: training reads them
and never runs the VAE encoder.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

SCHEDULERS = {
    "dpm_multistep": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
}


def image_seeds(run_seed: int, prompt_id: str, n: int) -> list[int]:
    """The N seeds of a prompt: a hash of (run seed, prompt id, j), independent of everything else."""
    out = []
    for j in range(n):
        digest = hashlib.sha256(f"{run_seed}\x00{prompt_id}\x00{j}".encode()).digest()
        out.append(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return out


def set_sampler(pipe, name: str) -> None:
    """Replace the pipeline's scheduler by sampler ``name`` with the same noise schedule."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def set_threads(cpus: float) -> int:
    """Torch threads for an actor holding ``cpus`` of Ray's CPUs: the whole CPUs of its share, at least one.

    Rounded down on purpose: an actor with 1.5 CPUs next to a scorer actor on two cores ran at
    7.9 images/s with two threads and 11.1 with one (an OpenMP region waits for its slowest
    thread, and the second one shares its core). Returns the thread count.
    """
    threads = max(1, int(cpus + 1e-9))
    torch.set_num_threads(threads)
    return threads


def resolve_device_dtype(dtype: str) -> tuple[str, torch.dtype]:
    """``auto``: float16 on CUDA, float32 on CPU (half precision on CPU is slow and lossy)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        return device, torch.float16 if device == "cuda" else torch.float32
    return device, getattr(torch, dtype)


def native_size(pipe) -> tuple[int, int]:
    """(width, height) the model was trained at: the UNet's sample size times the VAE factor."""
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


@torch.no_grad()
def generate(pipe, prompt: str, seeds: list[int], *, steps: int, guidance_scale: float,
             width: int, height: int, negative_prompt: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Sample ``len(seeds)`` images of one prompt as one batch.

    Returns ``latents`` (N, C, h, w) float16 -- the sampler's final latents, in the UNet's
    (scaled) space -- and ``images`` (N, H, W, 3) uint8.
    """
    device = pipe.unet.device
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    shape = (len(seeds), pipe.unet.config.in_channels, height // pipe.vae_scale_factor,
             width // pipe.vae_scale_factor)
    # Initial noise drawn per image on the CPU, so it is the same on any device or batch size.
    noise = torch.stack([torch.randn(shape[1:], generator=g) for g in generators])
    latents = pipe(
        prompt=prompt, negative_prompt=negative_prompt or None, num_images_per_prompt=len(seeds),
        num_inference_steps=steps, guidance_scale=guidance_scale, width=width, height=height,
        latents=noise.to(device=device, dtype=pipe.unet.dtype), generator=generators,
        output_type="latent", return_dict=False)[0]  # (N, C, h, w)
    images = decode(pipe, latents)
    return latents.to(torch.float16).cpu().numpy(), images


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """VAE-decode scaled latents (N, C, h, w) to uint8 images (N, H, W, 3)."""
    vae = pipe.vae
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
