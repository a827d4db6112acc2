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

from hgdpo.config.core import check_locations, doc, refuse_wired, rule_fields, wire
from hgdpo.config.sections import Tracking
from hgdpo.errors import ConfigError
from hgdpo.evaluate.config import EvalConfig
from hgdpo.infra import tracking
from hgdpo.infra.storage import absolute as absolute_location
from hgdpo.infra.storage import join, parent
from hgdpo.train.config import TrainConfig

# The parameters a trial may set (declared ``sweep`` with each field), under the names the paper's tables use.
TRAIN_PARAMETERS = rule_fields(TrainConfig, "sweep")
EVAL_PARAMETERS = rule_fields(EvalConfig, "sweep")
# A trial's own pool (e.g. an imported public set for Table 1's rows) instead of the sweep's; a named trial only.
PARAMETERS = TRAIN_PARAMETERS + EVAL_PARAMETERS + ("pool",)

# Settings naming files or models (declared ``path``): made absolute, since Tune runs a trial in its own folder.
TRAIN_PATHS = rule_fields(TrainConfig, "path")
EVAL_PATHS = rule_fields(EvalConfig, "path")
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
        for section in self.SECTIONS:
            wired = self.wiring(join(self.output, "trials", "-"))[section]
            refuse_wired(getattr(self, section), wired, f"{s}.{section}", "sweep",
                         "sweep.pool, sweep.output, sweep.model, sweep.mlflow_uri")
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

    def wiring(self, folder: str, pool: str | None = None) -> dict[str, dict[str, Any]]:
        """What the sweep sets itself in the train and evaluate configs of the trial in ``folder`` (on ``pool``,
        else the sweep's): they wire a trial together."""
        shared = {"model": absolute(self.model), "model_config": absolute(self.model_config),
                  "mlflow_uri": tracking.tracking_uri(self.mlflow_uri), "mlflow_experiment": self.mlflow_experiment,
                  "mlflow_allow_local": self.mlflow_allow_local}
        return {"train": {**shared, "pool": absolute(pool or self.pool), "output": join(folder, "train")},
                "evaluate": {**shared, "output": join(folder, "eval"), "adapter": join(folder, "train", "adapter")}}

    def expand(self) -> list[Trial]:
        """Every trial with its train and evaluate configs (paths absolute, MLflow wired), checked."""
        s = self.SECTION
        output = absolute_location(self.output)
        base_train = {k: (absolute(v) if k in TRAIN_PATHS and isinstance(v, str) else v) for k, v in self.train.items()}
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
            train = {**base_train, **{k: v for k, v in values.items() if k in TRAIN_PARAMETERS}}
            evaluate = {**base_eval, **{k: v for k, v in values.items() if k in EVAL_PARAMETERS}}
            wired, where = self.wiring(folder, values.get("pool")), f"{s} trial {name!r}: "  # "sweep trial 'x': ..."
            # pairs_folder: trials of the same selection share one pair dataset, <output>/pairs-<key>.
            train_cfg = wire(TrainConfig, train, wired["train"], {"pairs_folder": output}, where)
            eval_cfg = wire(EvalConfig, evaluate, wired["evaluate"], where=where)
            trials.append(Trial(index, name, values, train_cfg, eval_cfg))
        return trials
