"""Train the miniature world's models: its PickScore/text encoder, its VAE and its tailored UNet.

    python -m hgdpo.world.build --out DIR            # full build (about 20 min on 2 CPU cores)
    python -m hgdpo.world.build --out DIR --scale 0.01   # a few steps, to check the builder runs
    # the shipped world's UNet trained 3,000 steps further, its CLIP and VAE kept (about 30 min)
    python -m hgdpo.world.build --out DIR --unet-only-from hgdpo/world/weights --continue-unet --unet-steps 3000

Three stages, each a real architecture trained on renders of the world (``hgdpo.world.render``):

1. **CLIP** (``embedded.new_clip``) trained contrastively on (render, caption) pairs with hard
   negatives both ways: every caption also meets the render of a one-attribute mutation of it,
   and every render the mutated caption. Renders are degraded at random (blur, noise, colour cast,
   warp) so the model also judges the imperfect images a small diffusion model makes. The whole
   model is the world's PickScore; its text tower, with the real CLIP tokenizer, is the SD text
   encoder.
2. **AutoencoderKL** trained to reconstruct renders (64x64 -> 4x16x16); its scaling factor is set,
   as SD's was, to one over the standard deviation of the latents.
3. **UNet2DConditionModel** trained with the noise-prediction loss on those latents, conditioned
   on the frozen text encoder (captions dropped 10% of the time for classifier-free guidance):
   the world's "tailored model". Training stops early on purpose, while its samples still make
   visible mistakes, so preference optimization has room to improve it.

The result is written as a diffusers pipeline folder (``pipeline/``) and a CLIP model + processor
folder (``scorer/``), float32 safetensors, plus ``world.json`` with the settings and figures.
Everything is seeded: the same command gives the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hgdpo.errors import HgdpoError
from hgdpo.infra.quiet import quiet_libraries
from hgdpo.models import embedded
from hgdpo.models.tokenizer import clip_tokenizer
from hgdpo.world.prompts import make_prompts, mutate_caption
from hgdpo.world.render import degrade, render_captions


@dataclass
class BuildSettings:
    seed: int = 0
    train_captions: int = 16000
    clip_steps: int = 1200
    clip_batch: int = 48
    clip_lr: float = 5e-4
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 1e-3
    unet_steps: int = 2500
    unet_batch: int = 32
    unet_lr: float = 5e-4
    renders_per_caption: int = 2
    cfg_dropout: float = 0.1
    unet_text_at_16: bool = False  # cross-attention at the latent's full resolution too (embedded.new_unet)

    def scaled(self, scale: float) -> "BuildSettings":
        """Fewer steps and captions (for a quick check that the builder runs)."""
        out = BuildSettings(**asdict(self))
        for name in ("clip_steps", "vae_steps", "unet_steps"):
            setattr(out, name, max(2, int(getattr(self, name) * scale)))
        out.train_captions = max(64, int(self.train_captions * scale))
        return out


def _schedule(optimizer, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _random_degrade(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half clean, half degraded like a small model's samples (blur, noise, colour cast, warp)."""
    out = images.copy()
    for i in np.flatnonzero(rng.random(len(images)) < 0.5):
        out[i] = degrade(images[i], rng, blur=rng.uniform(0.3, 1.6), noise=rng.uniform(0, 16),
                         color_shift=rng.uniform(0, 10), warp=rng.uniform(0, 1.5) if rng.random() < 0.5 else 0.0)
    return out


