"""A complete series' priority, by the ``[[priorities]]`` rules (:mod:`config.rules`).

Read when its job is queued: the calling AE title from the job store, the
attributes the rules name from the series' first instance (its header only,
those attributes only). A rule naming an attribute the instance lacks does not
match; an instance that cannot be read matches no attribute rule. The patient's
data is never logged: only which rule matched.
"""

from __future__ import annotations

import fnmatch
import logging

import pydicom

from config import Priority, PriorityRule

log = logging.getLogger(__name__)


def _text(value) -> str:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def priority_of(rules: tuple[PriorityRule, ...], calling_aet: str,
                first_path: str | None) -> Priority:
    """The priority of the first rule that matches (``normal`` when none does)."""
    wanted = sorted({r.attribute for r in rules if r.attribute})
    header = None
    if wanted and first_path:
        try:
            header = pydicom.dcmread(first_path, stop_before_pixels=True, specific_tags=wanted)
        except Exception as exc:         # unreadable: no attribute rule matches
            log.debug("priority: %s not read: %s", first_path, exc)
    for number, rule in enumerate(rules, 1):
        if rule.calling_aet and rule.calling_aet.strip() != calling_aet.strip():
            continue
        if rule.attribute:
            value = header.get(rule.attribute) if header is not None else None
            if value is None or not fnmatch.fnmatchcase(_text(value).strip().upper(),
                                                        rule.value.strip().upper()):
                continue
        log.debug("priority %s by rule %d", rule.priority, number)
        return rule.priority
    return Priority.normal
