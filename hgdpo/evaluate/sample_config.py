"""The configuration of the sampler job (``jobs/sample.py``): images of a model, with or without an adapter."""

from __future__ import annotations

from dataclasses import dataclass

from hgdpo.config.core import check_fields, check_image_size, check_locations, doc
from hgdpo.config.sections import BaseModel, PromptSource, Sampling
from hgdpo.errors import ConfigError

ALPHA_MAX = 2.0  # beyond "twice as trained" an adapter is extrapolated far past what it learnt


@dataclass(kw_only=True)
class SampleConfig(Sampling, BaseModel, PromptSource):
    """Sample images of prompts from a model, optionally with an HG-DPO adapter and LAN (paper eq. 7)."""

    SECTION = "sample"

    output: str = doc("Folder (or storage URI) the PNGs and samples.json are written to.")

    adapter: str | None = doc(
        "An adapter folder written by jobs/train.py (<output>/adapter), trained on `model`; "
        "none: sample the model itself.", None)
    alpha: float = doc(
        f"Weight of the adapter's LoRA, 0..{ALPHA_MAX:g}: 0 is the base model, 1 the adapter as trained "
        "(paper: 0.5). Ignored without an adapter.", 0.5, minimum=0, maximum=ALPHA_MAX)
    lan: bool = doc(
        "Latent normalisation (paper eq. 7): after every sampler step give the tuned latent the channel-wise "
        "mean and std of the base model's latent from the same noise (two UNet calls a step). Needs an adapter.",
        False)

    images_per_prompt: int = doc("Images per prompt, each from its own seed.", 1, minimum=1)
    seed: int = doc("Run seed; image k of prompt p uses a seed derived from (seed, prompt id, k), as in the pool.", 0)

    def __post_init__(self) -> None:
        s = self.SECTION
        if not self.prompts:
            raise ConfigError(f"{s}.prompts: required (a prompt file)")
        if not self.output:
            raise ConfigError(f"{s}.output: required (the folder the images are written to)")
        if self.adapter == "":
            raise ConfigError(f"{s}.adapter: empty; give an adapter folder or leave it unset")
        check_fields(self)
        if self.lan and self.adapter is None:
            raise ConfigError(f"{s}.lan: needs an adapter (LAN normalises the adapted model to the base model); "
                              f"set adapter or lan=false")
        check_image_size(self)
        check_locations(self, "output", "adapter")

    def adapter_weight(self) -> float | None:
        """The LoRA weight to sample with: alpha with an adapter, None (the base model) without."""
        return self.alpha if self.adapter is not None else None
