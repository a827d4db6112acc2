"""The configuration of the evaluation job (``jobs/evaluate.py``): model A against baseline B by win rates."""

from __future__ import annotations

from dataclasses import dataclass, make_dataclass

from hgdpo.config.core import check_actors, check_fields, check_image_size, check_locations, doc
from hgdpo.config.sections import BaseModel, Generators, PromptSource, Sampling, Scorers, Tracking
from hgdpo.errors import ConfigError
from hgdpo.evaluate.sample_config import ALPHA_MAX
from hgdpo.infra import storage
from hgdpo.scorers import registry

SCORERS = registry.SCORER_NAMES

# The settings naming a scorer's model and processor: a scorer's own ``model_setting`` / ``processor_setting``
# (hgdpo.scorers), each defaulting to the scorer's default.
SCORER_SETTINGS = [(name, part, setting, default) for name, cls in registry.SCORERS.items()
                   for part, setting, default in (("model", cls.model_setting, cls.default_model),
                                                  ("processor", cls.processor_setting, cls.default_processor))
                   if setting is not None]
ScorerSettings = make_dataclass(
    "ScorerSettings", [(setting.key, str if default is not None else str | None,
                        doc(setting.doc, default, path=setting.path))
                       for _, _, setting, default in SCORER_SETTINGS],
    kw_only=True, namespace={"__module__": __name__, "__doc__": "Each scorer's model and processor settings."})


@dataclass(kw_only=True)
class Comparison:
    """What an evaluation compares: model A against baseline B, and the scorers that rate both."""

    output: str = doc("Folder or storage URI (s3://...) the report, the scores and the side-by-side picture are "
                      "written to.")

    adapter: str | None = doc("A's adapter (the <output>/adapter folder or URI of jobs/train.py); none: the base "
                                        "model.", None)
    alpha: float = doc(f"Weight of A's adapter, 0..{ALPHA_MAX:g} (paper: 0.5).", 0.5, minimum=0, maximum=ALPHA_MAX,
                       sweep=True)
    lan: bool = doc("A samples with latent normalisation (eq. 7) against the base model. Needs an adapter.", False,
                    sweep=True)
    baseline_adapter: str | None = doc("B's adapter; none (default): B is the base model, the paper's target model.",
                                       None, path=True)
    baseline_alpha: float = doc(f"Weight of B's adapter, 0..{ALPHA_MAX:g}.", 0.5, minimum=0, maximum=ALPHA_MAX)
    baseline_lan: bool = doc("B samples with LAN. Needs baseline_adapter.", False)

    scorers: list[str] = doc(f"Scorers to compare A and B with, any of {', '.join(SCORERS)}. `judge` is the "
                             "miniature world's program (embedded model only).", ["judge", "pickscore"])


