"""The configuration reference: a config class's settings with their types, defaults, rules and documentation, as
``hgdpo STAGE --help`` prints them and as docs/settings.md lists them (``tests/test_readme.py`` keeps it current)."""

from __future__ import annotations

import dataclasses
import typing

from hgdpo.config.core import bounds_text, field_bounds, reference_fields, type_name


def rules_text(f: dataclasses.Field) -> str:
    """A field's declared rules as docs/settings.md lists them: ``>= 1; resume; sweep``."""
    m = f.metadata
    parts = []
    bounds = bounds_text(field_bounds(m))
    if bounds is not None:
        parts.append(bounds)
    if m.get("resume"):
        parts.append("resume" + (" (if set)" if m["resume"] == "if-set" else ""))
    parts += [r for r in ("sweep", "path") if m.get(r)]
    return "; ".join(parts)


def describe(cls: type) -> str:
    """The configuration reference of ``cls`` as text: name, type, default, doc."""
    lines = []
    for f in reference_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"
        )
        tp = type_name(typing.get_type_hints(cls)[f.name])
        rules = f"; {rules_text(f)}" if rules_text(f) else ""
        lines.append(f"  {f.name} ({tp}, default {default!r}{rules})\n      {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def markdown_table(cls: type) -> str:
    """The configuration reference of ``cls`` as a Markdown table (used for docs/settings.md)."""
    rows = ["| key | type | default | rules | meaning |", "|---|---|---|---|---|"]
    for f in reference_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"
        )
        tp = type_name(typing.get_type_hints(cls)[f.name]).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {tp} | `{default!r}` | {rules_text(f)} | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)
