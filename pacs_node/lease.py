"""A worker's heartbeat: its claim on the job it runs renewed while it is alive.

A thread of the worker tells the job store every third of ``[worker]
lease_seconds`` that it is alive and which job it runs (:meth:`store.fleet.Fleet.
heartbeat`); the job's lease is extended each time. A worker that dies, hangs in
a native library without releasing the interpreter, or loses the job store stops
renewing, and the job is taken back once the lease has expired. A heartbeat
that finds the job no longer held says so: the worker's outcome will not be
recorded (another worker took the job over).
"""

from __future__ import annotations

import logging
import threading

from pacs_node import one_line

log = logging.getLogger(__name__)


class Heartbeat:
    """Renews ``name``'s lease on its current job in a daemon thread."""

    def __init__(self, store, name: str, lease_seconds: float) -> None:
        self.store = store
        self.name = name
        self.lease_seconds = lease_seconds
        self.job_id: int | None = None
        self.lost = threading.Event()          # the current job was taken over
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lungsys-heartbeat",
                                        daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def running(self, job_id: int | None) -> None:
        """The worker took ``job_id`` (None: it is between jobs)."""
        self.job_id = job_id
        self.lost.clear()

    def beat(self) -> None:
        job_id = self.job_id
        try:
            held = self.store.heartbeat(self.name, job_id, self.lease_seconds)
        except Exception as exc:            # the job store is away: the lease runs on
            log.warning("heartbeat of %s not recorded: %s", self.name, one_line(exc))
            return
        if not held and job_id is not None and job_id == self.job_id \
                and not self.lost.is_set():
            log.warning("job %d is no longer held by %s (its lease expired): its outcome "
                        "here will not be recorded", job_id, self.name)
            self.lost.set()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class JobBell:
    """Wakes an idle worker the moment its node queues a job: PostgreSQL's ``LISTEN`` on
    :data:`store.fleet.JOBS_CHANNEL` in a daemon thread, which sets ``wake`` at each
    ``NOTIFY`` (:meth:`store.fleet.Fleet.announce_jobs`). Without it (SQLite, or the
    connection lost for a while) the worker looks every 5 s, as before."""

    def __init__(self, url: str, wake: threading.Event) -> None:
        from sqlalchemy.engine import make_url

        self.conninfo = make_url(url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        self.wake = wake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lungsys-job-bell",
                                        daemon=True)

    def start(self) -> "JobBell":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import psycopg

        from store.fleet import JOBS_CHANNEL

        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=10) as c:
                    c.execute(f"LISTEN {JOBS_CHANNEL}")
                    while not self._stop.is_set():
                        for _ in c.notifies(timeout=1.0, stop_after=1):
                            self.wake.set()
            except psycopg.Error as exc:
                log.debug("job bell: %s", one_line(exc))
                self._stop.wait(5)
