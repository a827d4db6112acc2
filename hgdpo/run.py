"""The whole method in one job: build a pool, train HG-DPO on it, evaluate it against the base model.

``RunConfig`` names the run's folder, the train and test prompts, and the settings of each
stage as a section (``pool:``, ``train:``, ``evaluate:``) that is passed to the stage's own
config, so every stage setting works here with the same name, type and check. The run wires the
stages together: ``<output>/pool`` is trained on, ``<output>/train/adapter`` is evaluated against
the base model into ``<output>/evaluate``. Every stage is idempotent, so rerunning an interrupted
run finishes it (an interrupted pool is resumed, training resumes from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from hgdpo.config.core import ALLOW_LOCAL_DOC, check_locations, doc, refuse_wired, wire
from hgdpo.errors import ConfigError
from hgdpo.evaluate.config import EvalConfig
from hgdpo.infra.storage import join
from hgdpo.pool.config import PoolConfig
from hgdpo.train.config import TrainConfig


@dataclass
class RunConfig:
    """Pool -> HG-DPO training -> evaluation against the base model, as one job."""

    SECTION = "run"
    SECTIONS = ("pool", "train", "evaluate")  # section.key=value overrides (hgdpo.config.core.load_config)

    output: str = doc("Folder or storage URI of the run: pool/, train/ and evaluate/ are written inside it.")
    train_prompts: str = doc("Prompt file the pool is built from (any format the pool job reads).")
    test_prompts: str = doc("Held-out prompt file the adapter is evaluated on.")
    model: str = doc("The model to improve: `embedded`, a diffusers folder, a .safetensors file or a hub id.",
                     "embedded")
    model_config: str | None = doc("For a single-file checkpoint: a diffusers folder or hub id with the configs.", None)
    pool: dict = doc("Settings of the pool stage (see the pool configuration), e.g. images_per_prompt.", {})
    train: dict = doc("Settings of the training stage (see the train configuration), e.g. max_steps.", {})
    evaluate: dict = doc("Settings of the evaluation stage (see the evaluate configuration), e.g. scorers.", {})
    mlflow_uri: str | None = doc("MLflow tracking URI of every stage (default: $MLFLOW_TRACKING_URI, else "
                                 "sqlite ./mlflow.db).", None)
    mlflow_allow_local: bool = doc(ALLOW_LOCAL_DOC, False)

    def __post_init__(self) -> None:
        s = self.SECTION
        for name in ("output", "train_prompts", "test_prompts"):
            if not getattr(self, name):
                raise ConfigError(f"{s}.{name}: required")
        check_locations(self, "output")
        wiring = self.wiring()
        for section in self.SECTIONS:
            settings = getattr(self, section)
            if not isinstance(settings, dict):
                raise ConfigError(f"{s}.{section}: expected a mapping of {section} settings")
            refuse_wired(settings, wiring[section], f"{s}.{section}", s,
                         f"{s}.output, {s}.train_prompts, {s}.test_prompts, {s}.model")
        self.stages()  # every stage's own checks, now

    def wiring(self) -> dict[str, dict[str, Any]]:
        """What the run sets itself in each stage's config: they wire the stages together."""
        out, model = self.output, {"model": self.model, "model_config": self.model_config}
        return {"pool": {**model, "prompts": self.train_prompts, "output": join(out, "pool")},
                "train": {**model, "pool": join(out, "pool"), "output": join(out, "train")},
                "evaluate": {**model, "prompts": self.test_prompts, "output": join(out, "evaluate"),
                             "adapter": join(out, "train", "adapter")}}

    def stages(self) -> tuple[PoolConfig, TrainConfig, EvalConfig]:
        """The three stage configs, wired together and checked by their own rules (``run.pool.steps: ...``)."""
        base = {"mlflow_uri": self.mlflow_uri} if self.mlflow_uri else {}  # a stage's section may set its own
        if self.mlflow_allow_local:
            base["mlflow_allow_local"] = True
        wiring, where = self.wiring(), f"{self.SECTION}."
        return (wire(PoolConfig, self.pool, wiring["pool"], base, where),
                wire(TrainConfig, self.train, wiring["train"], base, where),
                wire(EvalConfig, self.evaluate, wiring["evaluate"], base, where))


@dataclass
class RunResult:
    pool_seconds: float
    train_seconds: float
    evaluate_seconds: float
    evaluation: Any  # hgdpo.evaluate.eval_result.EvalResult

    @property
    def seconds(self) -> float:
        return self.pool_seconds + self.train_seconds + self.evaluate_seconds


def run(cfg: RunConfig, log=print) -> RunResult:
    """Pool, then training, then evaluation; the storage, MLflow store, prompts, model and scorers are
    checked first."""
    # late: RunConfig, above, is read by configs (replicate's, the docs' tests) that must not load Ray or torch
    from hgdpo.evaluate.evaluate import evaluate
    from hgdpo.evaluate.evaluate import prepare as prepare_evaluation
    from hgdpo.infra import storage, tracking
    from hgdpo.pool.build import build_pool
    from hgdpo.pool.build import prepare as prepare_pool
    from hgdpo.train.trainer import train

    storage.check_writable(cfg.output, "run.output")
    tracking.check_store(cfg.mlflow_uri, cfg.mlflow_allow_local, "run.mlflow_uri")
    pool_cfg, train_cfg, eval_cfg = cfg.stages()
    prepare_pool(pool_cfg)  # prompts, model, scorer
    prepare_evaluation(dataclasses.replace(eval_cfg, adapter=None, lan=False))  # test prompts, scorers

    start = time.perf_counter()
    build_pool(pool_cfg, log)
    pool_s = time.perf_counter() - start

    start = time.perf_counter()
    train(train_cfg, log)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    result = evaluate(eval_cfg, log=log)
    return RunResult(pool_s, train_s, time.perf_counter() - start, result)
