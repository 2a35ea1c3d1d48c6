"""The job lifecycle in the job store: queued, claimed for a lease, finished, failed, retried.

Kept apart from :mod:`store.api` (recording what arrives) as :mod:`store.notices` and
:mod:`store.fleet` are; :class:`~store.api.JobStore` takes these methods in. A job is
claimed with ``FOR UPDATE SKIP LOCKED`` so that workers on several machines never take
the same one, and only the worker that still holds a job may record its outcome
(:class:`LeaseLost` otherwise): a job taken over after its lease expired is recorded once.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import TYPE_CHECKING, Callable, Iterable

from sqlalchemy import select

from store.console import MAX_LOG_CHARS
from store.models import (Delivery, Job, JobState, Result, Series, SeriesState, give_back,
                          lead_series, of_node, utcnow)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class LeaseLost(RuntimeError):
    """A worker's claim on a job ended (its lease expired and another took it over)."""


class Jobs:
    """The job half of the job store (a mixin of :class:`store.api.JobStore`)."""

    def session(self) -> "Session": ...          # provided by JobStore

    def queue_job(self, series_id: int, priority: int = 1) -> Job:
        """Queue the job of a complete series' current version, at ``priority`` (a rank:
        lower is claimed first). A job of an earlier version still waiting (new instances
        came before it ran) analyses this version instead: the series is analysed once,
        as it is now, and a re-run keeps its model, method and id."""
        with self.session() as s, s.begin():
            series = s.get(Series, series_id)
            job = s.scalar(select(Job).where(Job.series_id == series_id,
                                             Job.version == series.version))
            if job is None:     # (locked: a worker claiming it meanwhile keeps it)
                job = s.scalar(select(Job).where(
                    Job.series_id == series_id, Job.version < series.version,
                    Job.state == JobState.queued).order_by(Job.version.desc()).limit(1)
                    .with_for_update())
                if job is not None:
                    job.version, priority = series.version, min(priority, job.priority)
            if job is None:
                job = Job(series_id=series_id, version=series.version)
                s.add(job)
            job.state, job.error, job.priority = JobState.queued, "", priority
            series.state = SeriesState.queued
            s.flush()
            return job

    def claim_job(self, node: str = "", worker: str = "", lease_seconds: float = 3600.0,
                  max_priority: int | None = None) -> Job | None:
        """Take the first queued job of a series this node holds, by priority (lower rank
        first; none above ``max_priority``) and then age (``FOR UPDATE SKIP LOCKED``:
        claimers never wait on each other): it becomes running, by ``worker``, with one
        more attempt, held for ``lease_seconds`` unless its worker's heartbeat
        (:meth:`store.fleet.Fleet.heartbeat`) extends it."""
        q = select(Job).join(Series).where(Job.state == JobState.queued, of_node(node))
        if max_priority is not None:
            q = q.where(Job.priority <= max_priority)
        with self.session() as s, s.begin():
            # the series' row is locked too: a new instance reopening it meanwhile would
            # otherwise see its state overwritten with "running"
            job = s.scalar(q.order_by(Job.priority, Job.id).limit(1)
                           .with_for_update(skip_locked=True))
            if job is None:
                return None
            now = utcnow()
            job.state, job.attempts, job.started_at = JobState.running, job.attempts + 1, now
            job.node, job.worker, job.claim_key = node, worker, secrets.token_hex(16)
            job.lease_until = now + dt.timedelta(seconds=lease_seconds)
            lead_series(job, SeriesState.running)
            return job

    def requeue_interrupted(self, node: str = "",
                            gone: Callable[[str], bool] = lambda worker: True) -> int:
        """At start-up: this node's jobs left running by a crash run again, those of
        workers that are ``gone`` (a worker elsewhere still running one keeps it: its
        lease says when it has gone)."""
        with self.session() as s, s.begin():
            jobs = [job for job in s.scalars(select(Job).where(
                Job.state == JobState.running, Job.node.in_((node, ""))))
                if not job.worker or gone(job.worker)]
            for job in jobs:
                job.state = JobState.queued
                lead_series(job, SeriesState.queued)
            return len(jobs)

    def abandon_job(self, job_id: int, reason: str, max_attempts: int,
                    worker: str | None = None) -> JobState:
        """A job whose worker died: queued again, or failed once it has had
        ``max_attempts`` attempts (with ``worker``: only while that worker holds it).
        Returns the state it was left in."""
        with self.session() as s, s.begin():
            job = s.get(Job, job_id)
            if job is None or job.state != JobState.running or (
                    worker is not None and job.worker != worker):
                return job.state if job is not None else JobState.failed
            give_back(job, reason, max_attempts, utcnow())
            return job.state

    def finish_job(self, job_id: int, *, diagnosis: str, probabilities: dict,
                   infected_fraction: float, timings: dict, model_version: str,
                   device_uid: str, results: Iterable[dict], worker: str | None = None,
                   deliveries: Iterable[tuple[str, str]] = (), to_route: bool = False,
                   log: str | None = None, caution: str = "") -> None:
        """Record a job's outcome and queue its deliveries (destination name and kind), in
        one transaction; with ``worker``, only while that worker still holds the job
        (LeaseLost otherwise: another took it over, and only one may record results);
        ``to_route``: the node queues the deliveries instead (a worker elsewhere); ``log``:
        the run's log so far, kept with the outcome (never a finished job without it);
        ``caution``: what a reader must know of the model (an untrained one)."""
        with self.session() as s, s.begin():
            job = _held(s, job_id, worker)
            job.state, job.finished_at, job.error = JobState.done, utcnow(), ""
            job.to_route = to_route
            if log is not None:
                job.log = log[-MAX_LOG_CHARS:]
            job.diagnosis, job.probabilities = diagnosis, probabilities
            job.infected_fraction, job.timings = infected_fraction, timings
            job.model_version, job.device_uid = model_version, device_uid
            job.caution = caution
            for r in results:
                s.add(Result(job_id=job_id, **r))
            for name, kind in deliveries:
                s.add(Delivery(job_id=job_id, destination=name, kind=kind))
            if job.series.state == SeriesState.running:
                lead_series(job, SeriesState.done)

    def fail_job(self, job_id: int, error: str, worker: str | None = None,
                 to_route: bool = False, log: str | None = None) -> None:
        with self.session() as s, s.begin():
            job = _held(s, job_id, worker)
            job.state, job.finished_at, job.error = JobState.failed, utcnow(), error
            job.to_route = to_route
            if log is not None:
                job.log = log[-MAX_LOG_CHARS:]
            lead_series(job, SeriesState.failed, error)

    def retry_job(self, job_id: int) -> Job:
        with self.session() as s, s.begin():
            job = s.get(Job, job_id)
            if job is None:
                raise LookupError(f"no job {job_id}")
            if job.state == JobState.running:
                raise ValueError(f"job {job_id} is running")
            job.state, job.error, job.to_route = JobState.queued, "", False
            lead_series(job, SeriesState.queued)
            return job


def _held(s: Session, job_id: int, worker: str | None) -> Job:
    """The job, locked; LeaseLost when ``worker`` is given and no longer holds it."""
    job = s.get(Job, job_id, with_for_update=worker is not None)
    if worker is not None and (job.state != JobState.running or job.worker != worker):
        raise LeaseLost(f"job {job_id} is no longer held by {worker} (its lease expired "
                        f"and it was taken over)")
    return job
