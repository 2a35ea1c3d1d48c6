"""The job store: instances, series states, jobs, deliveries; survives reopening.

Every test runs on SQLite (the default) and on a private PostgreSQL server.
"""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from store.api import JobStore, ReceivedInstance
from store.models import DeliveryState, JobState, SeriesState, utcnow


def _item(n: int, series: str = "1.2.3", expected: int | None = None) -> ReceivedInstance:
    return ReceivedInstance(sop_instance_uid=f"{series}.{n}",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            series_instance_uid=series, study_instance_uid="1.2",
                            modality="CT", path=f"/data/{series}/{n}.dcm", size=100,
                            transfer_syntax_uid="1.2.840.10008.1.2.1", calling_aet="CT1",
                            images_in_acquisition=expected)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return JobStore(f"sqlite:///{tmp_path}/db/lungsys.db")
    return JobStore(request.getfixturevalue("postgres").new_database())


def test_instances_are_stored_once_and_grouped_by_series(store):
    assert store.record_instance(_item(1))
    assert store.record_instance(_item(2))
    assert not store.record_instance(_item(1))             # duplicate SOP Instance UID
    [series] = store.series()
    assert series.instance_count == 2 and series.state == SeriesState.receiving
    assert len(store.instance_paths(series.id)) == 2
    reopened = JobStore(store.url)
    assert reopened.counts()["instances"] == 2
    if store.engine.dialect.name == "sqlite":
        with reopened.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_concurrent_senders_lose_nothing(store):
    """8 associations storing into the same new series at once (and re-sending
    each other's instances): every instance once, the count exact."""
    errors = []

    def sender(k: int) -> None:
        try:
            for n in range(30):
                store.record_instance(_item((k * 30 + n) % 120, "9.9"))
        except Exception as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    [series] = store.series()
    assert series.instance_count == 120 == store.counts()["instances"]


def test_completion_by_stable_time_or_images_in_acquisition(store):
    store.record_instance(_item(1, "A"))
    store.record_instance(_item(1, "B", expected=2))
    assert store.complete_ready(stable_seconds=60) == []
    store.record_instance(_item(2, "B", expected=2))
    assert [s.series_instance_uid for s in store.complete_ready(60)] == ["B"]
    later = utcnow() + dt.timedelta(seconds=61)
    assert [s.series_instance_uid for s in store.complete_ready(60, now=later)] == ["A"]


def test_job_lifecycle_and_reopening(store):
    store.record_instance(_item(1))
    [series] = store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1))
    job = store.queue_job(series.id)
    claimed = store.claim_job()
    assert claimed.id == job.id and claimed.attempts == 1 and claimed.state == JobState.running
    assert store.claim_job() is None
    assert store.requeue_interrupted() == 1                  # as after a crash
    claimed = store.claim_job()
    assert claimed.attempts == 2
    store.finish_job(claimed.id, diagnosis="COVID-19", probabilities={"COVID-19": 0.9},
                     infected_fraction=0.1, timings={"total": 1.0}, model_version="v",
                     device_uid="2.25.1",
                     results=[{"kind": "sr", "sop_instance_uid": "9.1", "sop_class_uid": "x",
                               "series_instance_uid": "9", "path": "/r/sr.dcm"}])
    [series] = store.series()
    assert series.state == SeriesState.done and series.version == 1
    [done] = store.jobs("done")
    assert done.diagnosis == "COVID-19" and done.results[0].kind == "sr"
    assert not store.record_instance(_item(1))               # sent again: nothing changes
    [series] = store.series()
    assert (series.state, series.version, series.instance_count) == (SeriesState.done, 1, 1)
    store.record_instance(_item(2))                          # a late instance reopens it
    [series] = store.series()
    assert series.state == SeriesState.receiving and series.version == 2
    store.skip_series(series.id, "only 2 slices")
    assert store.series("skipped")[0].reason == "only 2 slices"


def test_failed_job_retry_and_deliveries(store):
    store.record_instance(_item(1))
    [series] = store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1))
    job = store.queue_job(series.id)
    store.claim_job()
    store.fail_job(job.id, "out of memory")
    assert store.series()[0].reason == "out of memory"
    store.retry_job(job.id)
    assert store.jobs("queued")[0].id == job.id
    with pytest.raises(LookupError):
        store.retry_job(999)
    store.create_deliveries(job.id, [("pacs", "dimse")])
    [d] = store.due_deliveries()
    later = utcnow() + dt.timedelta(minutes=5)
    store.record_attempt(d.id, ok=False, error="connection refused", retry_at=later)
    assert store.due_deliveries() == []
    [d] = store.due_deliveries(now=later + dt.timedelta(seconds=1))
    assert d.attempts == 1 and d.last_error == "connection refused"
    store.record_attempt(d.id, ok=True)
    job = store.jobs()[0]
    assert job.deliveries[0].state == DeliveryState.done
    store.retry_delivery(d.id)
    assert store.due_deliveries()[0].id == d.id


