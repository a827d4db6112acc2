"""The embedded default: a small SD1.5-architecture pipeline and PickScore-architecture scorer.

Used whenever a job names ``model: embedded`` / ``scorer_model: embedded`` (the defaults), so
the product runs on a laptop with no GPU and no model hub. The components are built
deterministically (fixed seed) into a cache folder in the formats real models ship in (a
diffusers pipeline folder; a CLIP model + processor folder; safetensors) and are then loaded
by exactly the code that loads real models (``hgdpo.models``).

The seam: ``build_pipeline`` / ``build_scorer`` write the folders; whatever writes them (random
initialisation here, trained weights later) the loaders do not change. The folder name carries
``EMBEDDED_VERSION`` so a new default never collides with a cached old one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED = "embedded"
EMBEDDED_VERSION = "v1"
IMAGE_SIZE = 64  # native resolution of the embedded model (pixels)
SEED = 1234


def home() -> Path:
    """Cache root: ``$HGDPO_HOME`` or ``~/.cache/hgdpo``."""
    return Path(os.environ.get("HGDPO_HOME") or Path.home() / ".cache" / "hgdpo")


def _ensure(name: str, build) -> Path:
    """Build ``home()/embedded-<version>/<name>`` once; safe when several processes race."""
    target = home() / f"embedded-{EMBEDDED_VERSION}" / name
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / ".complete").is_file():  # a stale, incomplete folder: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def pipeline_dir() -> Path:
    """The embedded SD1.5-architecture pipeline folder (built on first use)."""
    return _ensure("pipeline", build_pipeline)


def scorer_dir() -> Path:
    """The embedded PickScore-architecture model + processor folder (built on first use)."""
    return _ensure("scorer", build_scorer)


# Architecture of the embedded models (SD1.5's, scaled down). One definition, used both by the
# random builder below and by the miniature-world trainer (hgdpo.world.build).
TEXT_HIDDEN = 32


def _text_config(**extra) -> dict:
    from hgdpo.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE

    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
                num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **extra)


def new_clip():
    """A CLIP-architecture model: the world's PickScore; its text tower is the SD text encoder."""
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(
        text_config=_text_config(),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=64, intermediate_size=256,
                           num_hidden_layers=3, num_attention_heads=4),
        projection_dim=64))


def new_vae():
    """AutoencoderKL with three blocks: scale factor 4, so a 64x64 image has a 16x16 latent."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE)


def new_unet():
    """SD1.5's UNet, scaled down: cross-attention to the text at the 8x8 level and in the middle."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8, norm_num_groups=16)


def new_scheduler():
    """SD1.5's training noise schedule (scaled_linear betas); sampling uses DPM-Solver by default."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1)


def save_pipeline(dst: Path, text_encoder, vae, unet) -> None:
    """Write the components as a diffusers ``StableDiffusionPipeline`` folder (safetensors)."""
    from diffusers import StableDiffusionPipeline

    from hgdpo.tokenizer import clip_tokenizer

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=new_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(dst, safe_serialization=True)


def save_scorer(dst: Path, clip) -> None:
    """Write a CLIP model and its processor (the real CLIP tokenizer) as a PickScore-style folder."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from hgdpo.tokenizer import clip_tokenizer

    clip.save_pretrained(dst, safe_serialization=True)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=clip_tokenizer()).save_pretrained(dst)


def build_pipeline(dst: Path) -> None:
    """Write an untrained (seeded) SD1.5-architecture pipeline folder to ``dst``."""
    import torch
    from transformers import CLIPTextModel

    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(new_clip().config.text_config)
    save_pipeline(dst, text_encoder, new_vae(), new_unet())


def build_scorer(dst: Path) -> None:
    """Write an untrained (seeded) CLIP-architecture PickScore stand-in to ``dst``."""
    import torch

    torch.manual_seed(SEED + 1)
    save_scorer(dst, new_clip())
