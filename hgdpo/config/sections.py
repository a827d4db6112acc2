"""Config sections shared by the stages, each defined once: where prompts come from, which base model, how
images are sampled, the Ray actors that do the work, where runs are tracked.

A stage's config inherits the sections it uses (``PoolConfig(Sampling, BaseModel, PromptSource)``); the
settings stay flat in YAML and on the command line (``steps=20``), and docs/settings.md lists them
with the stage. Every class is ``kw_only``, so a section's required field (``prompts``) may precede
the defaulted fields of another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hgdpo.config.core import ALLOW_LOCAL_DOC, doc

Sampler = Literal["dpm_multistep", "ddim", "euler", "euler_ancestral", "ddpm", "pndm"]
PromptFormat = Literal["auto", "txt", "jsonl", "csv", "tsv", "parquet"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]


@dataclass(kw_only=True)
class PromptSource:
    """The prompts a stage reads (``hgdpo.prompts.read_prompts``)."""

    prompts: str = doc("Prompt file: .txt (one per line), .jsonl, .csv, .tsv (PartiPrompts) or .parquet.",
                       path=True, resume=True)
    prompt_format: PromptFormat = doc("Format of the prompt file; `auto` goes by its suffix.", "auto", resume=True)
    prompt_column: str | None = doc(
        "Column/field holding the prompt text (default: the first of prompt, Prompt, caption, text).", None,
        resume=True)
    id_column: str | None = doc(
        "Column/field holding a stable prompt id (default: id or prompt_id if present, "
        "else an id derived from the text and its position).", None, resume=True)
    category: str | None = doc("Keep only prompts of this category (PartiPrompts: `People`, 177 prompts).", None,
                               resume=True)
    max_prompts: int | None = doc("Use only the first this many prompts (after the category filter).", None,
                                  minimum=1, resume=True)

    def prompt_settings(self) -> dict:
        """The keyword arguments of ``hgdpo.prompts.read_prompts`` besides the file."""
        return {"fmt": self.prompt_format, "prompt_column": self.prompt_column, "id_column": self.id_column,
                "category": self.category, "max_prompts": self.max_prompts}


@dataclass(kw_only=True)
class BaseModel:
    """The model a stage samples from (the one HG-DPO improves)."""

    model: str = doc(
        "The base model: `embedded`, a hub id, a local diffusers folder, or a single-file "
        "`.safetensors` checkpoint.", "embedded", resume=True)
    model_config: str | None = doc(
        "For a single-file checkpoint: a diffusers folder or hub id with the component configs "
        "(default: the SD1.5 configs from the hub).", None, resume=True)
    allow_pickle: bool = doc("Allow pickle weight formats (.bin/.ckpt/.pt) of models and scorers. Off: safetensors "
                             "only.", False)


@dataclass(kw_only=True)
class Sampling:
    """How images are sampled (``hgdpo.models.sampling``); ``hgdpo.config.core.check_sampling`` checks the values."""

    sampler: Sampler = doc("Scheduler used for sampling (paper: DPM-Solver multistep).", "dpm_multistep", resume=True)
    steps: int = doc("Sampler steps (paper: 50).", 50, minimum=1, resume=True)
    guidance_scale: float = doc("Classifier-free guidance scale (paper: 5.0).", 5.0, minimum=0, resume=True)
    width: int | None = doc("Image width in pixels (paper: 704); default: the model's native size.", None, resume=True)
    height: int | None = doc("Image height in pixels (paper: 1024); default: the model's native size.", None,
                             resume=True)
    negative_prompt: str = doc("Negative prompt used for classifier-free guidance.", "", resume=True)
    dtype: Dtype = doc("Model precision: `auto` is float16 on CUDA and float32 on CPU.", "auto", resume=True)


@dataclass(kw_only=True)
class Generators:
    """The Ray Data actors that sample images; ``hgdpo.config.core.check_actors(cfg, "generator")`` checks them."""

    TRAILING = True  # listed after the stage's own settings (hgdpo.config.core.reference_fields)

    generator_actors: int = doc("Generator actors, one per GPU: each loads once what its stage samples with (the "
                                "pool's: the model and PickScore, and scores its images; the evaluation's: the model "
                                "with A's and B's adapters).", 1, minimum=1)
    generator_gpus: float = doc("GPUs per generator actor (fractions allowed, e.g. 0.5).", 0.0)
    generator_cpus: float = doc("CPUs per generator actor (its torch threads on CPU).", 1.0, above=0)


@dataclass(kw_only=True)
class Scorers:
    """The Ray Data actors that score images (``check_actors(cfg, "scorer")``)."""

    TRAILING = True  # listed after the stage's own settings (hgdpo.config.core.reference_fields)

    scorer_actors: int = doc("Scorer actors: each loads every scorer once.", 1, minimum=1)
    scorer_gpus: float = doc("GPUs per scorer actor (fractions allowed).", 0.0)
    scorer_cpus: float = doc("CPUs per scorer actor.", 1.0, above=0)


@dataclass(kw_only=True)
class Encoders:
    """The Ray Data actors that VAE-encode images (``check_actors(cfg, "encoder")``)."""

    TRAILING = True  # listed after the stage's own settings (hgdpo.config.core.reference_fields)

    encoder_actors: int = doc("VAE encoder actors: each loads the VAE once; one per GPU.", 1, minimum=1)
    encoder_gpus: float = doc("GPUs per encoder actor (fractions allowed).", 0.0)
    encoder_cpus: float = doc("CPUs per encoder actor (its torch threads on CPU).", 1.0, above=0)


@dataclass(kw_only=True)
class Tracking:
    """Where a stage records its MLflow run; a stage sets its own default experiment by redeclaring
    ``mlflow_experiment``."""

    TRAILING = True  # listed after the stage's own settings (hgdpo.config.core.reference_fields)

    mlflow_uri: str | None = doc("MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite ./mlflow.db).", None)
    mlflow_experiment: str = doc("MLflow experiment name.", "hgdpo")
    mlflow_allow_local: bool = doc(ALLOW_LOCAL_DOC, False)
