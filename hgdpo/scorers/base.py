"""What every scorer is: a class that names its files, checks them cheaply, loads them, and rates
(prompt, image) pairs, higher = better (paper §3.1 ranks a pool by one; §4 evaluates with several).

A scorer is chosen by a ``ScorerSpec``: its ``name`` (a key of ``hgdpo.scorers.registry.SCORERS``), the
``model`` it loads (hub id, local folder or file; ``None``: the scorer's ``default_model``) and, where it
is separate, its ``processor`` (tokenizer, image processor, CLIP backbone or architecture; ``None``: the
scorer's ``default_processor``, or the model's own).

A subclass declares, as class attributes, its name, its defaults, what its required model is, the
evaluation settings that name its files (``Setting``: the YAML keys of ``hgdpo.evaluate.config``) and its
batch size, and implements ``check`` (configs and headers only, before any work), ``load`` and
``score_batch``. The base does the rest: the (prompts, images) contract, batching, and the two forms
of the scores:

* ``scorer(prompts, images)``: (B,) float64, what the evaluation compares and stores;
* ``scorer.rank_scores(prompt, images)``: one prompt's N images as (N,) float32, what a pool stores, so
  its ranking (``rank``) is of the stored values.

Errors name the scorer and its field (``ScorerError``); a job with settings of other names renames the
field (``ScorerError.renamed``). torch and transformers are imported where a model is loaded or run, not
at the top of a scorer's module: the configs import the registry to check scorer names, and a config
check should not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from hgdpo.errors import HgdpoError


@dataclass(frozen=True)
class ScorerSpec:
    """One scorer: its name, and where its weights and processor come from."""

    name: str  # a key of hgdpo.scorers.registry.SCORERS
    model: str | None = None  # hub id, local folder or file; None: the scorer's default
    processor: str | None = None  # processor / tokenizer / CLIP backbone / architecture, when separate


@dataclass(frozen=True)
class Setting:
    """An evaluation setting naming a scorer's model or processor: its YAML key and its documentation
    (``hgdpo.evaluate.config`` makes one field of each; its default is the scorer's)."""

    key: str
    doc: str
    path: bool = True  # may name a local file or folder (a sweep makes it absolute)


@dataclass(frozen=True)
class ReportHook:
    """What a scorer reads in images beyond their scores.

    ``read(image, prompt)``: what it reads in one (H, W, 3) uint8 image of ``prompt``.
    ``summarize(reads_a, reads_b, groups, *, resamples, confidence, seed)``: A's reads against B's, paired
    one to one (``groups``: each pair's prompt), as flat figures: for each rate ``r`` of ``rates``,
    ``r_a``, ``r_b`` and ``r_diff`` (A - B), each with ``_low`` and ``_high`` (a bootstrap interval over
    prompts), and any counts the rates are fractions of.
    """

    kind: str  # what the figures are of; it names them in the duels' metrics (h2h_<a>_over_<b>_<kind>_<rate>)
    source: str  # who reads the images, as the tables say
    rates: tuple[tuple[str, str], ...]  # (figure, label) of each rate the tables show, in their order
    read: Callable[[Any, str], Any]
    summarize: Callable[..., dict[str, float]]



class ScorerError(HgdpoError):
    """A scorer refused its input: ``scorer 'name', field: message`` (``field`` None: the message names it)."""

    def __init__(self, scorer: str, field: str | None, message: str):
        self.scorer, self.field, self.message = scorer, field, message
        super().__init__(f"scorer {scorer!r}, {field}: {message}" if field else f"scorer {scorer!r}: {message}")

    def renamed(self, keys: dict[str, str]) -> str:
        """The message under a job's own setting names, e.g. ``{"model": "scorer_model"}``."""
        return f"{keys.get(self.field, self.field)}: {self.message}" if self.field else self.message


def checked_batch(prompts: list[str], images: np.ndarray) -> np.ndarray:
    """Check the (prompts, images) contract shared by every scorer; returns the images as an array."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (B, H, W, 3) uint8, got {images.shape} {images.dtype}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return images


def by_prompt(prompts: list[str]) -> dict[str, list[int]]:
    """Indices of each distinct prompt, in first-seen order (for scorers that take one prompt at a time)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return groups


def pooled(out):
    """A projected embedding: transformers 5 returns an output object holding it as ``pooler_output``,
    older versions the tensor itself."""
    return getattr(out, "pooler_output", out)


def rank(scores: np.ndarray) -> np.ndarray:
    """Indices of ``scores`` best first (ties keep seed order, so ranking is deterministic)."""
    return np.argsort(-np.asarray(scores), kind="stable").astype(np.int32)


class Scorer:
    """A loaded scorer; the class itself names, checks and loads it (see the module docstring)."""

    name: ClassVar[str]
    default_model: ClassVar[str | None] = None  # None: the scorer loads no model, or its model is required
    default_processor: ClassVar[str | None] = None  # None: the model's own, or none needed
    required_model: ClassVar[str | None] = None  # what ``model`` is, when it has no default
    model_setting: ClassVar[Setting | None] = None  # the evaluation's setting of ``model``
    processor_setting: ClassVar[Setting | None] = None  # the evaluation's setting of ``processor``
    batch: ClassVar[int | None] = 16  # images per forward pass (bounds memory); None: all at once
    per_prompt: ClassVar[bool] = False  # batches hold one prompt's images only
    report: ClassVar[ReportHook | None] = None  # what it reads in images beyond scores (the judge's objects)

    # -- the class: files, checks, loading

    @classmethod
    def error(cls, field: str | None, message: str) -> ScorerError:
        return ScorerError(cls.name, field, message)

    @classmethod
    def model_of(cls, spec: ScorerSpec) -> str | None:
        """``spec.model``, or the scorer's default."""
        return spec.model if spec.model is not None else cls.default_model

    @classmethod
    def processor_of(cls, spec: ScorerSpec) -> str | None:
        """``spec.processor``, or the scorer's default (None: the model's own, or none needed)."""
        return spec.processor if spec.processor is not None else cls.default_processor

    @classmethod
    def required(cls, spec: ScorerSpec) -> str:
        """The model, which this scorer cannot do without."""
        model = cls.model_of(spec)
        if model is None:
            raise cls.error("model", f"required: {cls.required_model}")
        return model

    @classmethod
    def check(cls, spec: ScorerSpec, allow_pickle: bool = False) -> None:
        """Refuse a bad spec before any work: the paths exist and look like this scorer's, a pickle file
        needs ``allow_pickle``, a checkpoint's keys and shapes fit. Reads configs and headers, not weights."""
        raise NotImplementedError

    @classmethod
    def check_prompts(cls, prompts: list[str]) -> None:
        """Refuse prompts this scorer cannot read (every scorer reads any text but the world's judge)."""

    @classmethod
    def load(cls, spec: ScorerSpec, *, allow_pickle: bool = False, device: str = "cpu", dtype=None,
             attention: str | None = None) -> Scorer:
        """The scorer on ``device``. ``dtype`` (a torch dtype; None: float32) and ``attention`` (transformers'
        attention implementation; None: its default) are followed by the scorers on a transformers CLIP;
        the others run in float32. Scores are taken in float32 whatever the model's dtype."""
        raise NotImplementedError

    # -- a loaded scorer

    def score_batch(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        """Scores (b,) of at most ``batch`` images (one prompt's when ``per_prompt``)."""
        raise NotImplementedError

    def scores(self, prompts: list[str], images: np.ndarray, batch: int | None = None) -> np.ndarray:
        """(B,) float64 scores, ``batch`` (default: the scorer's) images per ``score_batch`` call."""
        images = checked_batch(prompts, images)
        step = batch or self.batch or max(len(images), 1)
        groups = by_prompt(prompts).values() if self.per_prompt else [list(range(len(images)))]
        out = np.zeros(len(images), np.float64)
        for idx in groups:
            for start in range(0, len(idx), step):
                part = idx[start:start + step]
                out[part] = self.score_batch([prompts[i] for i in part], images[part])
        return out

    def __call__(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        """(B,) float64 scores of (prompt, image) pairs, higher = better."""
        return self.scores(prompts, images)

    def rank_scores(self, prompt: str, images: np.ndarray, batch: int | None = None) -> np.ndarray:
        """One prompt's N images as (N,) float32 scores, what a pool stores and ranks by."""
        return self.scores([prompt] * len(images), images, batch).astype(np.float32)
