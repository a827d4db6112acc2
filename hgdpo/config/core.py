"""Typed configuration: dataclasses loaded from YAML, overridden from the command line.

Each stage has one dataclass (see ``hgdpo.pool.config``); this module holds the small
machinery they share:

* ``load_config(PoolConfig, "pool.yaml", ["images_per_prompt=8", "output=/tmp/p"])`` reads
  the YAML, applies ``key=value`` overrides (values parsed as YAML, so ``steps=20`` is an
  int and ``keep=pair`` a string), rejects unknown keys, checks every value against the
  field's annotation, and lets the dataclass's ``__post_init__`` check cross-field rules.
* Every error is a :class:`ConfigError` naming the field (``pool.loser_rank: ...``).
* ``to_dict`` gives plain data, which is what Ray workers receive (they rebuild the typed
  config with ``from_dict`` on their first line).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from hgdpo.errors import ConfigError, HgdpoError
from hgdpo.infra import locations

C = TypeVar("C")

# Where a job records its run: not part of what it produces, so a rerun may change them.
TRACKING_FIELDS = ("mlflow_uri", "mlflow_experiment", "mlflow_allow_local")
ALLOW_LOCAL_DOC = ("Keep a local MLflow store (sqlite file or folder) even on a Ray cluster of several nodes, "
                   "where only this node reaches it. Off: such a job is refused.")


def doc(text: str, default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A dataclass field with its documentation (shown by ``--help`` and in docs/settings.md)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"doc": text}, **kwargs)
    return dataclasses.field(default=default, metadata={"doc": text}, **kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: must be one of {_type_name(tp)} (got {value!r})")
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: must be {_type_name(tp)} (got {value!r})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: must be null (got {value!r})")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be a list (got {value!r})")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: must be true or false (got {value!r})")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}: must be a mapping of settings (got {value!r})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: must be an integer (got {value!r})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: must be a number (got {value!r})")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `seed_tag=7` on the command line means the string "7"
        raise ConfigError(f"{where}: must be a string (got {value!r})")
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def from_dict(cls: type[C], data: dict[str, Any], source: str = "") -> C:
    """Build config ``cls`` from plain data, rejecting unknown keys and ill-typed values."""
    section = getattr(cls, "SECTION", cls.__name__)
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{section}: expected a mapping of settings, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    retired = getattr(cls, "RETIRED", {})
    if unknown and unknown[0] in retired:
        raise ConfigError(f"{where}{section}.{unknown[0]}: no longer a setting: {retired[unknown[0]]}")
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}{section}.{key}: unknown setting{hint}; known: {', '.join(fields)}")
    missing = [f.name for f in fields.values() if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}{section}.{missing[0]}: required ({fields[missing[0]].metadata.get('doc', '')})")
    kwargs = {k: _coerce(v, hints[k], f"{where}{section}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["steps=20", "keep=pair"]`` -> ``{"steps": 20, "keep": "pair"}`` (values as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            out[key.replace("-", "_")] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key.replace("-", "_")] = raw
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of settings in YAML file ``path`` (empty file: no settings)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return loaded


def nest_overrides(flat: dict[str, Any], sections: Sequence[str]) -> dict[str, Any]:
    """``{"pool.steps": 10, "output": "x"}`` -> ``{"pool": {"steps": 10}, "output": "x"}`` for a config whose
    ``sections`` (settings of other stages it holds, e.g. a run's pool, train and evaluate) include ``pool``."""
    if not sections:
        return dict(flat)
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, dot, name = key.partition(".")
        if dot:
            if section not in sections:
                raise ConfigError(f"override {key}: unknown section {section!r}; known: {', '.join(sections)}")
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any], sections: Sequence[str]) -> dict[str, Any]:
    """``base`` with ``extra`` on top; ``sections`` are merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if key in sections and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read ``path`` (YAML; optional) and apply ``key=value`` overrides (``section.key=value`` for the
    ``SECTIONS`` a config holds), then validate."""
    sections = getattr(cls, "SECTIONS", ())
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    data = merge(data, nest_overrides(parse_overrides(overrides or []), sections), sections)
    return from_dict(cls, data, str(path) if path is not None else "")


