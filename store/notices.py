"""Notifications in the job store: webhook events queued, due, tried and recorded.

Kept apart from :mod:`store.api` (the receive and job hot path) as
:mod:`store.upkeep` is; :class:`~store.api.JobStore` takes these methods in.
The schedule is a delivery's: pending until sent, retried with backoff, failed
(given up) after the configured number of attempts, every try recorded.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Iterable

from store.models import Job, Notification, NotificationAttempt, due, settle, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class Notices:
    """The notification half of the job store (a mixin of :class:`store.api.JobStore`)."""

    def session(self) -> "Session": ...          # provided by JobStore
    def read_session(self) -> "Session": ...     # provided by JobStore

    def queue_notifications(self, job_id: int, event: str,
                            payloads: Iterable[tuple[str, dict]]) -> int:
        """Queue ``event`` of a job: a (target name, body) each; how many were queued."""
        with self.session() as s, s.begin():
            rows = [Notification(job_id=job_id, target=name, event=event, payload=body)
                    for name, body in payloads]
            s.add_all(rows)
            return len(rows)

    def job_for_notice(self, job_id: int) -> Job:
        """A job with its series (what a notification's body says)."""
        with self.read_session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise LookupError(f"no job {job_id}")
            _ = job.series.series_instance_uid, list(job.deliveries)
            return job

    def due_notifications(self, now: dt.datetime | None = None, node: str | None = None
                          ) -> list[Notification]:
        """Notifications due now (of ``node``'s series, when given: one node sends each)."""
        with self.read_session() as s:
            return list(s.scalars(due(Notification, now or utcnow(), node)))

    def record_notice_attempt(self, notification_id: int, ok: bool, status: int | None = None,
                              error: str = "", retry_at: dt.datetime | None = None,
                              give_up: bool = False) -> None:
        with self.session() as s, s.begin():
            n = s.get(Notification, notification_id)
            now = utcnow()
            s.add(NotificationAttempt(notification_id=notification_id, at=now, ok=ok,
                                      status=status, error=error))
            settle(n, ok, error, retry_at, give_up, now, "sent_at")
