"""What the job store says in numbers: the node's metrics and readiness read these.

Counted at each scrape with GROUP BY queries over indexed columns, so that
the numbers are the job store's own (several nodes sharing it see the same)
and nothing is kept in memory between scrapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import func, select, text

from store.models import Attempt, Delivery, Job, JobState, Series

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class Stats:
    """The numbers half of the job store (a mixin of :class:`store.api.JobStore`)."""

    def session(self) -> "Session": ...          # provided by JobStore
    def read_session(self) -> "Session": ...     # provided by JobStore

    def ping(self) -> None:
        """Raise when the job store cannot answer (readiness)."""
        with self.read_session() as s:
            s.execute(text("SELECT 1"))

    def tallies(self) -> dict:
        """Series and jobs by state, delivery attempts by destination and outcome, and
        the analysis seconds of every job done (for the histogram)."""
        with self.read_session() as s:
            series = dict(s.execute(select(Series.state, func.count()).group_by(Series.state))
                          .all())
            jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            attempts = s.execute(select(Delivery.destination, Attempt.ok, func.count())
                                 .join(Attempt, Attempt.delivery_id == Delivery.id)
                                 .group_by(Delivery.destination, Attempt.ok)).all()
            seconds = [t.get("total") for (t,) in s.execute(
                select(Job.timings).where(Job.state == JobState.done))
                if isinstance(t, dict) and isinstance(t.get("total"), (int, float))]
        return {"series": {k.value: v for k, v in series.items()},
                "jobs": {k.value: v for k, v in jobs.items()},
                "attempts": [(dest, bool(ok), n) for dest, ok, n in attempts],
                "job_seconds": seconds}