def _pixels(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised (B, 3, H, W), as the CLIP image processor does at 64 px."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean[:, None, None]) / std[:, None, None]


def train_clip(captions: list[str], s: BuildSettings, log) -> torch.nn.Module:
    from transformers import CLIPImageProcessor

    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    clip = embedded.new_clip().train()
    tok = clip_tokenizer()
    proc = CLIPImageProcessor()
    mean, std = torch.tensor(proc.image_mean), torch.tensor(proc.image_std)
    opt = torch.optim.AdamW(clip.parameters(), lr=s.clip_lr, weight_decay=0.05)
    sched = _schedule(opt, s.clip_steps, warmup=min(100, s.clip_steps // 10 + 1))
    start = time.perf_counter()
    for step in range(s.clip_steps):
        batch = [captions[i] for i in rng.integers(0, len(captions), s.clip_batch)]
        negatives = [mutate_caption(c, rng) for c in batch]
        images, _ = render_captions(batch + negatives, seed=int(rng.integers(1 << 31)), color_jitter=True)
        pixels = _pixels(_random_degrade(images, rng), mean, std)  # (2B, 3, H, W)
        text = tok(batch + negatives, padding=True, return_tensors="pt")
        out = clip(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels)
        b = s.clip_batch
        target = torch.arange(b)
        # Renders of the captions against all 2B texts (their mutations included) and each caption
        # against all 2B renders (the renders of its mutation included).
        loss = 0.5 * (F.cross_entropy(out.logits_per_image[:b], target) + F.cross_entropy(out.logits_per_text[:b], target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        if step % 200 == 0 or step == s.clip_steps - 1:
            acc = (out.logits_per_image[:b].argmax(-1) == target).float().mean().item()
            log(f"clip step {step}/{s.clip_steps} loss {loss.item():.3f} image->text acc {acc:.2f} "
                f"({time.perf_counter() - start:.0f}s)")
    return clip.eval()


def train_vae(captions: list[str], s: BuildSettings, log) -> torch.nn.Module:
    torch.manual_seed(s.seed + 1)
    rng = np.random.default_rng(s.seed + 1)
    vae = embedded.new_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = _schedule(opt, s.vae_steps, warmup=min(100, s.vae_steps // 10 + 1))
    start = time.perf_counter()
    for step in range(s.vae_steps):
        batch = [captions[i] for i in rng.integers(0, len(captions), s.vae_batch)]
        images, _ = render_captions(batch, seed=int(rng.integers(1 << 31)), color_jitter=True)
        images = _random_degrade(images, rng)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, x) + 0.1 * F.l1_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == s.vae_steps - 1:
            log(f"vae step {step}/{s.vae_steps} recon {rec.item():.4f} kl {kl.item():.3f} "
                f"({time.perf_counter() - start:.0f}s)")
    vae.eval()
    with torch.no_grad():
        images, _ = render_captions(captions[:512], seed=s.seed + 7, color_jitter=True)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        std = vae.encode(x).latent_dist.sample().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"vae latent std {std:.3f} -> scaling_factor {1.0 / std:.4f}")
    return vae


@torch.no_grad()
def encode_text(text_encoder, captions: list[str], batch: int = 512) -> torch.Tensor:
    """SD-style conditioning: last hidden states of the 77-token padded captions (N, 77, D)."""
    tok = clip_tokenizer()
    out = []
    for i in range(0, len(captions), batch):
        ids = tok(captions[i: i + batch], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        out.append(text_encoder(ids)[0])
    return torch.cat(out)


def train_unet(captions: list[str], text_encoder, vae, s: BuildSettings, log, unet=None) -> torch.nn.Module:
    """The tailored UNet: a new one (``embedded.new_unet``), or ``unet`` trained further."""
    from diffusers import DDPMScheduler

    torch.manual_seed(s.seed + 2)
    rng = np.random.default_rng(s.seed + 2)
    noise_scheduler = DDPMScheduler.from_config(embedded.new_scheduler().config)
    # Precompute the data once: latents of a few renders per caption and the caption embeddings.
    start = time.perf_counter()
    with torch.no_grad():
        latents, owners = [], []
        for r in range(s.renders_per_caption):
            for i in range(0, len(captions), 512):
                images, _ = render_captions(captions[i: i + 512], seed=s.seed + 100 * r + i, color_jitter=True)
                x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
                latents.append(vae.encode(x).latent_dist.sample() * vae.config.scaling_factor)
                owners.append(torch.arange(i, i + len(images)))
        latents, owners = torch.cat(latents), torch.cat(owners)
        text = encode_text(text_encoder, captions)
        empty = encode_text(text_encoder, [""])[0]
    log(f"unet data: {len(latents)} latents, {len(captions)} captions ({time.perf_counter() - start:.0f}s)")

    unet = (unet if unet is not None else embedded.new_unet(s.unet_text_at_16)).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=s.unet_lr, weight_decay=0.01)
    sched = _schedule(opt, s.unet_steps, warmup=min(200, s.unet_steps // 10 + 1))
    start = time.perf_counter()
    for step in range(s.unet_steps):
        idx = torch.from_numpy(rng.integers(0, len(latents), s.unet_batch))
        x0 = latents[idx]
        cond = text[owners[idx]].clone()
        drop = torch.from_numpy(rng.random(s.unet_batch) < s.cfg_dropout)
        cond[drop] = empty
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (s.unet_batch,))
        noisy = noise_scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == s.unet_steps - 1:
            log(f"unet step {step}/{s.unet_steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    return unet.eval()


def _kept_models(world: Path):
    """A built world's CLIP (whose text tower is the SD text encoder) and VAE, to train a new UNet on."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    if not (world / "scorer" / "config.json").is_file() or not (world / "pipeline" / "vae").is_dir():
        raise HgdpoError(f"--unet-only-from: {world} is not a built world (no scorer/ and pipeline/vae/)")
    clip = CLIPModel.from_pretrained(world / "scorer").eval()
    return clip, clip.text_model, AutoencoderKL.from_pretrained(world / "pipeline" / "vae").eval()


def build(out: str | Path, settings: BuildSettings | None = None, log=print, unet_only_from: str | Path | None = None,
          continue_unet: bool = False) -> dict:
    """Train all three models and write ``out/pipeline``, ``out/scorer`` and ``out/world.json``.

    With ``unet_only_from`` (a world folder), its CLIP (the scorer and text encoder) and VAE are kept
    as they are and only the tailored UNet is trained anew: the way to try another tailored model
    while the world's PickScore stays the same. ``continue_unet`` starts from that world's UNet (a
    tailored model trained further) instead of a new one.
    """
    s = settings or BuildSettings()
    if continue_unet and unet_only_from is None:
        raise HgdpoError("--continue-unet needs --unet-only-from: the world whose UNet to train further")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    captions = make_prompts(s.train_captions, "train", seed=s.seed)
    times = {}
    t0 = time.perf_counter()
    if unet_only_from is None:
        clip = train_clip(captions, s, log)
        text_encoder = clip.text_model  # a CLIPTextModel: the SD text encoder of the world
        times["clip_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        vae = train_vae(captions, s, log)
        times["vae_s"] = time.perf_counter() - t1
    else:
        clip, text_encoder, vae = _kept_models(Path(unet_only_from))
    start_unet = None
    if continue_unet:
        from diffusers import UNet2DConditionModel

        start_unet = UNet2DConditionModel.from_pretrained(Path(unet_only_from) / "pipeline" / "unet")
        if s.unet_text_at_16 != (start_unet.config.down_block_types[0] == "CrossAttnDownBlock2D"):
            raise HgdpoError("--unet-text-at-16 differs from the UNet of --unet-only-from, which --continue-unet trains")
    t2 = time.perf_counter()
    unet = train_unet(captions, text_encoder, vae, s, log, start_unet)
    times["unet_s"] = time.perf_counter() - t2
    times["total_s"] = time.perf_counter() - t0
    # float32, as SD1.5 checkpoints ship: a plain `from_pretrained` gets one dtype throughout.
    embedded.save_pipeline(out / "pipeline", text_encoder, vae, unet)
    embedded.save_scorer(out / "scorer", clip)
    info = {"settings": asdict(s), "build_seconds": times}
    if unet_only_from is not None:
        info["clip_and_vae_from"] = str(unet_only_from)
        base = Path(unet_only_from) / "world.json"
        if base.exists():  # the record of the world it came from: a chain of builds reads back to scratch
            info["from_world"] = json.loads(base.read_text())
    if continue_unet:
        info["unet_continued_from"] = str(unet_only_from)
    (out / "world.json").write_text(json.dumps(info, indent=2))
    log(f"world: built in {times['total_s']:.0f}s -> {out}")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the miniature world's models.")
    parser.add_argument("--out", required=True, help="output folder (pipeline/, scorer/, world.json)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the training steps (quick checks)")
    parser.add_argument("--unet-steps", type=int, help="override the UNet's training steps")
    parser.add_argument("--unet-text-at-16", action="store_true",
                        help="the UNet attends to the text at the latent's full resolution too")
    parser.add_argument("--unet-only-from", metavar="WORLD",
                        help="keep this world folder's CLIP and VAE (e.g. hgdpo/world/weights); train only the UNet")
    parser.add_argument("--continue-unet", action="store_true",
                        help="with --unet-only-from: train that world's UNet further (--unet-steps more steps)")
    args = parser.parse_args(argv)

    quiet_libraries()
    settings = BuildSettings().scaled(args.scale) if args.scale != 1.0 else BuildSettings()
    if args.unet_steps:
        settings.unet_steps = args.unet_steps
    settings.unet_text_at_16 = args.unet_text_at_16
    build(args.out, settings, log=lambda m: print(m, flush=True), unet_only_from=args.unet_only_from,
          continue_unet=args.continue_unet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
