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


def doc(text: str, default: Any = dataclasses.MISSING, *, minimum: float | None = None,
        maximum: float | None = None, above: float | None = None, below: float | None = None,
        resume: bool | str = False, sweep: bool = False, path: bool = False, **kwargs) -> Any:
    """A dataclass field with its documentation (shown by ``--help`` and in docs/settings.md) and its rules, each
    declared here once and read by whoever needs it:

    * ``minimum``/``maximum`` (inclusive), ``above``/``below`` (exclusive): bounds that ``check_fields`` holds
      a value to (None passes: an unset optional setting); a bound may name another setting (``maximum=
      "pool_size"``), which bounds it once set;
    * ``resume``: the setting changes what the stage produces, so an output made under another value is
      another job's (a training's fingerprint, ``resume_fields``); ``"if-set"`` for a setting added after
      outputs were made without it, which counts only once it leaves its default (the default does what
      hgdpo did before the setting existed);
    * ``sweep``: a sweep's trials may vary it (``sweep_fields``);
    * ``path``: it may name a local file or folder, which a job run elsewhere (a Tune trial) needs absolute.
    """
    rules = {"minimum": minimum, "maximum": maximum, "above": above, "below": below, "resume": resume,
             "sweep": sweep, "path": path}
    metadata = {"doc": text, **{k: v for k, v in rules.items() if v is not None and v is not False}}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


BOUNDS = ("minimum", "maximum", "above", "below")


def field_bounds(m: Any, cfg: Any = None) -> dict[str, tuple[float, str]]:
    """A field's declared bounds as (value, how a message names it); a bound naming another setting
    (``maximum="pool_size"``) is that setting's value in ``cfg``, and no bound while it is unset."""
    out = {}
    for key in BOUNDS:
        bound = m.get(key)
        if isinstance(bound, str):
            value = getattr(cfg, bound) if cfg is not None else None
            if cfg is None or value is not None:
                out[key] = (value, f"{bound}={value}" if cfg is not None else bound)
        elif bound is not None:
            out[key] = (bound, f"{bound:g}")
    return out


def bounds_text(b: dict[str, tuple[float, str]]) -> str | None:
    """Bounds as an error message states them: ``at least 1``, ``positive``, ``between 2 and pool_size=4``."""
    low, high = b.get("minimum", b.get("above")), b.get("maximum", b.get("below"))
    if low is not None and high is not None:
        return f"between {low[1]} and {high[1]}"
    if "minimum" in b:
        return ">= 0" if low[0] == 0 else f"at least {low[1]}"
    if "above" in b:
        return "positive" if low[0] == 0 else f"above {low[1]}"
    if high is not None:
        return f"at most {high[1]}" if "maximum" in b else f"below {high[1]}"
    return None


def _in_bounds(value: float, b: dict[str, tuple[float, str]]) -> bool:
    return not (("minimum" in b and value < b["minimum"][0]) or ("maximum" in b and value > b["maximum"][0])
                or ("above" in b and value <= b["above"][0]) or ("below" in b and value >= b["below"][0]))


def check_fields(cfg: Any) -> None:
    """Hold every setting of ``cfg`` to the bounds its field declares (``doc``): a ConfigError naming it."""
    for f in dataclasses.fields(cfg):
        value, bounds = getattr(cfg, f.name), field_bounds(f.metadata, cfg)
        if bounds and isinstance(value, (int, float)) and not _in_bounds(value, bounds):
            raise ConfigError(f"{cfg.SECTION}.{f.name}: must be {bounds_text(bounds)} (got {value})")


def rule_fields(cls: type, rule: str) -> tuple[str, ...]:
    """The names of the settings of ``cls`` that declare ``rule`` (``resume``, ``sweep``, ``path``), in order."""
    return tuple(f.name for f in reference_fields(cls) if f.metadata.get(rule))


def output_settings(cfg: Any) -> dict[str, Any]:
    """The settings of ``cfg`` that change what its stage writes (declared ``resume``), which the output is stamped
    with; one declared ``resume="if-set"`` only off its default, so outputs made before it existed still match."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.metadata.get("resume") is True
            or (f.metadata.get("resume") == "if-set" and getattr(cfg, f.name) != defaults_of(f))}


def if_set_defaults(cls: type) -> dict[str, Any]:
    """The default of every setting of ``cls`` declared ``resume="if-set"`` (what an older output had)."""
    return {f.name: defaults_of(f) for f in dataclasses.fields(cls) if f.metadata.get("resume") == "if-set"}


def defaults_of(f: dataclasses.Field) -> Any:
    """The default of field ``f`` (a fresh one of a list or mapping; MISSING when it is required)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {type_name(inner)}"
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
        raise ConfigError(f"{where}: must be one of {type_name(tp)} (got {value!r})")
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: must be {type_name(tp)} (got {value!r})")
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


def refuse_wired(settings: dict[str, Any], wired: Sequence[str], where: str, job: str, see: str) -> None:
    """Refuse a setting in a composing job's section ``where`` (``run.train``) that the job sets itself."""
    for key in wired:
        if key in settings:
            raise ConfigError(f"{where}.{key}: set by the {job} itself (see {see}); remove it")


def wire(cls: type[C], settings: dict[str, Any], wired: dict[str, Any], base: dict[str, Any] | None = None,
         where: str = "") -> C:
    """Stage config ``cls`` as a job that composes stages (run, sweep, replicate) makes it: its defaults ``base``
    (which the user's ``settings`` may change), then ``settings``, then the values the job sets itself (``wired``,
    which ``refuse_wired`` keeps out of ``settings``); checked by the stage's own rules, an error prefixed with
    ``where`` (``"run."``: ``run.pool.steps: ...``)."""
    try:
        return from_dict(cls, {**(base or {}), **settings, **wired})
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None


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


def check_image_size(cfg: Any) -> None:
    """``width`` and ``height``, where set, positive multiples of 8 (the VAE's downsampling)."""
    for name in ("width", "height"):
        value = getattr(cfg, name)
        if value is not None and (value < 8 or value % 8):
            raise ConfigError(f"{cfg.SECTION}.{name}: must be a positive multiple of 8 (got {value})")


def check_actors(cfg: Any, *roles: str) -> None:
    """``<role>_gpus`` a fraction or a whole number (the counts and CPUs are bounded by their fields)."""
    for role in roles:
        gpus = getattr(cfg, f"{role}_gpus")
        if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
            raise ConfigError(f"{cfg.SECTION}.{role}_gpus: must be a fraction in [0, 1] or a whole number (got {gpus})")


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
