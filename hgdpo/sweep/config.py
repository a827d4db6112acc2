"""The configuration of a sweep (``jobs/sweep.py``): the paper's ablations as Ray Tune trials.

A sweep names one pool, a base train config and a base evaluate config, and the values to try
under the parameters' common names. ``parameters`` is a grid (every combination), ``trials`` a
list of explicit trials (each a mapping of parameters, optionally with a ``name``); given both,
each listed trial is crossed with the grid. Every trial trains into
``<output>/trials/<trial>/train`` and evaluates its adapter (model A) against the base model
(baseline B) into ``<output>/trials/<trial>/eval`` (``hgdpo.sweep.sweep`` then has trials of the same
training share one adapter, and makes B's rows once for all).
"""

from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hgdpo.config.core import check_locations, doc, from_dict
from hgdpo.config.sections import Tracking
from hgdpo.errors import ConfigError
from hgdpo.evaluate.config import SCORER_PATHS, EvalConfig
from hgdpo.infra import tracking
from hgdpo.infra.storage import absolute as absolute_location
from hgdpo.infra.storage import join, parent
from hgdpo.objectives.registry import OBJECTIVES
from hgdpo.train.config import TrainConfig

# The parameters a trial may set, under the names the paper's tables use, and their stage.
TRAIN_PARAMETERS = ("objective", "pool_size", "loser_rank", "dataset_size", "beta", "lambda_stat", "stat_step",
                    "stat_sampler_steps", "learning_rate", "max_steps", "lora_rank", "focus_alpha_d", "focus_alpha_c",
                    "focus_gamma_c", "focus_t_lo", "focus_t_hi", "ospo_alpha", "ospo_gamma", "ospo_margin",
                    "timestep_min", "timestep_max")
TRAIN_PARAMETERS += tuple(f.name for o in OBJECTIVES.values() for f in o.own_fields() if f.name not in TRAIN_PARAMETERS)
EVAL_PARAMETERS = ("lan", "alpha")
# A trial's own pool (e.g. an imported public set for Table 1's rows) instead of the sweep's; a named trial only.
PARAMETERS = TRAIN_PARAMETERS + EVAL_PARAMETERS + ("pool",)

# Settings the sweep sets itself in each stage (they wire a trial together).
WIRED = {"train": ("pool", "output", "model", "model_config", "mlflow_uri", "mlflow_experiment", "mlflow_allow_local"),
         "evaluate": ("output", "adapter", "model", "model_config", "mlflow_uri", "mlflow_experiment",
                      "mlflow_allow_local")}
# Evaluate settings naming files or models: made absolute, since Tune runs a trial in its own folder.
EVAL_PATHS = ("prompts", *SCORER_PATHS, "baseline_adapter")  # SCORER_PATHS: the scorers' file settings
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,-]*$")


