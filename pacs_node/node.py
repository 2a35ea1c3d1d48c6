"""The node: receiver, assembly, job worker, delivery and retention, wired together.

Data flows one way: the receivers (DIMSE and STOW-RS) record instances in
the store; an assembly sweep (APScheduler) completes quiet series (or those
whose Images in Acquisition all arrived), filters them (CT, axial, no
localizer, at least ``min_slices``) and queues a job; one worker, holding
the model loaded once, runs queued jobs (loading, the engine, SR and SC
files) and queues a delivery per destination (:mod:`pacs_node.worker_process`: a
process of lower CPU priority, or a thread for an engine handed in); a
delivery sweep (:mod:`pacs_node.outbound`) sends due deliveries and schedules
retries with backoff; a retention sweep deletes old, delivered data. Receiving never
waits for the model.

After a crash nothing is lost: instances are on disk and in the store before
they are acknowledged, half-received series complete after a restart, and
jobs that were running run again. One node owns its data folder: ``start``
takes the folder's lock (and the SQLite job store's, when it lies
elsewhere) before anything is recovered, so that a second node started on
it by mistake refuses to start and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import OperationalError

from config import NODE_ID_FILE, AssemblyTrigger, NodeConfig, UserIdentity
from pacs_node import one_line, stow
from pacs_node.choice import candidate, choose, header_filter
from pacs_node.layout import DataLayout, LockFile
from pacs_node.outbound import Outbound
from pacs_node.peers import PeerGate
from pacs_node.priority import priority_of
from pacs_node.receiver import Receiver
from pacs_node.reconcile import reconcile
from pacs_node.stow import StowService, stow_routes
from pacs_node.supervisor import WorkerSupervisor
from pacs_node.wado import wado_routes
from pacs_node.web.app import make_app
from pacs_node.web.auth import Doorkeeper
from pacs_node.web.console import console_routes
from pacs_node.web.health import health_routes
from pacs_node.web.metrics import NodeMetrics
from pacs_node.web.server import HttpServer
from pacs_node.worker import JobRunner, worker_gone
from pacs_node.worker_process import STOP_SECONDS
from store.api import JobStore, StoreUnavailable
from store.accounts import Role
from store.models import utcnow

log = logging.getLogger(__name__)

SWEEP_SECONDS = 1.0
#: A sweep that cannot use the job store (locked, gone) says so at most this often.
STORE_AWAY_LOG_SECONDS = 60.0


def _store_may_be_away(name: str, sweep):
    """``sweep``, saying in one line (at most once a minute) that the job store cannot be
    used now, and trying again at its next turn: a traceback every second while another
    process held the store's lock told an admin nothing more."""
    said = [-STORE_AWAY_LOG_SECONDS]

    def run() -> None:
        try:
            sweep()
        except (OperationalError, StoreUnavailable) as exc:
            now = time.monotonic()
            if now - said[0] >= STORE_AWAY_LOG_SECONDS:
                said[0] = now
                log.warning("the %s sweep cannot use the job store now (%s); it tries again "
                            "every %g s", name, one_line(getattr(exc, "orig", None) or exc),
                            SWEEP_SECONDS)
    return run


def _bind(key: str, host: str, port: int, start) -> None:
    """``start(host, port)``; an OSError names the key and the address."""
    try:
        start(host, port)
    except OSError as exc:
        raise OSError(f"{key} {port} on {host}: {exc.strerror or exc}") from None


