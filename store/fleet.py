"""The workers: who runs jobs, their heartbeats and leases, and jobs whose worker went away.

A worker (``lungsys serve``'s own, or ``lungsys worker`` on another machine)
names itself in the ``workers`` table, claims a job for a lease
(:meth:`store.jobs.Jobs.claim_job`) and renews it with a heartbeat while it
runs. A worker that crashes, is killed or loses the network stops renewing:
once its lease has expired, the next claimer puts the job back in the queue
(the attempt counted) or, after ``max_attempts``, fails it with that reason.
Only the worker that holds a job may record its outcome
(:class:`store.jobs.LeaseLost` otherwise), so a job taken over is recorded once.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from sqlalchemy import DateTime, Integer, String, delete, select, text, update
from sqlalchemy.orm import Mapped, mapped_column

from store.models import (EPOCH, Base, Delivery, Incident, IncidentKind, Instance, Job,
                          JobState, Result, Series, give_back, of_node, utcnow)

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session


class Worker(Base):
    """A worker process: where it runs, on what device, with which model, last heard."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)    # host:pid
    device: Mapped[str] = mapped_column(String(128), default="")   # cpu, cuda:0 (H200) ...
    node: Mapped[str] = mapped_column(String(64), default="")      # whose series it runs
    model_version: Mapped[str] = mapped_column(String(64), default="")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    seen_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


#: PostgreSQL's channel on which a node announces queued jobs to idle workers.
JOBS_CHANNEL = "lungsys_jobs"


class Fleet:
    """Workers, heartbeats and expired leases (a mixin of :class:`store.api.JobStore`)."""

    engine: "Engine"                             # provided by JobStore
    def session(self) -> "Session": ...          # provided by JobStore
    def read_session(self) -> "Session": ...     # provided by JobStore

    def announce_jobs(self) -> None:
        """Jobs were queued: PostgreSQL tells the workers listening (``NOTIFY``, sent when
        the transaction ends, so a worker never looks before the job is there); other
        stores have no listeners, and their workers look every few seconds."""
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as conn:
                conn.execute(text(f"NOTIFY {JOBS_CHANNEL}"))

    def register_worker(self, name: str, device: str, node: str, model_version: str) -> None:
        with self.session() as s, s.begin():
            s.execute(delete(Worker).where(Worker.name == name))
            s.add(Worker(name=name, device=device[:128], node=node,
                         model_version=model_version))

    def forget_worker(self, name: str) -> None:
        """A worker that stops cleanly leaves the table."""
        with self.session() as s, s.begin():
            s.execute(delete(Worker).where(Worker.name == name))

    def heartbeat(self, name: str, job_id: int | None, lease_seconds: float) -> bool:
        """The worker is alive (and runs ``job_id``): its job's lease is renewed. False
        when it no longer holds that job (its lease expired and another took it)."""
        now = utcnow()
        with self.session() as s, s.begin():
            s.execute(update(Worker).where(Worker.name == name)
                      .values(seen_at=now, job_id=job_id))
            if job_id is None:
                return True
            held = s.execute(update(Job).where(
                Job.id == job_id, Job.worker == name, Job.state == JobState.running)
                .values(lease_until=now + dt.timedelta(seconds=lease_seconds)))
            return held.rowcount == 1

    def workers(self, node: str | None = None) -> list[Worker]:
        """The workers known, most recently heard first (of ``node``'s series, if given)."""
        with self.read_session() as s:
            q = select(Worker).order_by(Worker.seen_at.desc())
            if node is not None:
                q = q.where(Worker.node == node)
            return list(s.scalars(q))

    def reclaim_expired(self, node: str, max_attempts: int,
                        now: dt.datetime | None = None) -> list[tuple[int, JobState]]:
        """Running jobs of ``node``'s series whose lease expired: queued again, or failed
        once they had ``max_attempts`` attempts; each recorded as an incident. Returns
        the jobs and the state each was left in."""
        now = now or utcnow()
        out = []
        with self.session() as s, s.begin():
            jobs = list(s.scalars(select(Job).join(Series).where(
                # (a job claimed before leases existed has none: its node's restart
                # requeues it, as it always did)
                Job.state == JobState.running, Job.lease_until < now, Job.lease_until > EPOCH,
                of_node(node)).with_for_update(skip_locked=True)))
            for job in jobs:
                give_back(job, f"its worker {job.worker or '?'} stopped answering (lease "
                               f"expired)", max_attempts, now)
                s.add(Incident(kind=IncidentKind.worker_died, node=node, job_id=job.id,
                               detail=f"job {job.id}: {job.error}",
                               series_instance_uid=job.series.series_instance_uid))
                out.append((job.id, job.state))
        return out

    # --- for workers over WADO-RS (pacs_node.wado) -----------------------------------
    def claimed_series(self, node: str, study_uid: str, series_uid: str, claim_key: str
                       ) -> list[tuple[str, str, str]] | None:
        """The instances (SOP Instance UID, path, transfer syntax) of a series ``node`` holds
        whose job is running under the claim of ``claim_key``; None when there is none."""
        if not claim_key:
            return None
        with self.read_session() as s:
            series = s.scalar(select(Series).join(Job).where(
                Series.series_instance_uid == series_uid,
                Series.study_instance_uid == study_uid, Series.purged.is_(False),
                Job.state == JobState.running, Job.claim_key == claim_key, of_node(node)))
            if series is None:
                return None
            return [tuple(row) for row in s.execute(
                select(Instance.sop_instance_uid, Instance.path, Instance.transfer_syntax_uid)
                .where(Instance.series_id == series.id).order_by(Instance.id))]

    def claim_of(self, node: str, job_id: int) -> dict | None:
        """A job of ``node``'s series as a worker handing back results needs it: its state,
        claim (attempt, key), version, series and the paths of its recorded results."""
        with self.read_session() as s:
            job = s.scalar(select(Job).join(Series).where(Job.id == job_id, of_node(node)))
            if job is None:
                return None
            return {"state": job.state, "attempt": job.attempts, "key": job.claim_key,
                    "version": job.version,
                    "study": job.series.study_instance_uid,
                    "series": job.series.series_instance_uid,
                    "results": list(s.scalars(select(Result.path)
                                              .where(Result.job_id == job.id)))}

    # --- outcomes recorded elsewhere ---------------------------------------------------
    def route_later(self, job_id: int) -> None:
        """A worker elsewhere saw a job fail (given up): its node says so by its own
        configuration."""
        with self.session() as s, s.begin():
            s.execute(update(Job).where(Job.id == job_id).values(to_route=True))

    def route_outcomes(self, node: str, destinations: list[tuple[str, str]]
                       ) -> list[tuple[int, JobState]]:
        """Outcomes of ``node``'s jobs recorded by workers elsewhere: the deliveries of each
        one done queued (destination name and kind), in the transaction that marks it
        routed (once, whichever node process routes). Returns the jobs and their states,
        for the notifications."""
        out = []
        with self.session() as s, s.begin():
            for job in s.scalars(select(Job).join(Series).where(
                    Job.to_route.is_(True), Job.state.in_((JobState.done, JobState.failed)),
                    of_node(node)).with_for_update(of=Job, skip_locked=True)):
                job.to_route = False
                if job.state == JobState.done:
                    for name, kind in destinations:
                        s.add(Delivery(job_id=job.id, destination=name, kind=kind))
                out.append((job.id, job.state))
        return out
