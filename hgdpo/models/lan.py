"""Sampling with an HG-DPO adapter: LoRA weight alpha, and latent normalisation (LAN, paper eq. 7).

The adapter is a diffusers LoRA (``hgdpo.models.lora``) loaded into the plain pipeline under the name
``hgdpo`` and applied at weight alpha (paper default 0.5): ``alpha = 0`` is the original model,
``1`` the adapter as trained.

LAN runs the tuned model (adapter at alpha) and the original model (adapters disabled) from the
same initial noise, each with its own scheduler instance (multistep samplers keep a history of
model outputs, and ancestral ones draw noise, so the two runs must not share one), and after every
sampler step replaces the tuned latent's channel-wise mean and std with the original's. That takes
an explicit denoising loop and two UNet calls a step.

Seeds work as in ``hgdpo.models.sampling.generate``: one ``torch.Generator`` per image draws its initial
noise on the CPU, so the same seeds give the same images, and without LAN this loop gives exactly
the images of the diffusers pipeline call (a test checks it).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path

import numpy as np
import torch

from hgdpo.errors import HgdpoError
from hgdpo.infra import storage
from hgdpo.models import loading as models
from hgdpo.models.lora import ADAPTER_FILE, INFO_FILE
from hgdpo.models.sampling import decode

ADAPTER_NAME = "hgdpo"


def adapter_info(adapter: str | Path) -> tuple[str, dict]:
    """The location of an hgdpo adapter (a local folder or a storage URI) and its ``hgdpo_adapter.json``;
    refuse what is not one. Model-free: ``check_adapter`` also checks the base model."""
    path = os.fspath(adapter) if storage.is_uri(adapter) else str(Path(adapter).expanduser())
    with storage.errors("adapter", path):
        if not storage.exists(path):
            raise HgdpoError(f"adapter: {path} does not exist")
        missing = [name for name in (ADAPTER_FILE, INFO_FILE) if not storage.is_file(storage.join(path, name))]
        if missing:
            raise HgdpoError(f"adapter: {path} is not an adapter (no {' or '.join(missing)}); "
                             f"expected the <output>/adapter folder written by jobs/train.py")
        info_path = storage.join(path, INFO_FILE)
        try:
            info = json.loads(storage.read_bytes(info_path))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HgdpoError(f"adapter: {info_path} is not valid JSON: {err}") from None
    if not isinstance(info, dict):
        raise HgdpoError(f"adapter: {info_path} is not a JSON object")
    return path, info


def check_adapter(adapter: str | Path, model: str, *, allow_pickle: bool = False) -> dict:
    """Refuse what is not an hgdpo adapter of base ``model``; return its ``hgdpo_adapter.json``."""
    path, info = adapter_info(adapter)
    base = info.get("base_model")
    if not isinstance(base, dict) or not base.get("fingerprint"):
        raise HgdpoError(f"adapter: {storage.join(path, INFO_FILE)} does not name its base model "
                         f"(base_model.fingerprint)")
    ours = models.fingerprint(models.resolve_model(model, allow_pickle=allow_pickle))
    if base["fingerprint"] != ours:
        raise HgdpoError(f"adapter: {path} was trained on base model {base.get('name')!r} (fingerprint "
                         f"{base['fingerprint']}), not on model {model!r} (fingerprint {ours})")
    return info


def load_adapter(pipe, adapter: str | Path, model: str, *, allow_pickle: bool = False) -> dict:
    """Check ``adapter`` against base ``model`` and load it into ``pipe`` (replacing an earlier one)."""
    info = check_adapter(adapter, model, allow_pickle=allow_pickle)
    if has_adapter(pipe):
        pipe.delete_adapters(ADAPTER_NAME)
    location = os.fspath(adapter) if storage.is_uri(adapter) else str(Path(adapter).expanduser())
    try:
        with storage.local_copy(location) as local:  # diffusers reads local folders only
            pipe.load_lora_weights(str(local), adapter_name=ADAPTER_NAME)
    except (ValueError, RuntimeError, KeyError) as err:
        raise HgdpoError(f"adapter: {adapter} could not be loaded into model {model!r}: {err}") from None
    return info


def has_adapter(pipe) -> bool:
    return any(ADAPTER_NAME in names for names in pipe.get_list_adapters().values())


@contextlib.contextmanager
def adapters_off(pipe):
    """The original model: the same UNet with its LoRA layers bypassed (no second copy)."""
    pipe.disable_lora()
    try:
        yield
    finally:
        pipe.enable_lora()


def match_channel_stats(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 7 (LAN): ``x`` with its channel-wise mean and std replaced by those of ``ref``.

    ``x``, ``ref``: (B, C, h, w); statistics per sample and channel over (h, w). Computed in
    float32, returned in ``x``'s dtype. (Which std estimator is used does not matter: the ratio of
    two stds of the same size is the same for both.)
    """
    x32, ref32 = x.float(), ref.float()
    mu_x, sd_x = x32.mean(dim=(2, 3), keepdim=True), x32.std(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    mu_ref, sd_ref = ref32.mean(dim=(2, 3), keepdim=True), ref32.std(dim=(2, 3), keepdim=True)
    return ((x32 - mu_x) / sd_x.clamp_min(eps) * sd_ref + mu_ref).to(x.dtype)


def _clone(generator: torch.Generator) -> torch.Generator:
    return torch.Generator(device=generator.device).set_state(generator.get_state())


def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    """What the pipeline passes to ``scheduler.step``: the generators (ancestral samplers), eta=0 (DDIM)."""
    params = inspect.signature(scheduler.step).parameters
    return {**({"eta": 0.0} if "eta" in params else {}), **({"generator": generators} if "generator" in params else {})}


def _denoise_step(unet, scheduler, latents, t, embeds, guidance_scale: float, step_kwargs: dict) -> torch.Tensor:
    """One sampler step with classifier-free guidance (uncond and cond as one batch)."""
    cfg = guidance_scale > 1
    model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
    eps = unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
    if cfg:
        eps_uncond, eps_cond = eps.chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    return scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]


