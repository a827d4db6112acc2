"""The objectives by name. Adding one is its file in this package and its line in ``OBJECTIVES``."""

from __future__ import annotations

from hgdpo.objectives.base import Objective
from hgdpo.objectives.dpo import DPO
from hgdpo.objectives.focus import Focus
from hgdpo.objectives.hgdpo import HGDPO
from hgdpo.objectives.kto import KTO
from hgdpo.objectives.ospo import OSPO
from hgdpo.objectives.sft import SFT

OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (HGDPO, DPO, SFT, Focus, OSPO, KTO)}


def settings_classes() -> tuple[type, ...]:
    """The objectives' own settings, in registry order: the train config's mixins."""
    return tuple(o.Settings for o in OBJECTIVES.values() if o.Settings is not None)


def by_selection(selection: str) -> type[Objective]:
    """The objective whose pair rule is ``selection`` (a pair dataset's ``rule``)."""
    for o in OBJECTIVES.values():
        if o.selection == selection:
            return o
    raise KeyError(selection)


def owner(field: str) -> str | None:
    """The objective whose own setting ``field`` is, or None for a setting every objective shares."""
    for o in OBJECTIVES.values():
        if any(f.name == field for f in o.own_fields()):
            return o.name
    return None
