"""The embedded default: the miniature world's SD1.5-architecture pipeline and PickScore.

Used whenever a job names ``model: embedded`` / ``scorer_model: embedded`` (the defaults), so
the product runs on a laptop with no GPU and no model hub. The models were trained by
``hgdpo.world.build`` on the world's renders (see ``hgdpo/world/``) and ship inside the package
(``hgdpo/world/weights``, float32 safetensors, about 21 MB) in the formats real models ship in: a
diffusers pipeline folder and a CLIP model + processor folder. They are loaded by exactly the
code that loads real models (``hgdpo.models.loading``).

The architectures (``new_clip``, ``new_vae``, ``new_unet``) are defined here once, for the
world builder and for anything that needs a fresh model of the same shape.
"""

from __future__ import annotations

from pathlib import Path

from hgdpo.errors import HgdpoError
from hgdpo.models.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_tokenizer, write_vocab_files

EMBEDDED = "embedded"
IMAGE_SIZE = 64  # native resolution of the embedded model (pixels)
WEIGHTS = Path(__file__).resolve().parents[1] / "world" / "weights"


def _folder(name: str) -> Path:
    path = WEIGHTS / name
    if not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        raise HgdpoError(f"the embedded {name} is missing at {path}; rebuild it with "
                         f"`python -m hgdpo.world.build --out {WEIGHTS}`")
    return path


def pipeline_dir() -> Path:
    """The embedded SD1.5-architecture pipeline folder (the world's tailored model)."""
    return _folder("pipeline")


def scorer_dir() -> Path:
    """The embedded PickScore-architecture model + processor folder (the world's PickScore)."""
    return _folder("scorer")


# Architecture of the embedded models (SD1.5's, scaled down). One definition, used both by the
# random builder below and by the miniature-world trainer (hgdpo.world.build).
TEXT_HIDDEN = 32


def _text_config(**extra) -> dict:
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


def new_unet(text_at_16: bool = False):
    """SD1.5's UNet, scaled down: cross-attention to the text at the 8x8 level and in the middle,
    and with ``text_at_16`` at the latent's full 16x16 resolution too (as SD1.5 attends at 64x64)."""
    from diffusers import UNet2DConditionModel

    first_down, last_up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if text_at_16 else ("DownBlock2D", "UpBlock2D")
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=(first_down, "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", last_up), cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8, norm_num_groups=16)


def new_scheduler():
    """SD1.5's training noise schedule (scaled_linear betas); sampling uses DPM-Solver by default."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1)


def save_pipeline(dst: Path, text_encoder, vae, unet) -> None:
    """Write the components as a diffusers ``StableDiffusionPipeline`` folder (safetensors)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=new_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(dst, safe_serialization=True)
    write_vocab_files(Path(dst) / "tokenizer")


def save_scorer(dst: Path, clip) -> None:
    """Write a CLIP model and its processor (the real CLIP tokenizer) as a PickScore-style folder."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    clip.save_pretrained(dst, safe_serialization=True)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=clip_tokenizer()).save_pretrained(dst)
    write_vocab_files(dst)
