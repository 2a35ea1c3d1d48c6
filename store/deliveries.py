"""Deliveries in the job store: each result's sending to a destination, tried and recorded.

Kept apart from :mod:`store.api` as :mod:`store.notices` (whose schedule is the same) is;
:class:`~store.api.JobStore` takes these methods in. A delivery is pending until sent,
retried with backoff, failed (given up) after the configured number of attempts; every
try is an Attempt row that the console and ``lungsys jobs`` show.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Iterable

from sqlalchemy import select

from store.models import Attempt, Delivery, DeliveryState, Result, due, settle, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class Deliveries:
    """The delivery half of the job store (a mixin of :class:`store.api.JobStore`)."""

    def session(self) -> "Session": ...          # provided by JobStore
    def read_session(self) -> "Session": ...     # provided by JobStore

    def create_deliveries(self, job_id: int, destinations: Iterable[tuple[str, str]]) -> None:
        with self.session() as s, s.begin():
            for name, kind in destinations:
                s.add(Delivery(job_id=job_id, destination=name, kind=kind))

    def due_deliveries(self, now: dt.datetime | None = None, node: str | None = None
                       ) -> list[Delivery]:
        """Deliveries due now (of ``node``'s series, when given: it holds their files)."""
        with self.read_session() as s:
            return list(s.scalars(due(Delivery, now or utcnow(), node)))

    def record_attempt(self, delivery_id: int, ok: bool, error: str = "",
                       retry_at: dt.datetime | None = None, give_up: bool = False) -> None:
        with self.session() as s, s.begin():
            d = s.get(Delivery, delivery_id)
            now = utcnow()
            s.add(Attempt(delivery_id=delivery_id, started_at=now, finished_at=now, ok=ok,
                          error=error))
            settle(d, ok, error, retry_at, give_up, now, "delivered_at")

    def retry_delivery(self, delivery_id: int) -> Delivery:
        with self.session() as s, s.begin():
            d = s.get(Delivery, delivery_id)
            if d is None:
                raise LookupError(f"no delivery {delivery_id}")
            d.state, d.next_attempt_at = DeliveryState.pending, utcnow()
            return d

    def result_paths(self, job_id: int) -> list[str]:
        with self.read_session() as s:
            return list(s.scalars(select(Result.path).where(Result.job_id == job_id)
                                  .order_by(Result.id)))
