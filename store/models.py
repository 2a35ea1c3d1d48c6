"""The job store's tables (SQLAlchemy 2, declarative, typed).

instances   every received SOP instance (stored once per SOP Instance UID)
series      one row per received series: its state and why
jobs        one model run over one version of a series
results     the DICOM objects a job produced (SR, SEG, KO, SC, PM, GSPS)
deliveries  one result set to one destination, with its retry schedule
attempts    every delivery attempt, with its outcome
notifications  one event (job done, job failed, delivery failed) to one webhook,
            with its retry schedule, and notification_attempts, every try
incidents   what an admin should know that no other row says: instances
            refused, lost or found unrecorded, workers that died

``node`` columns name the node (host and data folder) that holds a series'
files and runs its jobs, so that several nodes can share one job store.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (JSON, DateTime, Enum, ForeignKey, Integer, Select, String, Text,
                        UniqueConstraint, select)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


#: "Never" for a time column that must not be empty (a job's lease before any claim).
EPOCH = dt.datetime(1970, 1, 1)


class Base(DeclarativeBase):
    """The declarative base of the job store's tables."""

    pass


class SeriesState(str, enum.Enum):
    """Where a series is: receiving, complete, skipped, queued, running, done or failed."""

    receiving = "receiving"
    complete = "complete"
    skipped = "skipped"
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class JobState(str, enum.Enum):
    """Where a job is: queued, running, done or failed."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class DeliveryState(str, enum.Enum):
    """Where a delivery is: pending (due or waiting to retry), done or failed (given up)."""

    pending = "pending"
    done = "done"
    failed = "failed"


class Scheduled:
    """The retry schedule a delivery and a notification share (:func:`settle` and
    :func:`due` read it): pending until done, tried again from ``next_attempt_at``,
    failed when given up."""

    state: Mapped[DeliveryState] = mapped_column(Enum(DeliveryState),
                                                 default=DeliveryState.pending, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


def settle(row: Scheduled, ok: bool, error: str, retry_at: dt.datetime | None, give_up: bool,
           now: dt.datetime, done_at: str) -> None:
    """One try of a delivery or a notification: counted; done (its ``done_at`` column set),
    or pending again from ``retry_at``, or failed when given up."""
    row.attempts += 1
    if ok:
        row.state, row.last_error = DeliveryState.done, ""
        setattr(row, done_at, now)
    else:
        row.last_error = error
        row.state = DeliveryState.failed if give_up else DeliveryState.pending
        if retry_at is not None:
            row.next_attempt_at = retry_at


def due(model: type[Delivery] | type[Notification], now: dt.datetime,
        node: str | None = None) -> Select:
    """The query for the rows of ``model`` (Delivery or Notification: each of one job) that
    are pending and due at ``now``, oldest first; of ``node``'s series when given (the node
    that holds their files sends them)."""
    q = select(model).where(model.state == DeliveryState.pending, model.next_attempt_at <= now)
    if node is not None:
        q = q.join(Job, model.job_id == Job.id).join(Series, Job.series_id == Series.id) \
            .where(of_node(node))
    return q.order_by(model.id)


class Instance(Base):
    """A received SOP instance: where its file is, who sent it, when."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    series: Mapped["Series"] = relationship(back_populates="instances")


