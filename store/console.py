"""What the operations console reads, and the two things it does beyond the CLI.

Reads: the last 24 hours by the hour (series received, jobs analysed, deliveries done,
and the time from a series' last instance to its results delivered), a page of
jobs under filters, one job whole, skipped series, recent failures by
destination, recent errors. Writes: a job's analysis log (by the worker), and a
re-run of a series with another model or method (a new version of its results).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, or_, select
from sqlalchemy.orm import selectinload

from store.models import (Attempt, Delivery, DeliveryState, Incident, Instance, Job,
                          JobState, Notification, Series, SeriesState, utcnow)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

#: The most of a job's analysis log that is kept.
MAX_LOG_CHARS = 20_000


@dataclass(frozen=True)
class JobFilter:
    """The job list's filters (each optional); ``state`` failed also takes jobs whose
    delivery gave up, as ``lungsys jobs list --state failed`` does."""

    state: str = ""
    diagnosis: str = ""
    calling_aet: str = ""
    delivery: str = ""                  # a delivery of the job in this state
    since: dt.date | None = None        # created on or after
    until: dt.date | None = None        # created on or before


@dataclass(frozen=True)
class Hour:
    """One hour of the dashboard's charts."""

    start: dt.datetime
    received: int
    analysed: int
    delivered: int
    latency_seconds: float | None       # median, last instance to delivered


@dataclass(frozen=True)
class ErrorLine:
    """One recent error for the dashboard."""

    at: dt.datetime
    what: str
    detail: str
    job_id: int | None


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


