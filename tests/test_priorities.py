"""Priorities: rules give a complete series' job urgent, normal or offpeak; workers claim
urgent before normal under a full queue, and offpeak only within [worker] offpeak_hours."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from config import ConfigError, Priority, load_config
from store.api import JobStore

from doubles import send_series

RULES = ('[[priorities]]\npriority = "urgent"\ncalling_aet = "ER-CT"\n'
         '[[priorities]]\npriority = "urgent"\nattribute = "RequestedProcedurePriority"\n'
         'value = "stat"\n'
         '[[priorities]]\npriority = "offpeak"\nattribute = "StudyDescription"\n'
         'value = "*RESEARCH*"\n')


def config_for(tmp_path, extra: str = ""):
    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n'
                    f'[store]\nurl = "sqlite:///{tmp_path / "db"}"\n'
                    f'[assembly]\nmin_slices = 20\nstable_seconds = 0.01\n'
                    + extra + RULES)
    return load_config(toml, environ={})


@pytest.mark.parametrize("rule, message", [
    ('priority = "soon"\ncalling_aet = "X"\n', "expected one of urgent, normal, offpeak"),
    ('priority = "urgent"\n', "needs calling_aet, attribute"),
    ('priority = "urgent"\nattribute = "NotAKeyword"\nvalue = "x"\n', "not a DICOM keyword"),
    ('priority = "urgent"\nattribute = "StudyDescription"\n', "attribute and value go together"),
    ('priority = "urgent"\ncalling_aet = "X"\nwhen = "now"\n', "unknown key(s) when"),
])
def test_a_bad_rule_is_refused_naming_it(tmp_path, rule, message):
    toml = tmp_path / "bad.toml"
    toml.write_text("[[priorities]]\n" + rule)
    with pytest.raises(ConfigError, match="priorities\\[0\\]") as caught:
        load_config(toml, environ={})
    assert message in str(caught.value)


def test_offpeak_hours_may_run_past_midnight(tmp_path):
    worker = config_for(tmp_path, '[worker]\noffpeak_hours = "20:00-06:00"\n').worker
    at = dt.datetime(2026, 11, 29)
    assert [worker.offpeak_now(at.replace(hour=h)) for h in (19, 20, 23, 0, 5, 6, 12)] == \
        [False, True, True, True, True, False, False]
    bad = tmp_path / "bad.toml"
    bad.write_text('[worker]\noffpeak_hours = "late"\n')
    with pytest.raises(ConfigError, match="worker.offpeak_hours: expected HH:MM-HH:MM"):
        load_config(bad, environ={})


def test_urgent_before_normal_under_a_full_queue_and_offpeak_held_outside_its_window(
        tmp_path, covid_study):
    from pacs_node.node import Node
    from pacs_node.worker import JobRunner

    now = dt.datetime.now()
    outside = f"{(now + dt.timedelta(hours=2)):%H:%M}-{(now + dt.timedelta(hours=3)):%H:%M}"
    config = config_for(tmp_path, f'[worker]\noffpeak_hours = "{outside}"\n')
    store = JobStore(config.store.url)
    for _ in range(4):                                        # a full queue of normal jobs
        send_series(store, covid_study.files, "CT1", tmp_path)
    send_series(store, covid_study.files, "CT1", tmp_path, StudyDescription="LUNG RESEARCH 7")
    send_series(store, covid_study.files, "CT1", tmp_path, RequestedProcedurePriority="STAT")
    send_series(store, covid_study.files, "ER-CT", tmp_path)        # the emergency room's CT
    time.sleep(0.05)                                          # all quiet: complete
    Node(config, engine=object()).assembly_sweep()            # (not started: its sweep only)
    queued = {j.id: Priority.of_rank(j.priority) for j in store.jobs("queued")}
    assert sorted(queued.values()) == sorted([Priority.normal] * 4 + [Priority.offpeak]
                                             + [Priority.urgent] * 2)
    runner = JobRunner(config, store, engine=None, name="w1")
    claimed = []
    while (job := runner.claim()) is not None:
        claimed.append(job.id)
    assert [queued[i] for i in claimed] == [Priority.urgent] * 2 + [Priority.normal] * 4
    assert claimed[2:] == sorted(claimed[2:])                  # oldest first within normal
    [held] = store.jobs("queued")                              # offpeak waits for its hours
    assert queued[held.id] == Priority.offpeak

    inside = f"{(now - dt.timedelta(hours=1)):%H:%M}-{(now + dt.timedelta(hours=1)):%H:%M}"
    night = JobRunner(config_for(tmp_path, f'[worker]\noffpeak_hours = "{inside}"\n'), store,
                      engine=None, name="w2")
    assert night.claim().id == held.id
