"""The configuration of the preference-pool builder (``jobs/build_pool.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from hgdpo.config.core import (
    check_actors,
    check_fields,
    check_image_size,
    check_locations,
    doc,
    if_set_defaults,
    output_settings,
    rule_fields,
)
from hgdpo.config.sections import BaseModel, Generators, PromptSource, Sampling, Tracking
from hgdpo.errors import ConfigError
from hgdpo.infra import storage
from hgdpo.models.embedded import EMBEDDED
from hgdpo.pool.perturb import KINDS
from hgdpo.scorers.base import ScorerSpec
from hgdpo.scorers.registry import SCORER_NAMES, SCORERS


def pool_scorer(meta: dict) -> str:
    """The scorer that ranked the pool of metadata ``meta`` (``pool.json``); a pool whose metadata names none was
    ranked by PickScore."""
    return meta.get("scorer", {}).get("name", NEWER_DATA_FIELDS["scorer"])


@dataclass(kw_only=True)
class PoolConfig(Tracking, Generators, Sampling, BaseModel, PromptSource):
    """How to build a preference pool (paper §3.1): N samples per prompt, ranked by a scorer (PickScore)."""

    SECTION = "pool"
    RETIRED = {name: "scoring runs in the generator actors now (one actor makes and scores a prompt's images); "
                     "remove it, and give generator_gpus / generator_cpus what both need"
               for name in ("scorer_actors", "scorer_gpus", "scorer_cpus")}

    output: str = doc("Folder or storage URI (s3://..., gs://...) the pool is written to.")

    scorer: str = doc(f"The scorer that ranks a prompt's images, one of {', '.join(SCORER_NAMES)} "
                      f"(hgdpo.scorers; paper: pickscore).", "pickscore", resume="if-set")
    scorer_model: str = doc(
        "The model the scorer loads. PickScore: `embedded`, a hub id (paper: yuvalkirstain/PickScore_v1) or a local "
        "folder; another scorer: what its evaluation setting `<scorer>_model` takes (`embedded`: the scorer's "
        "default).", "embedded", resume=True)
    scorer_processor: str | None = doc(
        "The scorer's processor. PickScore: a processor folder or hub id (paper: "
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K); default: the scorer's (PickScore's: same as scorer_model).", None,
        resume=True)

    images_per_prompt: int = doc("N, the number of images generated and ranked per prompt (paper: 20).", 20,
                                 minimum=2, resume=True)
    loser_rank: int | None = doc(
        "Which ranked image is the loser whose image is stored (2..N; default N, the lowest score).", None,
        minimum=2, maximum="images_per_prompt", resume=True)
    keep: Literal["all", "pair"] = doc(
        "Latents kept per prompt: all N (ablations over N and loser rank need no new pool) "
        "or only the winner's and loser's.", "all", resume=True)
    seed: int = doc("Run seed; image j of prompt p uses a seed derived from (seed, prompt id, j).", 0, resume=True)
    hard_negatives: list[str] = doc(
        "OSPO: perturbation kinds (replace, swap, drop; hgdpo.pool.perturb) for hard negatives. Per seed, an image of "
        "the prompt's first perturbation from the same seed is kept too, and the model judges every image itself "
        "against the prompt's perturbations (hgdpo.pool.ospo). Needs keep: all. Empty: none.", [], resume="if-set")
    self_judge_questions: int = doc(
        "OSPO: perturbations of a prompt its images are judged against (the first makes the negatives).", 2,
        minimum=1, resume="if-set")

    generator_batch: int = doc(
        "Images per sampler run (each UNet call takes twice as many with classifier-free guidance). 4 is "
        "sized for a 24 GB GPU at 704x1024 in float16 beside the VAE and PickScore.", 4, minimum=1)
    vae_batch: int = doc(
        "Latents per VAE decode call: its full-resolution activations bound the memory (one 256-channel "
        "float16 activation is 370 MB per image at 704x1024). 4 is sized for a 24 GB GPU.", 4, minimum=1)
    attention: Literal["sdpa", "eager"] = doc(
        "Attention of the UNet and VAE: `sdpa` (PyTorch's fused kernels, memory-efficient) or `eager`.", "sdpa")
    channels_last: bool = doc("UNet and VAE in channels-last memory format (CUDA only: faster convolutions).", True)
    compile: bool = doc("torch.compile the UNet (CUDA with Triton only; else a warning and no compile). Off: "
                        "compiling takes minutes and pays only for long runs.", False)

    writer_cpus: float = doc("CPUs per task that PNG-encodes the winners' and losers' images and writes a part.", 0.5,
                             above=0)
    rows_per_file: int = doc("Prompts per parquet file of the pool. A row holds the kept latents and two PNGs "
                             "(~5.8 MiB at 704x1024 with N = 20), and no file may pass 5 GiB (S3's limit on the copy "
                             "that commits it; hgdpo.infra.storage.MAX_OBJECT_BYTES): a value that would is refused.",
                             64,
                             minimum=1)

    mlflow_experiment: str = doc("MLflow experiment name.", "hgdpo-pool")
    log_pairs: int = doc("Winner/loser pairs shown in the MLflow picture.", 4, minimum=0)

    def __post_init__(self) -> None:
        s = self.SECTION
        if not self.prompts:
            raise ConfigError(f"{s}.prompts: required (a prompt file)")
        if not self.output:
            raise ConfigError(f"{s}.output: required (where to write the pool)")
        check_fields(self)
        if self.scorer not in SCORERS:
            raise ConfigError(f"{s}.scorer: unknown scorer {self.scorer!r}; known: {', '.join(SCORER_NAMES)}")

        for i, kind in enumerate(self.hard_negatives):
            if kind not in KINDS:
                raise ConfigError(f"{s}.hard_negatives[{i}]: unknown perturbation kind {kind!r}; kinds: {', '.join(KINDS)}")
        if self.hard_negatives and self.keep != "all":
            raise ConfigError(f"{s}.keep: hard negatives need keep: all (a prompt's pair is chosen among its seeds "
                              f"when training reads the pool)")
        check_image_size(self)
        check_actors(self, "generator")
        check_locations(self, "output")
        if self.width and self.height:  # the images alone; the latents join when the model is read (check_part_size)
            self.check_part_size(self.width, self.height)

    def row_bytes(self, width: int, height: int, latent_shape: list[int] | None = None) -> int:
        """About the most bytes a pool row takes in a part: the winner's and loser's PNGs (a PNG is at most
        about its raw RGB bytes) and, when ``latent_shape`` (K, C, h, w) is known, the float16 latents
        (the same sum as ``hgdpo.pool.build.block_size``'s)."""
        latents = 2 * math.prod(latent_shape) if latent_shape is not None else 0
        return latents + 2 * width * height * 3

    def check_part_size(self, width: int, height: int, latent_shape: list[int] | None = None) -> None:
        """Refuse a ``rows_per_file`` whose parts would pass the bound on one file (``hgdpo.infra.storage``)."""
        bound, row = storage.object_bound(), self.row_bytes(width, height, latent_shape)
        if self.rows_per_file * row > bound:
            raise ConfigError(
                f"{self.SECTION}.rows_per_file: {self.rows_per_file} rows of ~{storage.size_text(row)} "
                f"({width}x{height}{', with latents' if latent_shape else ''}) would write parts of "
                f"~{storage.size_text(self.rows_per_file * row)}, over {storage.bound_text(bound)}; lower "
                f"rows_per_file to {max(1, bound // row)} or less")

    def scorer_spec(self) -> ScorerSpec:
        """The scorer that ranks the pool; ``scorer_model: embedded`` (the default) is the scorer's default
        model (PickScore's and CLIP's: the embedded one)."""
        model = None if self.scorer_model == EMBEDDED else self.scorer_model
        return ScorerSpec(self.scorer, model, self.scorer_processor)

    def resolved_loser_rank(self) -> int:
        """Rank (1 = best) of the stored loser: the configured one, or N (the argmin)."""
        return self.loser_rank if self.loser_rank is not None else self.images_per_prompt

    def data_settings(self) -> dict:
        """The settings that determine the pool's content (declared ``resume``: ``DATA_FIELDS``)."""
        return output_settings(self)


# Settings that change what is in the pool (declared ``resume`` with each field). A pool on disk remembers them; a
# rerun that differs in any of them is refused (the others only change how fast the pool is built).
DATA_FIELDS = rule_fields(PoolConfig, "resume")
# Data settings a pool written before they existed lacks: left out of its fingerprint at their default.
NEWER_DATA_FIELDS = if_set_defaults(PoolConfig)