def reference_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` in the order its reference lists them: the sections marked ``TRAILING``
    (actor resources, tracking: ``hgdpo.config.sections``) after the stage's own settings."""

    def trailing(f: dataclasses.Field) -> bool:
        first = next(c for c in reversed(cls.__mro__) if f.name in getattr(c, "__dataclass_fields__", {}))
        return vars(first).get("TRAILING", False)

    return sorted(dataclasses.fields(cls), key=trailing)


def describe(cls: type) -> str:
    """The configuration reference of ``cls`` as text: name, type, default, doc."""
    lines = []
    for f in reference_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"
        )
        tp = _type_name(typing.get_type_hints(cls)[f.name])
        lines.append(f"  {f.name} ({tp}, default {default!r})\n      {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def markdown_table(cls: type) -> str:
    """The configuration reference of ``cls`` as a Markdown table (used for docs/settings.md)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in reference_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"
        )
        tp = _type_name(typing.get_type_hints(cls)[f.name]).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {tp} | `{default!r}` | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)


def check_sampling(cfg: Any) -> None:
    """Checks shared by every config that samples images: steps, size, guidance, prompt limit."""
    s = cfg.SECTION
    if cfg.steps < 1:
        raise ConfigError(f"{s}.steps: must be at least 1 (got {cfg.steps})")
    for name in ("width", "height"):
        value = getattr(cfg, name)
        if value is not None and (value < 8 or value % 8):
            raise ConfigError(f"{s}.{name}: must be a positive multiple of 8 (got {value})")
    if cfg.max_prompts is not None and cfg.max_prompts < 1:
        raise ConfigError(f"{s}.max_prompts: must be at least 1 (got {cfg.max_prompts})")
    if cfg.guidance_scale < 0:
        raise ConfigError(f"{s}.guidance_scale: must be >= 0 (got {cfg.guidance_scale})")


def check_actors(cfg: Any, *roles: str) -> None:
    """``<role>_actors`` at least 1, ``<role>_gpus`` a fraction or a whole number, ``<role>_cpus`` positive."""
    s = cfg.SECTION
    for role in roles:
        actors, gpus, cpus = (getattr(cfg, f"{role}_{k}") for k in ("actors", "gpus", "cpus"))
        if actors < 1:
            raise ConfigError(f"{s}.{role}_actors: must be at least 1 (got {actors})")
        if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
            raise ConfigError(f"{s}.{role}_gpus: must be a fraction in [0, 1] or a whole number (got {gpus})")
        if cpus <= 0:
            raise ConfigError(f"{s}.{role}_cpus: must be positive (got {cpus})")


def check_locations(cfg: Any, *names: str) -> None:
    """Storage locations (outputs, pools, adapters) and the tracking URI must not carry credentials
    (``hgdpo.infra.locations.check_uri``, ``hgdpo.infra.locations.check_tracking_uri``)."""
    try:
        for name in names:
            value = getattr(cfg, name)
            if isinstance(value, str):
                locations.check_uri(value, f"{cfg.SECTION}.{name}")
        locations.check_tracking_uri(getattr(cfg, "mlflow_uri", None), f"{cfg.SECTION}.mlflow_uri")
    except HgdpoError as err:
        raise ConfigError(str(err)) from None


def changed_settings(stored: dict[str, Any], current: dict[str, Any], cls: type | None = None) -> list[str]:
    """The settings whose values differ between a stored config and the current one (tracking settings
    aside), sorted: what makes a finished output another job's. With the config class ``cls``, a setting
    the stored config lacks (added to hgdpo after the output was written) is unchanged at its default,
    which always does what hgdpo did before the setting existed."""
    keys = (set(stored) | set(current)) - set(TRACKING_FIELDS)
    added = {k: v for k, v in defaults(cls).items() if k not in stored} if cls is not None else {}
    return sorted(k for k in keys if stored.get(k) != current.get(k)
                  and not (k in added and current.get(k) == added[k]))


def defaults(cls: type) -> dict[str, Any]:
    """The default of every setting of ``cls`` that has one."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out
