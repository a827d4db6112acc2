"""Sampling a prompt's N images from seeds derived from (run seed, prompt id, j).

The prompt is encoded once; its N images go through the sampler ``batch`` at a time and through
the VAE ``vae_batch`` at a time, so peak memory is set by those, not by N. Each image has its own
``torch.Generator``, so any prompt can be regenerated alone and gives the same images. The
sampler's final latents are returned beside the decoded images: training reads them and never runs
the VAE encoder.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from hgdpo.infra import devices

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


def setup_inference(pipe, *, attention: str = "sdpa", channels_last: bool = True, compile_unet: bool = False,
                    log=print) -> list[str]:
    """The GPU inference settings of a pipeline; returns what was applied (for the job's log).

    ``attention``: ``sdpa`` (PyTorch's fused scaled-dot-product attention, diffusers' default) or
    ``eager`` (the plain softmax(QK^T)V, to compare or to debug). ``channels_last``: the UNet's and
    VAE's memory format on CUDA (faster convolutions there; on CPU it is left alone).
    ``compile_unet``: ``torch.compile`` of the UNet, CUDA only and only with Triton present; anything
    else runs uncompiled with a warning.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    applied = []
    for module in (pipe.unet, pipe.vae):
        module.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())
    applied.append(f"attention {attention}")
    cuda = pipe.unet.device.type == "cuda"
    if channels_last and cuda:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if compile_unet:
        import importlib.util

        if not devices.compiles(pipe.unet.device) or importlib.util.find_spec("triton") is None:
            log("warning: compile: torch.compile needs a CUDA GPU of capability 7.0 or newer and Triton; "
                "running the UNet uncompiled")
        else:
            pipe.unet = torch.compile(pipe.unet)
            applied.append("torch.compile(unet)")
    return applied


@torch.no_grad()
def sample_latents(pipe, prompt: str, seeds: list[int], *, steps: int, guidance_scale: float, width: int,
                   height: int, negative_prompt: str = "", batch: int | None = None) -> torch.Tensor:
    """The sampler's final latents (N, C, h, w) of ``len(seeds)`` images of one prompt, in the UNet's
    scaled space, on the model's device.

    The prompt is encoded once. ``batch``: images per sampler run (each UNet call takes 2 x batch
    with classifier-free guidance); None: all N at once. Each image's initial noise comes from its
    own seed, drawn on the CPU, so an image does not depend on the device or on ``batch`` (beyond
    float rounding of batched kernels).
    """
    device = pipe.unet.device
    cfg = guidance_scale > 1
    cond, uncond = pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt or None)  # (1, 77, D) each
    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    step = batch or len(seeds)
    chunks = []
    for start in range(0, len(seeds), step):
        part = seeds[start: start + step]
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in part]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        chunks.append(pipe(
            prompt_embeds=cond.expand(len(part), -1, -1),
            negative_prompt_embeds=uncond.expand(len(part), -1, -1) if cfg else None,
            num_inference_steps=steps, guidance_scale=guidance_scale, width=width, height=height,
            latents=noise.to(device=device, dtype=pipe.unet.dtype), generator=generators,
            output_type="latent", return_dict=False)[0])  # (b, C, h, w)
    return torch.cat(chunks)


@torch.no_grad()
def generate(pipe, prompt: str, seeds: list[int], *, steps: int, guidance_scale: float,
             width: int, height: int, negative_prompt: str = "", batch: int | None = None,
             vae_batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``len(seeds)`` images of one prompt: ``sample_latents``, then ``decode``.

    Returns ``latents`` (N, C, h, w) float16 -- the sampler's final latents, in the UNet's
    (scaled) space -- and ``images`` (N, H, W, 3) uint8.
    """
    latents = sample_latents(pipe, prompt, seeds, steps=steps, guidance_scale=guidance_scale, width=width,
                             height=height, negative_prompt=negative_prompt, batch=batch)
    return latents.to(torch.float16).cpu().numpy(), decode(pipe, latents, batch=vae_batch)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, batch: int | None = None) -> np.ndarray:
    """VAE-decode scaled latents (N, C, h, w) to uint8 images (N, H, W, 3), ``batch`` latents per VAE
    call (None: all at once). The VAE's activations at full resolution are what limits memory:
    at 704x1024 one 256-channel float16 activation is 370 MB per image."""
    vae = pipe.vae
    step = batch or len(latents)
    out = []
    for start in range(0, len(latents), step):
        part = latents[start: start + step].to(vae.device, vae.dtype) / vae.config.scaling_factor
        x = vae.decode(part, return_dict=False)[0]
        x = (x.float() / 2 + 0.5).clamp(0, 1)
        out.append((x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8))
    return np.concatenate(out)