def absolute(value: str | None) -> str | None:
    """A local path that exists, made absolute; URIs, hub ids and `embedded` unchanged."""
    if value is None or "://" in value or value == "embedded":
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def value_text(value: Any) -> str:
    """A parameter value as it appears in a trial's name: ``2500.0`` -> ``2500``, ``True`` -> ``true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "default"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class Trial:
    """One trial: its name, the values it sets, and the two stage configs they give."""

    index: int
    name: str
    values: dict[str, Any]
    train: TrainConfig
    evaluate: EvalConfig

    @property
    def folder(self) -> str:
        """``<sweep output>/trials/<name>``: a local path or a URI."""
        return parent(self.train.output)


@dataclass(kw_only=True)
class SweepConfig(Tracking):
    """Trials of (train -> evaluate against the base model) over one pool, on Ray Tune (paper Tables 1-6)."""

    SECTION = "sweep"
    SECTIONS = ("train", "evaluate")  # train.key=value / evaluate.key=value overrides (hgdpo.config.core.load_config)

    name: str = doc("Name of the sweep: its MLflow parent run, and what `hgdpo table --sweep` looks for.")
    pool: str = doc("The pool the trials train on (of the largest N; no trial generates a pool); a named trial may "
                    "give its own `pool` (e.g. an imported public set).")
    output: str = doc("Folder or storage URI of the sweep: trials/<trial>/train and trials/<trial>/eval are "
                      "written inside it.")
    train: dict = doc("Base settings of every trial's training (see the train configuration).", {})
    evaluate: dict = doc("Base settings of every trial's evaluation (see the evaluate configuration); "
                         "`prompts` is required.", {})
    parameters: dict = doc(f"Grid: parameter -> list of values; every combination is a trial. Parameters: "
                           f"{', '.join(PARAMETERS[:-1])} (`lan: true`: A samples with LAN).", {})
    trials: list[dict] = doc("Explicit trials, each a mapping of parameters (and an optional `name`; a named trial "
                             "may also give its own `pool`); crossed with `parameters` when both are given.", [])
    duels: list[list[str]] = doc("Head-to-head comparisons, each [A trial, B trial] by name; default: every trial "
                                 "against the one before it, and the last against the first.", [])
    model: str = doc("Base model of the pool, the training and the evaluation's A and B.", "embedded")
    model_config: str | None = doc("For a single-file checkpoint: a diffusers folder or hub id with the configs.", None)
    max_concurrent_trials: int | None = doc("Trials running at once; default: as many as fit in the cluster's CPUs "
                                            "and GPUs at each trial's peak (training or evaluation).", None)
    mlflow_experiment: str = doc("MLflow experiment of the sweep's parent run and its trial runs.", "hgdpo-sweep")

    def __post_init__(self) -> None:
        s = self.SECTION
        for field in ("name", "pool", "output"):
            if not getattr(self, field):
                raise ConfigError(f"{s}.{field}: required")
        check_locations(self, "pool", "output")
        if not NAME.match(self.name):
            raise ConfigError(f"{s}.name: {self.name!r} must start with a letter or digit and hold only "
                              f"letters, digits and . _ + = , -")
        for section, wired in WIRED.items():
            for key in wired:
                if key in getattr(self, section):
                    raise ConfigError(f"{s}.{section}.{key}: set by the sweep itself (see sweep.pool, sweep.output, "
                                      f"sweep.model, sweep.mlflow_uri); remove it")
        for key, values in self.parameters.items():
            self._check_name(key, f"{s}.parameters.{key}")
            if key == "pool":
                raise ConfigError(f"{s}.parameters.pool: a trial's own pool goes in `trials:`, in a trial with a "
                                  f"`name`; it is not a grid parameter")
            if not isinstance(values, list):
                raise ConfigError(f"{s}.parameters.{key}: must be a list of values (got {values!r})")
            if not values:
                raise ConfigError(f"{s}.parameters.{key}: empty list of values; give at least one")
        for i, trial in enumerate(self.trials):
            if not isinstance(trial, dict):
                raise ConfigError(f"{s}.trials[{i}]: must be a mapping of parameters (got {trial!r})")
            for key in trial:
                if key != "name":
                    self._check_name(key, f"{s}.trials[{i}].{key}")
            if "name" in trial and not (isinstance(trial["name"], str) and NAME.match(trial["name"])):
                raise ConfigError(f"{s}.trials[{i}].name: {trial['name']!r} must start with a letter or digit and "
                                  f"hold only letters, digits and . _ + = , -")
        if not self.parameters and not self.trials:
            raise ConfigError(f"{s}.parameters: nothing to sweep; give `parameters` (a grid) or `trials` (a list)")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError(f"{s}.max_concurrent_trials: must be at least 1 (got {self.max_concurrent_trials})")
        names = {t.name for t in self.expand()}  # every trial's own checks, now
        for i, duel in enumerate(self.duels):
            if not (isinstance(duel, list) and len(duel) == 2 and duel[0] != duel[1]):
                raise ConfigError(f"{s}.duels[{i}]: must be [A trial, B trial], two different names (got {duel!r})")
            unknown = [n for n in duel if n not in names]
            if unknown:
                raise ConfigError(f"{s}.duels[{i}]: no trial named {unknown[0]!r}; trials: {', '.join(sorted(names))}")

    @staticmethod
    def _check_name(key: str, where: str) -> None:
        if key not in PARAMETERS:
            close = difflib.get_close_matches(str(key), PARAMETERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown parameter{hint}; known: {', '.join(PARAMETERS)}")

    def combinations(self) -> list[tuple[str | None, dict[str, Any]]]:
        """(explicit name or None, values) of every trial, in order: listed trials x the grid."""
        keys = list(self.parameters)
        grid = [dict(zip(keys, combo)) for combo in itertools.product(*(self.parameters[k] for k in keys))]
        listed = [(t.get("name"), {k: v for k, v in t.items() if k != "name"}) for t in self.trials] or [(None, {})]
        out = []
        for name, values in listed:
            for point in grid:
                full = name
                if name is not None and point:
                    full = f"{name},{','.join(f'{k}={value_text(v)}' for k, v in point.items())}"
                out.append((full, {**values, **point}))
        return out

    def expand(self) -> list[Trial]:
        """Every trial with its train and evaluate configs (paths absolute, MLflow wired), checked."""
        s = self.SECTION
        output = absolute_location(self.output)
        model = {"model": absolute(self.model), "model_config": absolute(self.model_config)}
        mlflow = {"mlflow_uri": tracking.tracking_uri(self.mlflow_uri), "mlflow_experiment": self.mlflow_experiment,
                  "mlflow_allow_local": self.mlflow_allow_local}
        base_eval = {k: (absolute(v) if k in EVAL_PATHS and isinstance(v, str) else v)
                     for k, v in self.evaluate.items()}
        trials, seen = [], {}
        for index, (explicit, values) in enumerate(self.combinations()):
            name = explicit or (",".join(f"{k}={value_text(v)}" for k, v in values.items()) or f"trial-{index}")
            if name in seen:
                raise ConfigError(f"{s}: trials {seen[name]} and {index} are both named {name!r}; "
                                  f"give distinct values or names")
            seen[name] = index
            if "pool" in values and explicit is None:
                raise ConfigError(f"{s}: trial {index} trains on its own pool ({values['pool']}); give it a `name`")
            folder = join(output, "trials", name)
            train = {**self.train, **{k: v for k, v in values.items() if k in TRAIN_PARAMETERS}}
            evaluate = {**base_eval, **{k: v for k, v in values.items() if k in EVAL_PARAMETERS}}
            try:
                # pairs_folder: trials of the same selection share one pair dataset, <output>/pairs-<key>.
                train_cfg = from_dict(TrainConfig, {"pairs_folder": output, **train, **model, **mlflow,
                                                    "pool": absolute(values.get("pool", self.pool)),
                                                    "output": join(folder, "train")})
                eval_cfg = from_dict(EvalConfig, {**evaluate, **model, **mlflow, "output": join(folder, "eval"),
                                                  "adapter": join(folder, "train", "adapter")})
            except ConfigError as err:  # "train.beta: ..." -> "sweep trial 'beta=-1': train.beta: ..."
                raise ConfigError(f"{s} trial {name!r}: {err}") from None
            trials.append(Trial(index, name, values, train_cfg, eval_cfg))
        return trials