def test_an_admin_reading_never_holds_up_the_receiver(store):
    """A long read (an admin paging through jobs) is open while an instance
    arrives: the instance is recorded at once, not after the read."""
    import time

    from sqlalchemy import select

    from store.models import Series

    store.record_instance(_item(1))
    with store.read_session() as s:
        assert len(s.scalars(select(Series)).all()) == 1      # the read transaction is open
        start = time.monotonic()
        assert store.record_instance(_item(2))
        assert time.monotonic() - start < 2.0                  # SQLite would wait 10 s, then fail
        assert [x.instance_count for x in store.series()] == [2]


def test_nodes_sharing_a_job_store_keep_to_their_own_series(store):
    """Two nodes, each with its own data folder, on one job store: a node runs only the
    jobs of the series it received, and a restart requeues only its own."""
    from dataclasses import replace

    store.record_instance(replace(_item(1, "1.2.10"), node="host-a:1"))
    store.record_instance(replace(_item(1, "1.2.20"), node="host-b:2"))
    soon = utcnow() + dt.timedelta(seconds=1)
    [a] = store.complete_ready(0, now=soon, node="host-a:1")  # A judges only its own
    assert a.series_instance_uid == "1.2.10"
    [b] = store.complete_ready(0, now=soon, node="host-b:2")
    for series in (a, b):
        store.queue_job(series.id)
    claimed_by_a = store.claim_job("host-a:1")
    assert claimed_by_a.series.series_instance_uid == "1.2.10"
    assert claimed_by_a.node == "host-a:1"
    assert store.claim_job("host-a:1") is None               # B's job is not A's to run
    claimed_by_b = store.claim_job("host-b:2")
    assert claimed_by_b.series.series_instance_uid == "1.2.20"
    assert store.requeue_interrupted("host-b:2") == 1        # B restarts: only its own job
    assert {j.id: j.state for j in store.jobs()} == {claimed_by_a.id: JobState.running,
                                                      claimed_by_b.id: JobState.queued}
    store.fail_job(claimed_by_a.id, "gave up")               # A's series is finished
    later = utcnow() + dt.timedelta(days=1)
    assert [s.series_instance_uid for s in store.expired_series(later, "host-a:1")] == [
        "1.2.10"]
    assert store.expired_series(later, "host-b:2") == []     # retention keeps to its own
    store.create_deliveries(claimed_by_a.id, [("pacs", "dimse")])  # A delivers A's results
    assert [d.job_id for d in store.due_deliveries(node="host-a:1")] == [claimed_by_a.id]
    assert store.due_deliveries(node="host-b:2") == []
    store.queue_notifications(claimed_by_a.id, "job_failed", [("ris", {"job": 1})])
    assert len(store.due_notifications(node="host-a:1")) == 1
    assert store.due_notifications(node="host-b:2") == []


def _finish(store, job_id: int) -> None:
    store.finish_job(job_id, diagnosis="CAP", probabilities={"CAP": 0.8}, infected_fraction=0.1,
                     timings={"total": 1.0}, model_version="v", device_uid="2.25.1", results=[])


def test_a_rerun_is_a_new_version_and_retrying_an_older_job_leaves_the_series_alone(store):
    store.record_instance(_item(1))
    [series] = store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1))
    first = store.queue_job(series.id)
    store.claim_job()
    with pytest.raises(ValueError, match="running"):           # not while it runs
        store.rerun_job(first.id, method="nonparametric")
    _finish(store, first.id)
    rerun = store.rerun_job(first.id, method="nonparametric")
    assert (rerun.version, rerun.method, rerun.checkpoint) == (2, "nonparametric", "")
    with pytest.raises(ValueError, match="queued"):             # one re-run at a time
        store.rerun_job(first.id)
    assert store.claim_job().id == rerun.id
    _finish(store, rerun.id)
    [series] = store.series()
    assert (series.state, series.version) == (SeriesState.done, 2)
    store.retry_job(first.id)                                   # the older version again
    assert store.series()[0].state == SeriesState.done
    assert store.claim_job().id == first.id
    assert store.series()[0].state == SeriesState.done
    _finish(store, first.id)
    assert store.series()[0].state == SeriesState.done
    assert store.rerun_job(first.id).version == 3               # the series is free again
    with pytest.raises(LookupError):
        store.rerun_job(999)