class Node:
    """The node in one process: receivers, the sweeps (assembly, delivery, retention) and the
    worker (a supervised process, or a thread for an engine handed in). ``start`` takes the
    data folder and recovers; ``stop`` is safe after a failed start."""

    def __init__(self, config: NodeConfig, engine=None) -> None:
        """Build the node; nothing is touched on disk or the network before ``start``."""
        from pacs_node.security import UserDirectory, https_context, server_context

        self.config = config
        self.data_dir = config.data_dir
        self.layout = DataLayout(self.data_dir)
        self.node_id = config.node_id
        self.store = JobStore(config.store.url)
        self.engine = engine
        self.outbound = Outbound(self.store, config)
        node = config.node
        authenticate = (UserDirectory(node.users_file,
                                      node.user_identity == UserIdentity.required)
                        if node.user_identity != UserIdentity.none else None)
        self.receiver = Receiver(
            self.store, self.data_dir, node.ae_title, node.allowed_calling_aets,
            node.min_free_disk_mb, sync=node.fsync, node=self.node_id,
            max_associations=node.max_associations, timeout=node.timeout_seconds,
            max_associations_per_peer=node.max_associations_per_peer,
            gate=PeerGate(node.allowed_networks, node.max_unassociated,
                          node.max_unassociated_per_peer),
            tls=server_context(config.tls) if config.tls.enabled else None,
            authenticate=authenticate)
        web = config.http
        self.metrics = NodeMetrics(self)
        self.receiver.storage.on_outcome = self.metrics.count
        self.http_gate = (PeerGate(node.allowed_networks, web.max_connections,
                                   web.max_connections_per_peer) if web.port else None)
        self.door = Doorkeeper(self.store, https=bool(web.tls_certificate),
                               stow_anonymous=web.stow_anonymous,
                               metrics_anonymous=web.metrics_anonymous)
        stow_service = StowService(self.receiver.storage, web.max_request_mb)
        self.http = (HttpServer(make_app([
            *stow_routes(stow_service, lambda request: self.door.api(
                request, Role.sender, self.door.stow_anonymous)),
            *wado_routes(self, self.door, stow_service),
            *health_routes(self, self.door), *console_routes(self, self.door)],
            hsts_seconds=web.hsts_seconds),
            self.http_gate, header_seconds=stow.HEADER_SECONDS,
            idle_seconds=stow.IDLE_SECONDS,
            tls=(https_context(web.tls_certificate, web.tls_private_key)
                 if web.tls_certificate else None)) if web.port else None)
        logging.getLogger("apscheduler").setLevel(logging.ERROR)  # skipped ticks are normal
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True,
                                                           "max_instances": 1})
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._unfinished = True         # series a crash left complete: received again
        self.supervisor: WorkerSupervisor | None = None   # by start() without an engine
        self._thread: threading.Thread | None = None
        # a SQLite job store outside the data folder is locked too
        self._store_lock = (LockFile(self.store.file.with_name(self.store.file.name + ".lock"))
                            if self.store.file is not None
                            and self.layout.root not in self.store.file.resolve().parents
                            else None)

    @property
    def worker(self):
        """The worker process now running (None for an engine in a thread)."""
        return self.supervisor.worker if self.supervisor is not None else None

    @property
    def model(self):
        """The :class:`~inference.model_info.ModelInfo` of the model the worker runs."""
        if self.supervisor is not None:
            return self.supervisor.model
        return self.engine.model_info if self.engine is not None else None

    # --- life cycle ----------------------------------------------------------
    def start(self) -> None:
        """Take the data folder, recover, start the worker (a process that loads
        the model, unless an engine was given: then a thread), then receiving
        and the sweeps. A folder in use or a model that cannot be loaded stops
        the start before anything is changed or accepted."""
        self.layout.lock()
        if self._store_lock is not None:
            try:
                self._store_lock.acquire()
            except Exception:
                self.layout.unlock()
                raise
        node_id_file = self.layout.root / NODE_ID_FILE
        if not node_id_file.exists():          # this node's name in the job store, for good
            node_id_file.write_text(self.node_id + "\n", encoding="utf-8")
        removed = self.receiver.storage.clear_partial()
        if removed:
            log.info("%d partly received instance(s) removed (never acknowledged)", removed)
        reconcile(self.layout, self.store, self.node_id)
        requeued = self.store.requeue_interrupted(self.node_id, worker_gone)
        if requeued:
            log.warning("%d job(s) interrupted by a restart will run again", requeued)
        if self.engine is None and not self.config.worker.local:
            log.info("no local worker: jobs are run by `lungsys worker` processes")
        elif self.engine is None:
            self.supervisor = WorkerSupervisor(self.config, self.store)
            self.supervisor.start()
        else:
            self._thread = threading.Thread(
                target=JobRunner(self.config, self.store, self.engine).loop,
                args=(self._stop, self._wake), name="lungsys-worker", daemon=True)
            self._thread.start()
        _bind("node.port", self.config.node.host, self.config.node.port, self.receiver.start)
        if self.http is not None:
            _bind("http.port", self.config.http.host, self.config.http.port,
                  self.http.start)
        self.scheduler.add_job(_store_may_be_away("assembly", self.assembly_sweep),
                               "interval", seconds=SWEEP_SECONDS, id="assembly")
        self.scheduler.add_job(_store_may_be_away("delivery", self.outbound.delivery_sweep),
                               "interval", seconds=SWEEP_SECONDS, id="delivery")
        if self.config.notifications:
            self.scheduler.add_job(
                _store_may_be_away("notification", self.outbound.notification_sweep),
                "interval", seconds=SWEEP_SECONDS, id="notifications")
        if self.config.retention.days > 0:
            self.scheduler.add_job(self.retention_sweep, "interval", hours=1, id="retention")
        self.scheduler.start()
        self.wake_worker()

    def stop(self) -> None:
        """Stop receiving, the sweeps and the worker (it may finish its job for a
        while); safe to call on a node whose start failed half-way."""
        self._stop.set()
        self._wake.set()
        for step in (self.receiver.stop, self.http.stop if self.http is not None else None,
                     self._stop_scheduler):
            if step is None:
                continue
            try:
                step()
            except Exception as exc:
                log.warning("while stopping: %s", exc)
        if self.supervisor is not None:
            self.supervisor.stop()
        if self._thread is not None:
            self._thread.join(timeout=STOP_SECONDS)
        if self._store_lock is not None:
            self._store_lock.release()
        self.layout.unlock()

    def kill_worker(self) -> None:
        """End the worker at once (a second signal: the node is forced to stop)."""
        if self.supervisor is not None:
            self.supervisor.kill()

    def _stop_scheduler(self) -> None:
        if self.scheduler.running:
            # a delivery in progress is not waited for: it is sent again at the next start
            self.scheduler.shutdown(wait=False)

    @property
    def port(self) -> int:
        return self.receiver.port

    @property
    def stow_port(self) -> int:
        """The HTTP service's port (STOW-RS, health, metrics); 0 when off."""
        return self.http.port if self.http is not None else 0

    def not_ready(self) -> list[str]:
        """Why the node cannot take and process studies now (empty: it can)."""
        reasons = []
        try:
            self.store.ping()
        except Exception as exc:
            reasons.append(f"job store: {type(exc).__name__}")
        if not self.receiver.storage.has_room():
            reasons.append(f"free disk below the minimum of "
                           f"{self.config.node.min_free_disk_mb} MB")
        if self.engine is None and not self.config.worker.local:
            if not self.live_workers():
                reasons.append("no worker has been heard from within the lease "
                               f"({self.config.worker.lease_seconds:.0f} s)")
            return reasons
        if self.supervisor is not None:
            worker = self.supervisor.worker
            if self.supervisor.state != "ready" or worker is None or not worker.alive:
                reasons.append(f"worker {self.supervisor.state}"
                               if self.supervisor.state != "ready" else "worker not alive")
        elif self._thread is None or not self._thread.is_alive():
            reasons.append("worker not running")
        if self.model is None:
            reasons.append("no model loaded")
        return reasons

    def live_workers(self) -> list:
        """The workers of this node's series heard from within their lease."""
        cutoff = utcnow() - dt.timedelta(seconds=self.config.worker.lease_seconds)
        try:
            return [w for w in self.store.workers(self.node_id) if w.seen_at >= cutoff]
        except Exception:
            return []

    # --- assembly ------------------------------------------------------------
    def assembly_sweep(self) -> None:
        """Queue a job for each complete series (or, in study mode, for the series chosen
        in each complete study: :mod:`pacs_node.choice`); skip the others, saying why. A
        sweep that failed half-way (or a start-up) first has the series it completed but
        did not queue or skip received again, to be completed anew."""
        if self._unfinished:
            self.store.reopen_unfinished(node=self.node_id)
            self._unfinished = False
        try:
            self._assemble()
        except Exception:
            self._unfinished = True
            raise

    def _assemble(self) -> None:
        assembly = self.config.assembly
        if assembly.trigger == AssemblyTrigger.study:
            for group in self.store.complete_studies(assembly.study_stable_seconds,
                                                     node=self.node_id):
                candidates = [candidate(series, series.series_instance_uid,
                                        self.store.instance_paths(series.id),
                                        assembly.min_slices) for series in group]
                earlier = self.store.analysed_series(group[0].study_instance_uid,
                                                     self.node_id)
                if earlier is not None:     # one result per study: it has one already
                    chosen, others = None, [(c, f"another series of the study was analysed: "
                                                f"{earlier}") for c in candidates]
                else:
                    chosen, others = choose(candidates)
                for other, reason in others:
                    self.store.skip_series(other.key.id, reason)
                    log.info("series %s skipped: %s", other.series_instance_uid, reason)
                if chosen is not None:
                    log.info("study %s: series %s chosen (%s)", chosen.key.study_instance_uid,
                             chosen.series_instance_uid, chosen.describe())
                    self._queue(chosen.key, self.store.instance_paths(chosen.key.id))
            return
        for series in self.store.complete_ready(assembly.stable_seconds, node=self.node_id):
            paths = self.store.instance_paths(series.id)
            reason = header_filter(paths, assembly.min_slices)
            if reason:
                self.store.skip_series(series.id, reason)
                log.info("series %s skipped: %s", series.series_instance_uid, reason)
                continue
            self._queue(series, paths)

    def _queue(self, series, paths: list[str]) -> None:
        """Queue the job of a series to analyse, at the priority the rules give it."""
        priority = priority_of(self.config.priorities, series.calling_aet,
                               paths[0] if paths else None)
        job = self.store.queue_job(series.id, priority.rank)
        log.info("series %s from %s complete (%d instances): job %d queued (%s)",
                 series.series_instance_uid, series.calling_aet, len(paths), job.id, priority)
        self.wake_worker()

    # --- jobs ----------------------------------------------------------------
    def wake_worker(self) -> None:
        """A job was queued: the worker need not wait for its next look (never blocks)."""
        if self.supervisor is not None:
            self.supervisor.wake()
        self._wake.set()
        try:
            self.store.announce_jobs()          # workers elsewhere (PostgreSQL)
        except Exception as exc:                # they look every few seconds anyway
            log.debug("jobs not announced: %s", type(exc).__name__)

    # --- retention -----------------------------------------------------------
    def retention_sweep(self) -> None:
        """Remove the files of old series whose results were delivered, keeping the history.

        A series is removed under its guard (see :meth:`DataLayout.series_guard`) and
        only if it is still expired in the same transaction that forgets its rows: an
        instance received meanwhile reopens it, and nothing acknowledged is removed.
        """
        days = self.config.retention.days
        cutoff = utcnow() - dt.timedelta(days=days)
        for series in self.store.expired_series(cutoff, self.node_id):
            uid = series.series_instance_uid
            with self.layout.series_guard(uid):
                if not self.store.forget_series(series.id, cutoff):
                    continue                   # something arrived: not expired any more
                try:
                    self.layout.remove_series(series.study_instance_uid, uid)
                except (ValueError, OSError) as exc:   # left for the reconciliation to find
                    log.error("series %s: its files were not all removed: %s", uid[:64], exc)
                    continue
            log.info("series %s removed after %d days", uid, days)
        self.store.forget_incidents(cutoff)
