"""Priority rules: which jobs are urgent, which wait for the night.

``[[priorities]]`` tables, tried in order; the first that matches a complete
series gives its job's priority, and none gives ``normal``. A rule matches on
the calling AE title, on a DICOM attribute of the series' first instance (a
keyword and a shell-style pattern, e.g. ``StudyDescription`` and ``*STAT*`` or
``*RESEARCH*``; case does not count; only attributes of the data set itself, not
inside a sequence), or on both::

    [[priorities]]
    priority = "urgent"
    calling_aet = "ER-CT"

    [[priorities]]
    priority = "offpeak"
    attribute = "StudyDescription"
    value = "*RESEARCH*"

Urgent jobs are claimed before normal ones, normal before offpeak; offpeak jobs
are claimed only within ``[worker] offpeak_hours``.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Any

from config.values import ConfigError, build_section, check_table


class Priority(enum.StrEnum):
    """A job's priority; ``rank`` orders the queue (lower first)."""

    urgent = "urgent"
    normal = "normal"
    offpeak = "offpeak"

    @property
    def rank(self) -> int:
        return list(Priority).index(self)

    @classmethod
    def of_rank(cls, rank: int) -> "Priority":
        return list(Priority)[max(0, min(rank, len(Priority) - 1))]


@dataclass(frozen=True)
class PriorityRule:
    """One ``[[priorities]]`` table."""

    priority: Priority
    calling_aet: str = ""
    attribute: str = ""
    value: str = ""


def priority_rule(where: str, raw: Any) -> PriorityRule:
    from pydicom.datadict import tag_for_keyword

    check_table(where, raw, PriorityRule)
    if "priority" not in raw:
        raise ConfigError(f"{where}.priority: expected one of {', '.join(Priority)}")
    rule = build_section(PriorityRule, raw, where, {})
    if not rule.calling_aet and not rule.attribute:
        raise ConfigError(f"{where}: a rule needs calling_aet, attribute (with value), or both")
    if rule.attribute and tag_for_keyword(rule.attribute) is None:
        raise ConfigError(f"{where}.attribute: {rule.attribute!r} is not a DICOM keyword")
    if bool(rule.attribute) != bool(rule.value):
        raise ConfigError(f"{where}: attribute and value go together")
    return rule


def offpeak_hours(where: str, text: str) -> tuple[dt.time, dt.time]:
    """``"20:00-06:00"`` as its start and end (a window may run past midnight)."""
    try:
        start, end = (dt.time.fromisoformat(part.strip()) for part in text.split("-"))
    except ValueError:
        raise ConfigError(f"{where}: expected HH:MM-HH:MM (e.g. 20:00-06:00), got "
                          f"{text!r}") from None
    if start == end:
        raise ConfigError(f"{where}: an empty window ({text})")
    return start, end