class Series(Base):
    """A received series: its state and why, counts, version, the node that holds it."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    state: Mapped[SeriesState] = mapped_column(Enum(SeriesState), default=SeriesState.receiving,
                                               index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    expected_instances: Mapped[int | None] = mapped_column(Integer, nullable=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int] = mapped_column(Integer, default=1)
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    node: Mapped[str] = mapped_column(String(64), default="", server_default="", index=True)
    purged: Mapped[bool] = mapped_column(default=False)   # files removed by retention
    first_received: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list["Job"]] = relationship(back_populates="series", order_by="Job.id")


class Job(Base):
    """One model run over one version of a series: timings, diagnosis, error."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("series_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[JobState] = mapped_column(Enum(JobState), default=JobState.queued, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    node: Mapped[str] = mapped_column(String(64), default="", server_default="")  # running it
    model_version: Mapped[str] = mapped_column(String(64), default="")
    device_uid: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    timings: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    diagnosis: Mapped[str] = mapped_column(String(16), default="")
    probabilities: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    infected_fraction: Mapped[float | None] = mapped_column(nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    # a re-run with another model or method than the node's (empty: the node's own)
    checkpoint: Mapped[str] = mapped_column(Text, default="", server_default="")
    method: Mapped[str] = mapped_column(String(16), default="", server_default="")
    log: Mapped[str] = mapped_column(Text, default="", server_default="")  # its analysis
    # the worker running it (or that ran it) and until when its claim holds without a
    # heartbeat (store.fleet)
    worker: Mapped[str] = mapped_column(String(128), default="", server_default="")
    lease_until: Mapped[dt.datetime] = mapped_column(DateTime, default=EPOCH,
                                                     server_default="1970-01-01 00:00:00")
    # claimed lower first (config.Priority's rank: 0 urgent, 1 normal, 2 offpeak)
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default="1", index=True)
    # recorded by a worker elsewhere (lungsys worker): the node that holds the series queues
    # the deliveries and notifications of its outcome, by its own configuration (store.fleet)
    to_route: Mapped[bool] = mapped_column(default=False, server_default="0", index=True)
    # a secret of the claim (a new one each claim): what a worker over HTTP shows the node
    # with its token to retrieve the job's series and hand back its results (pacs_node.wado)
    claim_key: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # what a reader must know of the model that made its results: untrained
    # (inference.model_info.UNTRAINED), "" for a trained one
    caution: Mapped[str] = mapped_column(Text, default="", server_default="")

    series: Mapped[Series] = relationship(back_populates="jobs")
    results: Mapped[list["Result"]] = relationship(back_populates="job", order_by="Result.id")
    deliveries: Mapped[list["Delivery"]] = relationship(back_populates="job",
                                                        order_by="Delivery.id")
    notifications: Mapped[list["Notification"]] = relationship(back_populates="job",
                                                               order_by="Notification.id")


def of_node(node: str):
    """The condition "a series ``node`` holds" (or no node: one recorded before nodes were
    named): what a node completes, runs, delivers, notifies and keeps."""
    return Series.node.in_((node, ""))


def lead_series(job: "Job", state: SeriesState, reason: str | None = None) -> None:
    """The series takes the job's state (and reason) when the job is of its current version:
    an older version's retry or re-run leaves the series alone."""
    if job.version == job.series.version:
        job.series.state = state
        if reason is not None:
            job.series.reason = reason


def give_back(job: "Job", why: str, max_attempts: int, now: dt.datetime) -> None:
    """A running job whose worker went away (died, or stopped renewing its lease): queued
    again, or failed once it has had ``max_attempts`` attempts, saying why."""
    if job.attempts >= max_attempts:
        job.state, job.finished_at = JobState.failed, now
        job.error = f"{why} (attempt {job.attempts} of {max_attempts}: given up)"
        lead_series(job, SeriesState.failed, job.error)
    else:
        job.state, job.error = JobState.queued, f"{why} (attempt {job.attempts})"
        lead_series(job, SeriesState.queued)


class Result(Base):
    """A DICOM object a job produced (SR, SC)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))          # sr, seg, ko, sc, pm, gsps
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="results")


class Delivery(Scheduled, Base):
    """One job's results to one destination, with its retry schedule."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True,
                                                             sort_order=1)  # after Scheduled's

    job: Mapped[Job] = relationship(back_populates="deliveries")
    attempt_log: Mapped[list["Attempt"]] = relationship(back_populates="delivery",
                                                        order_by="Attempt.id")


class Attempt(Base):
    """One delivery attempt and its outcome."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), index=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    ok: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str] = mapped_column(Text, default="")

    delivery: Mapped[Delivery] = relationship(back_populates="attempt_log")


class IncidentKind(str, enum.Enum):
    """What kind of thing an incident reports."""

    refused = "refused"              # an instance the node would not store (a bad UID ...)
    duplicate = "duplicate"          # a stored SOP Instance UID sent again in another series
    lost = "lost"                    # recorded, but its file was gone at start-up
    recovered = "recovered"          # a file found unrecorded at start-up, now recorded
    quarantined = "quarantined"      # a file found unrecorded that could not be recorded
    worker_died = "worker died"      # the worker process ended unasked


class Incident(Base):
    """What an admin should know that no other row says (``lungsys incidents``)."""

    __tablename__ = "incidents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    kind: Mapped[IncidentKind] = mapped_column(Enum(IncidentKind), index=True)
    node: Mapped[str] = mapped_column(String(64), default="")
    origin: Mapped[str] = mapped_column(String(64), default="")   # calling AE, STOW-RS ...
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")


class Notification(Scheduled, Base):
    """One event of a job sent to one webhook, with its retry schedule (as deliveries)."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    target: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict] = mapped_column(JSON)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True,
                                                        sort_order=1)  # after Scheduled's

    job: Mapped[Job] = relationship(back_populates="notifications")
    attempt_log: Mapped[list["NotificationAttempt"]] = relationship(
        back_populates="notification", order_by="NotificationAttempt.id")


class NotificationAttempt(Base):
    """One try of a notification: when, the HTTP status, and what went wrong."""

    __tablename__ = "notification_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    notification_id: Mapped[int] = mapped_column(ForeignKey("notifications.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    ok: Mapped[bool] = mapped_column(default=False)
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")

    notification: Mapped[Notification] = relationship(back_populates="attempt_log")
