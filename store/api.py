"""The job-store API: what the node records, and what admins read and retry.

Every call is its own transaction, committed before it returns, so that the
node can acknowledge a C-STORE only once the instance is recorded, and so
that a restart finds every series, job and delivery where it was. SQLite
runs in WAL mode, and what only reads (the admin commands, the sweeps'
queries) runs in read-only transactions that take no lock, so readers never
block the receiver; any SQLAlchemy URL (PostgreSQL) works the same.
"""

from __future__ import annotations

import enum
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqlalchemy import (Integer, bindparam, case, create_engine, event, func, insert,
                        literal, or_, select, update)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from store.accounts import Accounts
from store.assembly import Assembly
from store.console import Console
from store.fleet import Fleet
from store.deliveries import Deliveries
from store.jobs import Jobs
from store.models import (Delivery, DeliveryState, Instance, Job, JobState, Series,
                          SeriesState, utcnow)
from store.notices import Notices
from store.stats import Stats
from store.upkeep import Upkeep, upgrade_schema

#: Series states in which new instances reopen the series (a new result version).
FINISHED = (SeriesState.done, SeriesState.failed, SeriesState.skipped, SeriesState.complete)

# The statements of record_instance, built once. A new instance for a finished, queued or
# running series reopens it (receiving again: a job running on the slices it had analyses
# them, and the series as it is now is analysed after it); one that had, or was about to
# have, a result gets a new version. The SET expressions read the row as it was.
_SERIES_T, _INSTANCE_T = Series.__table__, Instance.__table__
_STATE = _SERIES_T.c.state
# (OR of equalities, not IN: an IN list is expanded again at every execution.)
_REOPENS = or_(*(_STATE == state for state in (*FINISHED, SeriesState.queued,
                                                SeriesState.running)))
_NEW_VERSION = or_(*(_STATE == state for state in (SeriesState.done, SeriesState.failed,
                                                   SeriesState.skipped, SeriesState.queued,
                                                   SeriesState.running)))
_SERIES_RECEIVED = (
    update(_SERIES_T).where((_SERIES_T.c.series_instance_uid == bindparam("uid"))
                            & (_SERIES_T.c.study_instance_uid == bindparam("study"))).values(
        last_received=bindparam("now"), updated_at=bindparam("now"),
        instance_count=_SERIES_T.c.instance_count + 1,
        expected_instances=func.coalesce(bindparam("expected", type_=Integer),
                                         _SERIES_T.c.expected_instances),
        state=case((_REOPENS, literal(SeriesState.receiving, _STATE.type)), else_=_STATE),
        reason=case((_REOPENS, ""), else_=_SERIES_T.c.reason),
        version=_SERIES_T.c.version + case((_NEW_VERSION, 1), else_=0),
        purged=False)                  # a series sent again after retention: files again
    .returning(_SERIES_T.c.id))
_INSTANCE_INSERT = insert(_INSTANCE_T)
#: Execution option of read-only transactions (see JobStore.__init__).
_READ_ONLY = "lungsys_read_only"
_INSTANCE_STORED = select(_SERIES_T.c.series_instance_uid).join_from(
    _INSTANCE_T, _SERIES_T).where(_INSTANCE_T.c.sop_instance_uid == bindparam("uid"))
_SERIES_STUDY = select(_SERIES_T.c.study_instance_uid).where(
    _SERIES_T.c.series_instance_uid == bindparam("uid"))


class StoreUnavailable(RuntimeError):
    """The job store cannot record anything now (its file is gone or was replaced)."""


class Recorded(enum.Enum):
    """What record_instance made of an instance (true only when it is new)."""

    new = "recorded"
    stored_already = "stored already"
    other_series = "its SOP Instance UID is stored already, in another series"
    other_study = "its Series Instance UID is recorded already, in another study"

    def __bool__(self) -> bool:
        return self is Recorded.new