def test_a_restart_or_a_dead_local_worker_leaves_other_workers_jobs_alone(store):
    store.record_instance(_item(1, "1.2.30"))
    store.record_instance(_item(1, "1.2.31"))
    for series in store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1)):
        store.queue_job(series.id)
    remote = store.claim_job("", "gpu-1:77")
    local = store.claim_job("", "node-host:12")
    # the node restarts: its own dead worker's job runs again, the GPU server's does not
    assert store.requeue_interrupted("", gone=lambda w: w == "node-host:12") == 1
    assert {j.id: j.state for j in store.jobs()} == {remote.id: JobState.running,
                                                      local.id: JobState.queued}
    # a dead local worker process abandons only a job it holds
    assert store.abandon_job(remote.id, "died", 3, worker="node-host:99") == JobState.running
    assert store.abandon_job(remote.id, "died", 3, worker="gpu-1:77") == JobState.queued


def test_an_expired_lease_is_taken_back_once_and_a_job_claimed_before_leases_is_not(store):
    from sqlalchemy import update

    from store.jobs import LeaseLost
    from store.models import EPOCH, Job

    for n in (40, 41):
        store.record_instance(_item(1, f"1.2.{n}"))
    for series in store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1)):
        store.queue_job(series.id)
    leased = store.claim_job("", "gpu-1:5", lease_seconds=2)
    old = store.claim_job("", "old-node:9")
    with store.session() as s, s.begin():                     # as an upgraded database has it
        s.execute(update(Job).where(Job.id == old.id).values(lease_until=EPOCH))
    assert store.heartbeat("gpu-1:5", leased.id, 2) is True
    later = utcnow() + dt.timedelta(seconds=3)
    assert store.reclaim_expired("", 3, now=later) == [(leased.id, JobState.queued)]
    assert store.reclaim_expired("", 3, now=later) == []       # once
    assert store.heartbeat("gpu-1:5", leased.id, 2) is False   # the worker learns it
    with pytest.raises(LeaseLost):
        store.finish_job(leased.id, diagnosis="CAP", probabilities={}, infected_fraction=0.0,
                         timings={}, model_version="v", device_uid="2.25.1", results=[],
                         worker="gpu-1:5")
    assert {j.id: j.state for j in store.jobs()}[old.id] == JobState.running


def test_an_outcome_recorded_by_a_worker_elsewhere_is_routed_by_its_node_once(store):
    for n in (50, 51, 52):
        store.record_instance(_item(1, f"1.2.{n}"))
    for series in store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1)):
        store.queue_job(series.id)
    done, failed, retried = (store.claim_job("", f"gpu-{n}:1") for n in (1, 2, 3))
    store.fail_job(retried.id, "ValueError", worker="gpu-3:1", to_route=True)
    store.retry_job(retried.id)               # retried before its node told the failure
    store.finish_job(done.id, diagnosis="CAP", probabilities={}, infected_fraction=0.0,
                     timings={}, model_version="v", device_uid="2.25.1", results=[],
                     worker="gpu-1:1", to_route=True)          # deliveries: the node's
    store.fail_job(failed.id, "ValueError", worker="gpu-2:1", to_route=True)
    assert not [d for j in store.jobs() for d in j.deliveries]
    routed = store.route_outcomes("", [("pacs", "dimse"), ("ohif", "dicomweb")])
    assert sorted(routed) == sorted([(done.id, JobState.done), (failed.id, JobState.failed)])
    assert store.route_outcomes("", [("pacs", "dimse")]) == []          # once
    jobs = {j.id: j for j in store.jobs()}
    assert sorted(d.destination for d in jobs[done.id].deliveries) == ["ohif", "pacs"]
    assert not jobs[failed.id].deliveries


def test_a_postgresql_job_store_of_an_older_version_learns_the_new_roles(postgres):
    from sqlalchemy import create_engine, text

    from store.accounts import Role
    from store.api import JobStore

    url = postgres.new_database()
    with create_engine(url).begin() as conn:      # the role type as lungsys 0.x created it
        conn.execute(text("CREATE TYPE role AS ENUM ('sender', 'viewer', 'operator', 'admin')"))
    store = JobStore(url)
    assert store.create_token("gpu-worker", Role.worker).startswith("lsy_")
    assert [t.role for t in store.tokens()] == [Role.worker]


