"""When received series are complete: each by itself, or a study as a whole.

A series is complete when no instance of it arrived for ``stable_seconds``, or
once exactly as many instances arrived as its Images in Acquisition said. One
that holds more (a series of two acquisitions, each counting its own images;
or instances after it was complete) waits for the quiet time: completed at
every instance beyond the count, it queued one job per instance. In study mode
a study is complete when no instance of any of its series arrived for
``study_stable_seconds``: all its receiving series then become complete
together, for one of them to be chosen (:mod:`pacs_node.choice`). A series that
arrives after its study was complete starts a new group of its own, which is not
analysed when a series of the study already was (:meth:`Assembly.analysed_series`).
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from sqlalchemy import func, select, update

from store.models import Series, SeriesState, of_node, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def _of(node: str | None) -> tuple:
    """The condition "a series of ``node``" (none when ``node`` is None: every node's)."""
    return () if node is None else (of_node(node),)


class Assembly:
    """Completion of series and studies (a mixin of :class:`store.api.JobStore`)."""

    def session(self) -> "Session": ...          # provided by JobStore
    def read_session(self) -> "Session": ...     # provided by JobStore

    def complete_ready(self, stable_seconds: float, now: dt.datetime | None = None,
                       node: str | None = None) -> list[Series]:
        """Mark receiving series complete (of ``node``, when given: only the node holding
        a series' files can judge them): quiet for ``stable_seconds``, or all Images in
        Acquisition arrived, and no more. Returns them."""
        now = now or utcnow()
        quiet = now - dt.timedelta(seconds=stable_seconds)
        with self.session() as s, s.begin():
            ready = list(s.scalars(select(Series).where(
                Series.state == SeriesState.receiving, *_of(node),
                (Series.last_received <= quiet)
                | ((Series.expected_instances.is_not(None))
                   & (Series.instance_count == Series.expected_instances)))))
            for series in ready:
                series.state = SeriesState.complete
        return ready

    def reopen_unfinished(self, node: str | None = None) -> int:
        """Series left complete, neither queued nor skipped (a sweep that failed half-way,
        the job store locked; a crash), receive again, for the next sweep to complete
        them anew; how many. A sweep that runs to its end leaves none complete."""
        with self.session() as s, s.begin():
            return s.execute(update(Series).where(Series.state == SeriesState.complete,
                                                  *_of(node))
                             .values(state=SeriesState.receiving)).rowcount

    def analysed_series(self, study_instance_uid: str, node: str | None = None) -> str | None:
        """A series of the study that was chosen before (queued, running or done), if any:
        in study mode a series arriving later does not make a second result."""
        with self.read_session() as s:
            return s.scalar(select(Series.series_instance_uid).where(
                Series.study_instance_uid == study_instance_uid, *_of(node),
                Series.state.in_((SeriesState.queued, SeriesState.running,
                                  SeriesState.done))).limit(1))

    def complete_studies(self, stable_seconds: float, now: dt.datetime | None = None,
                         node: str | None = None) -> list[list[Series]]:
        """Mark complete the receiving series of each study quiet for ``stable_seconds``
        (no instance of any of its series since); returns them by study, each study's in
        the order they began to arrive."""
        now = now or utcnow()
        quiet = now - dt.timedelta(seconds=stable_seconds)
        with self.session() as s, s.begin():
            studies = list(s.scalars(
                select(Series.study_instance_uid).where(Series.state == SeriesState.receiving,
                                                        *_of(node))
                .group_by(Series.study_instance_uid)
                .having(func.max(Series.last_received) <= quiet)))
            out = []
            for study in studies:
                group = list(s.scalars(select(Series).where(
                    Series.study_instance_uid == study, Series.state == SeriesState.receiving,
                    *_of(node))
                    .order_by(Series.first_received, Series.id)))
                for series in group:
                    series.state = SeriesState.complete
                out.append(group)
        return out