@dataclass(frozen=True)
class ReceivedInstance:
    """What the receivers record of one instance."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    path: str
    size: int
    transfer_syntax_uid: str
    calling_aet: str = ""
    images_in_acquisition: int | None = None
    node: str = ""


class JobStore(Jobs, Deliveries, Assembly, Upkeep, Notices, Stats, Accounts, Console,
               Fleet):
    """The job store at ``url`` (SQLite file or server database).

    A SQLite file that disappears or is replaced under a running node (an
    admin's mistake, a full restore) would otherwise go on taking writes
    into the deleted file, which nobody will ever read: every transaction
    first checks that the file is still the one opened, else raises
    :class:`StoreUnavailable`.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._noting, self._noting_lock = set(), threading.Lock()     # (Accounts')
        self.file: Path | None = None
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            self.file = Path(url[len("sqlite:///"):]).absolute()
            self.file.parent.mkdir(parents=True, exist_ok=True)
        # a server database that restarted leaves dead pooled connections: test each
        self.engine: Engine = create_engine(url, future=True,
                                            pool_pre_ping=not url.startswith("sqlite"))
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            # Writers take the lock when their transaction begins: a transaction that
            # reads and then writes would otherwise fail at once under concurrency
            # (SQLite cannot wait on a lock upgrade), e.g. with 8 senders at a time.
            # Read-only transactions take no lock (WAL: they never block a writer).
            event.listen(self.engine, "begin", self._sqlite_begin)
        upgrade_schema(self.engine)
        self._identity = self._file_identity()
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._reader = self.engine.execution_options(**{_READ_ONLY: True})
        self._read_session = sessionmaker(self._reader, expire_on_commit=False)

    def _file_identity(self) -> tuple[int, int] | None:
        if self.file is None:
            return None
        try:
            st = os.stat(self.file)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _sqlite_begin(self, conn) -> None:
        if self.file is not None and getattr(self, "_identity", None) is not None \
                and self._file_identity() != self._identity:
            raise StoreUnavailable(f"the job store {self.file} is gone or was replaced "
                                   f"under the running node; restart the node")
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY)
                             else "BEGIN IMMEDIATE")

    def session(self) -> Session:
        """A session for reading and writing (on SQLite it holds the write lock)."""
        return self._session()

    def read_session(self) -> Session:
        """A session that only reads: it never waits for, or holds up, a writer."""
        return self._read_session()

    # --- receiving -----------------------------------------------------------
    def record_instance(self, item: ReceivedInstance,
                        place: Callable[[], None] | None = None) -> Recorded:
        """Record a received instance, or say why it was not (see :class:`Recorded`).

        ``place`` (moving the file into place) runs inside the transaction,
        after the rows are written and before they are committed: an
        instance that is stored already is never written again, and a file
        is in place when its row commits. (If the commit fails, the caller
        removes the file; a crash between the two leaves a file without a
        row, which the start-up reconciliation finds.)

        A new instance for a series that was finished reopens it (state
        receiving, version + 1), so it is analysed again.

        Two statements in the usual case, as this runs before every
        acknowledgement: the series row is updated (on a server database that
        locks it, so writers of one series take turns) and the instance
        inserted. A stored SOP Instance UID or a series another sender has
        just created violates a unique constraint: the transaction is rolled
        back, and either the instance is stored already, or its series is another
        study's (a Series Instance UID reused: refused, never merged), or it runs once
        more, now finding the series. (SQLite serialises all writers.)
        """
        tries = 2
        while True:
            try:
                self._record_instance(item, place)
                return Recorded.new
            except IntegrityError:
                with self._reader.connect() as conn:
                    stored_in = conn.execute(_INSTANCE_STORED,
                                             {"uid": item.sop_instance_uid}).scalar()
                    study = conn.execute(_SERIES_STUDY,
                                         {"uid": item.series_instance_uid}).scalar()
                if stored_in is not None:
                    return (Recorded.stored_already if stored_in == item.series_instance_uid
                            else Recorded.other_series)
                if study is not None and study != item.study_instance_uid:
                    return Recorded.other_study     # one series is never two studies' slices
                tries -= 1
                if not tries:
                    raise

    def _record_instance(self, item: ReceivedInstance, place: Callable[[], None] | None
                         ) -> None:
        # Core statements, compiled once: the ORM's unit of work costs more than the
        # rest of a C-STORE together.
        now = utcnow()
        with self.engine.begin() as conn:
            series_id = conn.execute(_SERIES_RECEIVED, {
                "uid": item.series_instance_uid, "study": item.study_instance_uid, "now": now,
                "expected": item.images_in_acquisition or None}).scalar()
            if series_id is None:
                series_id = conn.execute(_SERIES_T.insert().values(
                    series_instance_uid=item.series_instance_uid,
                    study_instance_uid=item.study_instance_uid, modality=item.modality,
                    calling_aet=item.calling_aet, first_received=now, last_received=now,
                    instance_count=1, expected_instances=item.images_in_acquisition or None,
                    node=item.node)).inserted_primary_key[0]
            conn.execute(_INSTANCE_INSERT, {
                "sop_instance_uid": item.sop_instance_uid, "sop_class_uid": item.sop_class_uid,
                "series_id": series_id, "path": item.path, "size": item.size,
                "transfer_syntax_uid": item.transfer_syntax_uid,
                "calling_aet": item.calling_aet, "received_at": now})
            if place is not None:
                place()

    def instance_paths(self, series_id: int) -> list[str]:
        with self.read_session() as s:
            return list(s.scalars(select(Instance.path).where(Instance.series_id == series_id)
                                  .order_by(Instance.id)))

    def instance_uids(self, series_id: int) -> set[str]:
        """The SOP Instance UIDs a series' instances were received (and filed) as."""
        with self.read_session() as s:
            return set(s.scalars(select(Instance.sop_instance_uid)
                                 .where(Instance.series_id == series_id)))

    # --- assembly (complete_ready, complete_studies: store.assembly) --------
    def skip_series(self, series_id: int, reason: str) -> None:
        with self.session() as s, s.begin():
            series = s.get(Series, series_id)
            series.state, series.reason = SeriesState.skipped, reason

    def instance_path_of(self, sop_instance_uid: str) -> str | None:
        with self.read_session() as s:
            return s.scalar(select(Instance.path).where(
                Instance.sop_instance_uid == sop_instance_uid))

    # --- reading -------------------------------------------------------------
    def jobs(self, state: str | None = None, limit: int = 200) -> list[Job]:
        """Jobs, newest first; ``failed`` also takes the jobs whose analysis is done but a
        delivery of which gave up (what an admin must act on)."""
        with self.read_session() as s:
            q = select(Job).order_by(Job.id.desc()).limit(limit)
            if state and JobState(state) == JobState.failed:
                q = q.where(or_(Job.state == JobState.failed, Job.deliveries.any(
                    Delivery.state == DeliveryState.failed)))
            elif state:
                q = q.where(Job.state == JobState(state))
            jobs = list(s.scalars(q))
            for j in jobs:  # load what the CLI shows before the session closes
                _ = j.series.series_instance_uid, list(j.results)
                for d in [*j.deliveries, *j.notifications]:
                    _ = list(d.attempt_log)
            return jobs

    def series(self, state: str | None = None) -> list[Series]:
        with self.read_session() as s:
            q = select(Series).order_by(Series.id)
            if state:
                q = q.where(Series.state == SeriesState(state))
            return list(s.scalars(q))

    def counts(self) -> dict[str, int]:
        with self.read_session() as s:
            return {"instances": s.scalar(select(func.count(Instance.id))),
                    "series": s.scalar(select(func.count(Series.id))),
                    "jobs": s.scalar(select(func.count(Job.id))),
                    "deliveries": s.scalar(select(func.count(Delivery.id)))}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # transactions begin in the "begin" event
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()