def test_a_job_store_of_an_older_version_gains_the_new_columns_and_keeps_its_jobs(store):
    """A job store an older lungsys wrote (here: without the jobs' caution, which came
    later) is upgraded in place when a newer node opens it: its jobs stay, and a job
    finishes with the new column filled."""
    from sqlalchemy import text

    from store.api import JobStore

    store.record_instance(_item(1))
    [series] = store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1))
    old = store.queue_job(series.id)
    store.claim_job()
    _finish(store, old.id)
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs DROP COLUMN caution"))
    store.engine.dispose()
    newer = JobStore(store.engine.url.render_as_string(hide_password=False))
    [kept] = newer.jobs()
    assert (kept.id, kept.diagnosis, kept.caution) == (old.id, "CAP", "")
    again = newer.rerun_job(old.id)
    newer.claim_job()
    newer.finish_job(again.id, diagnosis="CAP", probabilities={"CAP": 0.8},
                     infected_fraction=0.1, timings={}, model_version="v",
                     device_uid="2.25.1", results=[], caution="this model is untrained")
    assert newer.jobs()[0].caution == "this model is untrained"


def test_instances_beyond_images_in_acquisition_queue_one_job_not_one_each(store):
    """A series of two acquisitions counts each one's images in (0020,1002): complete at
    the first count, then reopened by every later instance, it once queued a job per
    instance (a hostile sender queued 100). Beyond the count it waits for the quiet time,
    and the job still waiting analyses the new version instead of a second job."""
    for n in (1, 2):
        store.record_instance(_item(n, "B", expected=2))
    [series] = store.complete_ready(60)                  # the count: complete at once
    first = store.queue_job(series.id)
    for n in range(3, 13):                               # the second acquisition
        store.record_instance(_item(n, "B", expected=2))
        assert store.complete_ready(60) == []            # not complete at each one
    later = utcnow() + dt.timedelta(seconds=61)
    [series] = store.complete_ready(60, now=later)
    store.queue_job(series.id)
    [job] = store.jobs()
    assert job.id == first.id and job.state == JobState.queued
    assert job.version == series.version == 2
    claimed = store.claim_job()
    assert claimed.id == job.id and store.claim_job() is None


def test_a_waiting_re_run_keeps_its_model_when_new_instances_come(store):
    store.record_instance(_item(1))
    [series] = store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1))
    store.queue_job(series.id)
    done = store.claim_job()
    store.finish_job(done.id, diagnosis="Healthy", probabilities={"Healthy": 0.9},
                     infected_fraction=0.0, timings={"total": 1.0}, model_version="v",
                     device_uid="2.25.1", results=[])
    rerun = store.rerun_job(done.id, checkpoint="/models/other.safetensors", method="ig")
    store.record_instance(_item(2))                      # a late instance reopens it
    [series] = store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1))
    store.queue_job(series.id)
    waiting = [j for j in store.jobs() if j.state == JobState.queued]
    assert [j.id for j in waiting] == [rerun.id]         # the same job, the same link
    assert (waiting[0].checkpoint, waiting[0].method) == ("/models/other.safetensors", "ig")
    assert waiting[0].version == series.version == 3


def test_instances_that_arrive_while_the_series_is_analysed_are_analysed_after(store):
    """A modality that pauses longer than stable_seconds mid-series: its first slices are
    being analysed when the rest comes. The rest was recorded and never analysed (the
    series went to done with the first job); now the series gets a new version."""
    store.record_instance(_item(1))
    [series] = store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1))
    store.queue_job(series.id)
    running = store.claim_job()
    store.record_instance(_item(2))                          # while it runs
    [series] = store.series()
    assert series.state == SeriesState.receiving and series.version == 2
    store.finish_job(running.id, diagnosis="Healthy", probabilities={"Healthy": 0.9},
                     infected_fraction=0.0, timings={"total": 1.0}, model_version="v",
                     device_uid="2.25.1", results=[])
    assert store.series()[0].state == SeriesState.receiving   # not done: 2 is not analysed
    [series] = store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1))
    again = store.queue_job(series.id)
    assert again.id != running.id and again.version == 2
    assert store.claim_job().id == again.id
