"""The configuration of the sampler job (``jobs/sample.py``): images of a model, with or without an adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hgdpo.config import check_locations, check_sampling, doc
from hgdpo.errors import ConfigError
from hgdpo.pool_config import Sampler

ALPHA_MAX = 2.0  # beyond "twice as trained" an adapter is extrapolated far past what it learnt


@dataclass
class SampleConfig:
    """Sample images of prompts from a model, optionally with an HG-DPO adapter and LAN (paper eq. 7)."""

    SECTION = "sample"

    prompts: str = doc("Prompt file: .txt (one per line), .jsonl, .csv, .tsv (PartiPrompts) or .parquet.")
    output: str = doc("Folder (or storage URI) the PNGs and samples.json are written to.")
    prompt_format: Literal["auto", "txt", "jsonl", "csv", "tsv", "parquet"] = doc(
        "Format of the prompt file; `auto` goes by its suffix.", "auto")
    prompt_column: str | None = doc(
        "Column/field holding the prompt text (default: the first of prompt, Prompt, caption, text).", None)
    id_column: str | None = doc(
        "Column/field holding a stable prompt id (default: id or prompt_id if present, "
        "else an id derived from the text and its position).", None)
    category: str | None = doc("Keep only prompts of this category (PartiPrompts: `People`).", None)
    max_prompts: int | None = doc("Use only the first this many prompts (after the category filter).", None)

    model: str = doc(
        "The base model: `embedded`, a hub id, a local diffusers folder, or a single-file "
        "`.safetensors` checkpoint.", "embedded")
    model_config: str | None = doc(
        "For a single-file checkpoint: a diffusers folder or hub id with the component configs "
        "(default: the SD1.5 configs from the hub).", None)
    allow_pickle: bool = doc("Allow pickle weight formats (.bin/.ckpt/.pt). Off: safetensors only.", False)
    adapter: str | None = doc(
        "An adapter folder written by jobs/train.py (<output>/adapter), trained on `model`; "
        "none: sample the model itself.", None)
    alpha: float = doc(
        f"Weight of the adapter's LoRA, 0..{ALPHA_MAX:g}: 0 is the base model, 1 the adapter as trained "
        "(paper: 0.5). Ignored without an adapter.", 0.5)
    lan: bool = doc(
        "Latent normalisation (paper eq. 7): after every sampler step give the tuned latent the channel-wise "
        "mean and std of the base model's latent from the same noise (two UNet calls a step). Needs an adapter.",
        False)

    images_per_prompt: int = doc("Images per prompt, each from its own seed.", 1)
    seed: int = doc("Run seed; image k of prompt p uses a seed derived from (seed, prompt id, k), as in the pool.", 0)
    sampler: Sampler = doc("Scheduler used for sampling (paper: DPM-Solver multistep).", "dpm_multistep")
    steps: int = doc("Sampler steps (paper: 50).", 50)
    guidance_scale: float = doc("Classifier-free guidance scale (paper: 5.0).", 5.0)
    width: int | None = doc("Image width in pixels (paper: 704); default: the model's native size.", None)
    height: int | None = doc("Image height in pixels (paper: 1024); default: the model's native size.", None)
    negative_prompt: str = doc("Negative prompt used for classifier-free guidance.", "")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = doc(
        "Model precision: `auto` is float16 on CUDA and float32 on CPU.", "auto")

    def __post_init__(self) -> None:
        s = self.SECTION
        if not self.prompts:
            raise ConfigError(f"{s}.prompts: required (a prompt file)")
        if not self.output:
            raise ConfigError(f"{s}.output: required (the folder the images are written to)")
        if self.adapter == "":
            raise ConfigError(f"{s}.adapter: empty; give an adapter folder or leave it unset")
        if not 0 <= self.alpha <= ALPHA_MAX:
            raise ConfigError(f"{s}.alpha: must be between 0 and {ALPHA_MAX:g} (got {self.alpha})")
        if self.lan and self.adapter is None:
            raise ConfigError(f"{s}.lan: needs an adapter (LAN normalises the adapted model to the base model); "
                              f"set adapter or lan=false")
        if self.images_per_prompt < 1:
            raise ConfigError(f"{s}.images_per_prompt: must be at least 1 (got {self.images_per_prompt})")
        check_sampling(self)
        check_locations(self, "output", "adapter")

    def adapter_weight(self) -> float | None:
        """The LoRA weight to sample with: alpha with an adapter, None (the base model) without."""
        return self.alpha if self.adapter is not None else None