@torch.no_grad()
def sample(pipe, prompt: str, seeds: list[int], *, steps: int, guidance_scale: float, width: int, height: int,
           negative_prompt: str = "", alpha: float | None = None, lan: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``len(seeds)`` images of one prompt as one batch, with the pipeline's scheduler.

    ``alpha=None``: the original model (a loaded adapter is bypassed). ``alpha``: the adapter
    loaded by :func:`load_adapter`, at that weight. ``lan``: normalise the tuned run to the
    original one after every step (eq. 7). Returns ``latents`` (N, C, h, w) float16 -- the final
    latents in the UNet's scaled space -- and ``images`` (N, H, W, 3) uint8, like
    ``hgdpo.models.sampling.generate``. The adapter stays loaded at the weight last used.
    """
    if lan and alpha is None:
        raise HgdpoError("lan: needs an adapter (LAN normalises the adapted model to the original one)")
    if alpha is not None and not has_adapter(pipe):
        raise HgdpoError("alpha: no adapter is loaded into the pipeline (hgdpo.models.lan.load_adapter)")
    unet = pipe.unet
    if unet.config.time_cond_proj_dim is not None:
        raise HgdpoError("model: guidance-embedding UNets (LCM) are not supported")
    device, dtype = unet.device, unet.dtype
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    shape = (unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    # Initial noise drawn per image on the CPU, so it is the same on any device or batch size.
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device=device, dtype=dtype)

    cond, uncond = pipe.encode_prompt(prompt, device, len(seeds), guidance_scale > 1, negative_prompt or None)
    embeds = torch.cat([uncond, cond]) if guidance_scale > 1 else cond  # (2N or N, tokens, D)

    def fresh_scheduler():
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        return scheduler

    scheduler = fresh_scheduler()
    latents = noise * scheduler.init_noise_sigma  # (N, C, h, w)
    kwargs = _step_kwargs(scheduler, generators)
    if lan:  # the original model's run: its own scheduler state and its own copy of the step noise
        ref_scheduler = fresh_scheduler()
        ref_latents = latents.clone()
        ref_kwargs = _step_kwargs(ref_scheduler, [_clone(g) for g in generators])

    if alpha is not None:
        pipe.set_adapters([ADAPTER_NAME], adapter_weights=[alpha])
    original = alpha is None and has_adapter(pipe)
    with adapters_off(pipe) if original else contextlib.nullcontext():
        for t in scheduler.timesteps:
            latents = _denoise_step(unet, scheduler, latents, t, embeds, guidance_scale, kwargs)
            if lan:
                with adapters_off(pipe):
                    ref_latents = _denoise_step(unet, ref_scheduler, ref_latents, t, embeds, guidance_scale, ref_kwargs)
                latents = match_channel_stats(latents, ref_latents)  # eq. 7
    return latents.to(torch.float16).cpu().numpy(), decode(pipe, latents)
