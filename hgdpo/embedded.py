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


def build_pipeline(dst: Path) -> None:
    """Write a small SD1.5-architecture ``StableDiffusionPipeline`` folder to ``dst``."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from hgdpo.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    # Three VAE blocks: scale factor 4, so a 64x64 image has a 16x16 latent.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=16,
        sample_size=IMAGE_SIZE)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16)
    # SD1.5's training schedule (scaled_linear betas); sampling uses DPM-Solver by default.
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(dst, safe_serialization=True)


def build_scorer(dst: Path) -> None:
    """Write a small CLIP-architecture PickScore stand-in (model + processor) to ``dst``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from hgdpo.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(SEED + 1)
    config = CLIPConfig(
        text_config=dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=32)
    CLIPModel(config).save_pretrained(dst, safe_serialization=True)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=clip_tokenizer())
    processor.save_pretrained(dst)
