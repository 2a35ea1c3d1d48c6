"""The job store's upkeep: incidents for admins, start-up reconciliation, schema upgrades,
retention.

Kept apart from the hot path (receiving: :mod:`store.api`; jobs and deliveries:
:mod:`store.jobs`, :mod:`store.deliveries`):
what is here runs at start-up, hourly, on rare events, or for the admin commands.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Iterable

from sqlalchemy import Enum as SqlEnum, delete, inspect, select, text, update
from sqlalchemy.engine import Engine

from store.models import (Base, DeliveryState, Incident, IncidentKind, Instance, Series,
                          SeriesState, of_node, utcnow)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def upgrade_schema(engine: Engine) -> None:
    """Create missing tables, and add columns that later versions added to existing ones.

    Only additive changes with a server default are made (what a newer
    lungsys adds), so a job store written by an older node keeps working.
    """
    Base.metadata.create_all(engine)
    # PostgreSQL: two nodes starting at once must not both fail on the same column
    maybe = "IF NOT EXISTS " if engine.dialect.name == "postgresql" else ""
    with engine.begin() as conn:
        inspector = inspect(conn)
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present or column.server_default is None:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                default = column.server_default.arg
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {maybe}{column.name} "
                                  f"{kind} NOT NULL DEFAULT '{default}'"))
            for index in table.indexes:        # those of the columns just added
                index.create(conn, checkfirst=True)
    if engine.dialect.name == "postgresql":    # values a newer lungsys added to an Enum
        _add_enum_values(engine)


def _add_enum_values(engine: Engine) -> None:
    """PostgreSQL keeps an Enum column's values in a type of its own: add those missing."""
    wanted = {column.type.name: column.type.enums for table in Base.metadata.sorted_tables
              for column in table.columns if isinstance(column.type, SqlEnum)}
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        have: dict[str, set[str]] = {}
        for name, label in conn.execute(text(
                "SELECT t.typname, e.enumlabel FROM pg_type t JOIN pg_enum e "
                "ON e.enumtypid = t.oid")):
            have.setdefault(name, set()).add(label)
        for name, values in wanted.items():
            for value in values:
                if name in have and value not in have[name]:
                    conn.execute(text(f"ALTER TYPE {name} ADD VALUE IF NOT EXISTS '{value}'"))


def _fit(value: str, size: int = 64) -> str:
    """A sender's value made safe to record: printable, cut to ``size`` characters."""
    return "".join(c if c.isprintable() else "?" for c in str(value))[:size]


class Upkeep:
    """Mixed into :class:`store.api.JobStore` (needs ``session`` and ``read_session``)."""

    def session(self) -> "Session": ...          # provided by JobStore
    def read_session(self) -> "Session": ...     # provided by JobStore

    # --- incidents -------------------------------------------------------------
    def record_incident(self, kind: IncidentKind, detail: str, *, node: str = "",
                        origin: str = "", series_instance_uid: str = "",
                        sop_instance_uid: str = "", job_id: int | None = None) -> None:
        """Record what an admin should see; values from senders are cut and made printable."""
        with self.session() as s, s.begin():
            s.add(Incident(kind=kind, detail=_fit(detail, 2000), node=_fit(node),
                           origin=_fit(origin), series_instance_uid=_fit(series_instance_uid),
                           sop_instance_uid=_fit(sop_instance_uid), job_id=job_id))

    def incidents(self, kind: str | None = None, limit: int = 200) -> list[Incident]:
        """Newest first."""
        with self.read_session() as s:
            q = select(Incident).order_by(Incident.id.desc()).limit(limit)
            if kind:
                q = q.where(Incident.kind == IncidentKind(kind))
            return list(s.scalars(q))

    def forget_incidents(self, before: dt.datetime) -> int:
        with self.session() as s, s.begin():
            return s.execute(delete(Incident).where(Incident.at < before)).rowcount

    # --- start-up reconciliation -----------------------------------------------
    def recorded_paths(self, node: str) -> dict[str, int]:
        """Path -> instance id of every instance this node holds (series not purged)."""
        with self.read_session() as s:
            rows = s.execute(select(Instance.path, Instance.id).join(Series).where(
                Series.purged.is_(False), of_node(node)))
            return {path: id_ for path, id_ in rows}

    def forget_lost(self, instance_ids: Iterable[int], node: str) -> list[tuple[str, str]]:
        """Instances whose files are gone: their rows are removed (so that the
        instance can be sent again), their series count one fewer, and each is
        recorded as a ``lost`` incident. Returns their (series, SOP) UIDs."""
        lost = []
        with self.session() as s, s.begin():
            for id_ in instance_ids:
                instance = s.get(Instance, id_)
                if instance is None:
                    continue
                series = instance.series
                lost.append((series.series_instance_uid, instance.sop_instance_uid))
                s.execute(update(Series).where(Series.id == series.id).values(
                    instance_count=Series.instance_count - 1, updated_at=utcnow()))
                s.add(Incident(kind=IncidentKind.lost, node=node, origin=instance.calling_aet,
                               series_instance_uid=series.series_instance_uid,
                               sop_instance_uid=instance.sop_instance_uid,
                               detail=f"recorded, but its file {instance.path} was gone at "
                                      f"start-up; send it again"))
                s.delete(instance)
        return lost

    # --- retention -----------------------------------------------------------
    def expired_series(self, cutoff: dt.datetime, node: str = "") -> list[Series]:
        """This node's finished series last touched before ``cutoff`` whose deliveries
        all succeeded."""
        with self.read_session() as s:
            candidates = s.scalars(select(Series).where(
                Series.purged.is_(False), Series.last_received < cutoff,
                of_node(node),
                Series.state.in_([SeriesState.done, SeriesState.skipped, SeriesState.failed])))
            out = []
            for series in candidates:
                pending = [d for j in series.jobs for d in j.deliveries
                           if d.state != DeliveryState.done]
                if not pending:
                    out.append(series)
            return out

    def forget_series(self, series_id: int, cutoff: dt.datetime) -> bool:
        """Retention: drop the instance and result rows of a series that is still
        expired (nothing arrived since ``cutoff``), keep the history. False when it
        is not expired any more (the caller then leaves its files alone)."""
        with self.session() as s, s.begin():
            series = s.get(Series, series_id)
            if series is None or series.purged or series.last_received >= cutoff \
                    or series.state not in (SeriesState.done, SeriesState.skipped,
                                            SeriesState.failed):
                return False
            for instance in list(series.instances):
                s.delete(instance)
            for job in series.jobs:
                for result in list(job.results):
                    s.delete(result)
            series.purged = True
            return True