@dataclass(kw_only=True)
class EvalConfig(Tracking, Scorers, Generators, ScorerSettings, Comparison, Sampling, BaseModel, PromptSource):
    """Win rates of model A over baseline B on test prompts (paper §4, Tables 1-3, 5, 6).

    A and B are each the base model, optionally with an adapter at weight alpha, optionally with
    LAN; both make their images from the same seeds, and every scorer rates both. The settings of the
    scorers' files (``ScorerSettings``) come from the scorers (``hgdpo.scorers.registry``).
    """

    SECTION = "evaluate"

    images_per_prompt: int = doc("Seeds per prompt; A and B share them, and each seed is one comparison.", 1,
                                minimum=1)
    seed: int = doc("Run seed; image k of prompt p uses a seed derived from (seed, prompt id, k).", 0)
    rows_per_part: int = doc("(prompt, seed) rows per parquet file of scores.parquet, each with A's and B's PNGs "
                             "(~4.1 MiB at 704x1024); B's images per file of a baseline cache. No file may pass 5 GiB "
                             "(S3's limit on the copy that commits it; hgdpo.infra.storage.MAX_OBJECT_BYTES): a value "
                             "that would is refused. Changes only how the scores are split into files.", 128,
                            minimum=1)

    bootstrap: int = doc("Bootstrap resamples (over prompts) of the win-rate intervals.", 2000, minimum=1)
    confidence: float = doc("Confidence of the win-rate intervals.", 0.95, above=0, below=1)
    picture_prompts: int = doc("Prompts shown in the side-by-side picture of A and B.", 8, minimum=0)
    mlflow_experiment: str = doc("MLflow experiment name.", "hgdpo-evaluate")

    def __post_init__(self) -> None:
        s = self.SECTION
        for name in ("prompts", "output"):
            if not getattr(self, name):
                raise ConfigError(f"{s}.{name}: required")
        check_fields(self)
        for name, adapter in (("adapter", self.adapter), ("baseline_adapter", self.baseline_adapter)):
            if adapter == "":
                raise ConfigError(f"{s}.{name}: empty; give an adapter folder or leave it unset")
        for name, adapter in (("lan", self.adapter), ("baseline_lan", self.baseline_adapter)):
            if getattr(self, name) and adapter is None:
                which = "adapter" if name == "lan" else "baseline_adapter"
                raise ConfigError(f"{s}.{name}: needs {which} (LAN normalises an adapted model to its base model)")
        if not self.scorers:
            raise ConfigError(f"{s}.scorers: empty; name at least one of {', '.join(SCORERS)}")
        for i, name in enumerate(self.scorers):
            if name not in SCORERS:
                raise ConfigError(f"{s}.scorers[{i}]: unknown scorer {name!r}; known: {', '.join(SCORERS)}")
        if len(set(self.scorers)) != len(self.scorers):
            raise ConfigError(f"{s}.scorers: a scorer is named twice ({self.scorers})")
        for name, part, setting, _ in SCORER_SETTINGS:
            required = part == "model" and registry.SCORERS[name].required_model is not None
            if required and name in self.scorers and not getattr(self, setting.key):
                raise ConfigError(f"{s}.{setting.key}: required by scorer {name!r} (a checkpoint file or folder)")
        check_image_size(self)
        check_actors(self, "generator", "scorer")
        check_locations(self, "output", "adapter", "baseline_adapter")
        if self.width and self.height:  # else once the model's native size is read (hgdpo.evaluate.evaluate.prepare)
            self.check_file_size(self.width, self.height)

    def check_file_size(self, width: int, height: int) -> None:
        """Refuse settings under which a file of the evaluation would pass the bound on one file
        (``hgdpo.infra.storage``): a part of scores.parquet (``rows_per_part`` rows of two PNGs), or a row of a
        baseline cache (a prompt's ``images_per_prompt`` PNGs of B). A PNG is at most about its raw RGB
        bytes."""
        bound, image = storage.object_bound(), width * height * 3
        s, size = self.SECTION, storage.size_text
        if self.rows_per_part * 2 * image > bound:
            raise ConfigError(
                f"{s}.rows_per_part: {self.rows_per_part} rows of ~{size(2 * image)} (A's and B's PNGs at "
                f"{width}x{height}) would write parts of ~{size(self.rows_per_part * 2 * image)}, over "
                f"{storage.bound_text(bound)}; lower rows_per_part to {max(1, bound // (2 * image))} or less")
        if self.images_per_prompt * image > bound:
            raise ConfigError(
                f"{s}.images_per_prompt: a prompt's {self.images_per_prompt} PNGs of B at {width}x{height} "
                f"(~{size(self.images_per_prompt * image)}, one row of a baseline cache) are over "
                f"{storage.bound_text(bound)}; lower images_per_prompt to {bound // image} or less")

    def prompts_per_baseline_part(self) -> int:
        """Prompts per file of a baseline cache: at most ``rows_per_part`` images of B (at least one prompt)."""
        return max(1, self.rows_per_part // self.images_per_prompt)

    def side(self, which: str) -> dict:
        """Model A (``"a"``) or baseline B (``"b"``): base model, adapter, alpha (None: no adapter), LAN."""
        adapter, alpha, lan = ((self.adapter, self.alpha, self.lan) if which == "a"
                               else (self.baseline_adapter, self.baseline_alpha, self.baseline_lan))
        return {"adapter": adapter, "alpha": alpha if adapter is not None else None, "lan": lan}

    def scorer_sources(self, name: str) -> tuple[str | None, str | None]:
        """(model, processor) of scorer ``name``, as ``hgdpo.scorers.base.ScorerSpec`` takes them (None where
        the scorer has no such setting)."""
        cls = registry.SCORERS[name]
        return tuple(getattr(self, s.key) if s is not None else None
                     for s in (cls.model_setting, cls.processor_setting))