class Console:
    """The console's half of the job store (a mixin of :class:`store.api.JobStore`)."""

    def session(self) -> "Session": ...          # provided by JobStore
    def read_session(self) -> "Session": ...     # provided by JobStore

    # --- dashboard -----------------------------------------------------------
    def hourly(self, hours: int = 24, now: dt.datetime | None = None) -> list[Hour]:
        """The last ``hours`` hours, oldest first, the current one last."""
        now = now or utcnow()
        top = now.replace(minute=0, second=0, microsecond=0)
        first = top - dt.timedelta(hours=hours - 1)
        with self.read_session() as s:
            received = s.scalars(select(Series.first_received)
                                 .where(Series.first_received >= first)).all()
            analysed = s.scalars(select(Job.finished_at).where(
                Job.state == JobState.done, Job.finished_at >= first)).all()
            delivered = s.execute(select(Delivery.delivered_at, Series.last_received)
                                  .join(Job, Delivery.job_id == Job.id)
                                  .join(Series, Job.series_id == Series.id)
                                  .where(Delivery.delivered_at >= first)).all()

        def slot(at: dt.datetime) -> int:
            return int((at - first).total_seconds() // 3600)

        counts = {name: [0] * hours for name in ("received", "analysed", "delivered")}
        latencies: list[list[float]] = [[] for _ in range(hours)]
        for name, stamps in (("received", received), ("analysed", analysed)):
            for at in stamps:
                if 0 <= slot(at) < hours:
                    counts[name][slot(at)] += 1
        for at, last in delivered:
            if 0 <= slot(at) < hours:
                counts["delivered"][slot(at)] += 1
                latencies[slot(at)].append(max(0.0, (at - last).total_seconds()))
        return [Hour(first + dt.timedelta(hours=i), counts["received"][i],
                     counts["analysed"][i], counts["delivered"][i], _median(latencies[i]))
                for i in range(hours)]

    def recent_errors(self, limit: int = 10) -> list[ErrorLine]:
        """Failed jobs, failed delivery attempts and incidents, newest first."""
        with self.read_session() as s:
            jobs = s.execute(select(Job.finished_at, Job.id, Job.error).where(
                Job.state == JobState.failed).order_by(Job.finished_at.desc()).limit(limit))
            attempts = s.execute(select(Attempt.started_at, Delivery.job_id,
                                        Delivery.destination, Attempt.error)
                                 .join(Delivery, Attempt.delivery_id == Delivery.id)
                                 .where(Attempt.ok.is_(False))
                                 .order_by(Attempt.id.desc()).limit(limit))
            incidents = s.execute(select(Incident.at, Incident.job_id, Incident.kind,
                                         Incident.detail)
                                  .order_by(Incident.id.desc()).limit(limit))
            lines = [ErrorLine(at or utcnow(), "job failed", error, job_id)
                     for at, job_id, error in jobs]
            lines += [ErrorLine(at, f"delivery to {name} failed", error, job_id)
                      for at, job_id, name, error in attempts]
            lines += [ErrorLine(at, f"incident: {kind.value}", detail, job_id)
                      for at, job_id, kind, detail in incidents]
        return sorted(lines, key=lambda e: e.at, reverse=True)[:limit]

    def receiving_series(self, limit: int = 20) -> list[Series]:
        """Series whose instances are arriving now (not yet complete), newest first."""
        with self.read_session() as s:
            return list(s.scalars(select(Series).where(Series.state == SeriesState.receiving)
                                  .order_by(Series.last_received.desc()).limit(limit)))

    def queue_depth(self) -> int:
        with self.read_session() as s:
            return s.scalar(select(func.count(Job.id)).where(Job.state == JobState.queued))

    def queue_by_priority(self) -> dict[int, int]:
        """Queued jobs by priority rank."""
        with self.read_session() as s:
            return dict(s.execute(select(Job.priority, func.count(Job.id))
                                  .where(Job.state == JobState.queued)
                                  .group_by(Job.priority)).all())

    # --- jobs ----------------------------------------------------------------
    def job_page(self, where: JobFilter, page: int = 1, per_page: int = 25
                 ) -> tuple[list[Job], int]:
        """One page of jobs under ``where``, newest first, and how many there are in all."""
        q = select(Job).join(Series, Job.series_id == Series.id)
        if where.state:
            state = JobState(where.state)
            q = q.where(or_(Job.state == state, Job.deliveries.any(
                Delivery.state == DeliveryState.failed)) if state == JobState.failed
                else Job.state == state)
        if where.diagnosis:
            q = q.where(Job.diagnosis == where.diagnosis)
        if where.calling_aet:
            q = q.where(Series.calling_aet == where.calling_aet)
        if where.delivery:
            q = q.where(Job.deliveries.any(Delivery.state == DeliveryState(where.delivery)))
        if where.since:
            q = q.where(Job.created_at >= dt.datetime.combine(where.since, dt.time()))
        if where.until and where.until < dt.date.max:
            q = q.where(Job.created_at < dt.datetime.combine(
                where.until + dt.timedelta(days=1), dt.time()))
        with self.read_session() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            jobs = list(s.scalars(q.options(selectinload(Job.series),
                                            selectinload(Job.deliveries))
                                  .order_by(Job.id.desc())
                                  .offset(max(0, page - 1) * per_page).limit(per_page)))
        return jobs, total

    def job(self, job_id: int) -> Job | None:
        """One job with everything its page shows, loaded."""
        with self.read_session() as s:
            job = s.scalar(select(Job).where(Job.id == job_id).options(
                selectinload(Job.series), selectinload(Job.results),
                selectinload(Job.deliveries).selectinload(Delivery.attempt_log),
                selectinload(Job.notifications).selectinload(Notification.attempt_log)))
            if job is not None:
                _ = job.series.jobs
            return job

    def calling_aets(self) -> list[str]:
        with self.read_session() as s:
            return sorted(a for a in s.scalars(select(Series.calling_aet).distinct()) if a)

    def diagnoses(self) -> list[str]:
        with self.read_session() as s:
            return sorted(d for d in s.scalars(select(Job.diagnosis).distinct()) if d)

    def first_instance_paths(self, series_ids: list[int]) -> dict[int, str]:
        """One instance file of each series (where the console reads the patient's name)."""
        with self.read_session() as s:
            rows = s.execute(select(Instance.series_id, func.min(Instance.path))
                             .where(Instance.series_id.in_(series_ids))
                             .group_by(Instance.series_id))
            return dict(rows.all())

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        """Deliveries by destination and state."""
        out: dict[str, dict[str, int]] = {}
        with self.read_session() as s:
            for name, state, n in s.execute(select(Delivery.destination, Delivery.state,
                                                   func.count())
                                            .group_by(Delivery.destination, Delivery.state)):
                out.setdefault(name, {})[state.value] = n
        return out

    def skipped_series(self, page: int = 1, per_page: int = 25) -> tuple[list[Series], int]:
        q = select(Series).where(Series.state == SeriesState.skipped)
        with self.read_session() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            rows = list(s.scalars(q.options(selectinload(Series.jobs))
                                  .order_by(Series.last_received.desc())
                                  .offset(max(0, page - 1) * per_page).limit(per_page)))
        return rows, total

    def destination_failures(self, name: str, limit: int = 5) -> list[tuple[dt.datetime, int,
                                                                            str]]:
        """The last failed attempts to a destination: when, which job, the error."""
        with self.read_session() as s:
            return [tuple(row) for row in s.execute(
                select(Attempt.started_at, Delivery.job_id, Attempt.error)
                .join(Delivery, Attempt.delivery_id == Delivery.id)
                .where(Delivery.destination == name, Attempt.ok.is_(False))
                .order_by(Attempt.id.desc()).limit(limit))]

    # --- what the console and the worker write --------------------------------
    def set_job_log(self, job_id: int, text: str, worker: str | None = None) -> None:
        """Keep a run's log with its job (with ``worker``: only if the job is still that
        worker's, not taken over by another since)."""
        with self.session() as s, s.begin():
            job = s.get(Job, job_id)
            if job is not None and (worker is None or job.worker == worker):
                job.log = text[-MAX_LOG_CHARS:]

    def rerun_job(self, job_id: int, checkpoint: str = "", method: str = "") -> Job:
        """A new version of the job's series, analysed with ``checkpoint`` and ``method``
        (empty: the node's), queued; the job's own results stay as they are."""
        with self.session() as s, s.begin():
            job = s.get(Job, job_id)
            if job is None:
                raise LookupError(f"no job {job_id}")
            series = s.scalar(select(Series).where(Series.id == job.series_id)
                              .with_for_update())
            if series.purged:
                raise ValueError(f"the instances of job {job_id}'s series were removed "
                                 f"by retention")
            if series.state in (SeriesState.receiving, SeriesState.complete,
                                SeriesState.running, SeriesState.queued):
                raise ValueError(f"job {job_id}'s series is {series.state.value}: "
                                 f"re-run it once that is over")
            series.version += 1
            new = Job(series_id=series.id, version=series.version, checkpoint=checkpoint,
                      method=method, priority=job.priority)
            s.add(new)
            series.state = SeriesState.queued
            s.flush()
            return new
