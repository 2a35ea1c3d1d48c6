"""The node: receiver, assembly, job worker, delivery and retention, wired together.

Data flows one way: the receivers (DIMSE and STOW-RS) record instances in
the store; an assembly sweep (APScheduler) completes quiet series (or those
whose Images in Acquisition all arrived), filters them (CT, axial, no
localizer, at least ``min_slices``) and queues a job; one worker, holding
the model loaded once, runs queued jobs (loading, the engine, SR and SC
files) and queues a delivery per destination (:mod:`pacs_node.worker`: a
process of lower CPU priority, or a thread for an engine handed in); a
delivery sweep sends due deliveries and schedules retries with backoff; a
retention sweep deletes old, delivered data. Receiving never waits for the
model.

After a crash nothing is lost: instances are on disk and in the store before
they are acknowledged, half-received series complete after a restart, and
jobs that were running run again.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
from apscheduler.schedulers.background import BackgroundScheduler

from config import NodeConfig
from inference.series import scan
from pacs_node import delivery
from pacs_node.receiver import Receiver
from pacs_node.stow import StowServer
from pacs_node.worker import STOP_SECONDS, JobRunner, WorkerProcess, model_info
from store.api import JobStore
from store.models import utcnow

log = logging.getLogger(__name__)

SWEEP_SECONDS = 1.0


def header_filter(paths: list[str], min_slices: int) -> str | None:
    """Why a complete series is not analysed (from its headers), or None."""
    groups, skipped = scan(paths)
    if not groups:
        reasons = sorted({s.reason for s in skipped})
        return "; ".join(reasons) or "no CT image"
    members = next(iter(groups.values()))
    if len(members) < min_slices:
        return f"{len(members)} slices, fewer than the minimum of {min_slices}"
    orientation = members[0][1].get("ImageOrientationPatient")
    if orientation is not None and len(orientation) == 6:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        if abs(normal[2]) < 0.9 * np.linalg.norm(normal):
            return "not an axial series"
    return None


class Node:
    def __init__(self, config: NodeConfig, engine=None) -> None:
        self.config = config
        self.data_dir = config.data_dir
        self.store = JobStore(config.store["url"])
        self.engine = engine
        self.receiver = Receiver(self.store, self.data_dir, config.node["ae_title"],
                                 config.node["allowed_calling_aets"],
                                 config.node["min_free_disk_mb"], sync=config.node["fsync"])
        self.stow = (StowServer(self.receiver.storage, config.dicomweb["max_request_mb"])
                     if config.dicomweb["port"] else None)
        logging.getLogger("apscheduler").setLevel(logging.ERROR)  # skipped ticks are normal
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True,
                                                           "max_instances": 1})
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.worker: WorkerProcess | None = None     # started by start() without an engine
        self._thread: threading.Thread | None = None

    @property
    def model(self) -> dict:
        """The model the worker runs: version, device, intended use."""
        if self.worker is not None:
            return self.worker.model
        return model_info(self.engine) if self.engine is not None else {}

    # --- life cycle ----------------------------------------------------------
    def start(self) -> None:
        """Start the worker (a process that loads the model, unless an engine was
        given: then a thread), then receiving and the sweeps. A model that
        cannot be loaded stops the start before anything is accepted."""
        requeued = self.store.requeue_interrupted()
        if requeued:
            log.warning("%d job(s) interrupted by a restart will run again", requeued)
        if self.engine is None:
            self.worker = WorkerProcess(self.config)
            self.worker.start()
        else:
            self._thread = threading.Thread(
                target=JobRunner(self.config, self.store, self.engine).loop,
                args=(self._stop, self._wake), name="lungsys-worker", daemon=True)
            self._thread.start()
        self.receiver.start(self.config.node["host"], self.config.node["port"])
        if self.stow is not None:
            self.stow.start(self.config.node["host"], self.config.dicomweb["port"])
        self.scheduler.add_job(self.assembly_sweep, "interval", seconds=SWEEP_SECONDS,
                               id="assembly")
        self.scheduler.add_job(self.delivery_sweep, "interval", seconds=SWEEP_SECONDS,
                               id="delivery")
        if self.config.retention["days"] > 0:
            self.scheduler.add_job(self.retention_sweep, "interval", hours=1, id="retention")
        self.scheduler.start()
        self.wake_worker()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.receiver.stop()
        if self.stow is not None:
            self.stow.stop()
        self.scheduler.shutdown(wait=True)
        if self.worker is not None:
            self.worker.stop()
        if self._thread is not None:
            self._thread.join(timeout=STOP_SECONDS)

    @property
    def port(self) -> int:
        return self.receiver.port

    @property
    def stow_port(self) -> int:
        return self.stow.port if self.stow is not None else 0

    # --- assembly ------------------------------------------------------------
    def assembly_sweep(self) -> None:
        for series in self.store.complete_ready(self.config.assembly["stable_seconds"]):
            paths = self.store.instance_paths(series.id)
            reason = header_filter(paths, self.config.assembly["min_slices"])
            if reason:
                self.store.skip_series(series.id, reason)
                log.info("series %s skipped: %s", series.series_instance_uid, reason)
                continue
            job = self.store.queue_job(series.id)
            log.info("series %s complete (%d instances): job %d queued",
                     series.series_instance_uid, len(paths), job.id)
            self.wake_worker()

    # --- jobs ----------------------------------------------------------------
    def wake_worker(self) -> None:
        """A job was queued: the worker need not wait for its next look."""
        if self.worker is not None:
            self.worker.wake()
        self._wake.set()

    # --- delivery ------------------------------------------------------------
    def delivery_sweep(self) -> None:
        destinations = {d.name: d for d in self.config.destinations}
        cfg = self.config.delivery
        for d in self.store.due_deliveries():
            dest = destinations.get(d.destination)
            if dest is None:
                self.store.record_attempt(d.id, ok=False, give_up=True,
                                          error=f"destination {d.destination!r} is no longer "
                                                f"configured")
                continue
            files = [Path(p) for p in self.store.result_paths(d.job_id)]
            try:
                delivery.send(dest, files, self.config.node["ae_title"])
            except Exception as exc:
                attempts = d.attempts + 1
                give_up = attempts >= cfg["max_attempts"]
                retry_at = utcnow() + delivery.backoff(attempts, cfg["initial_backoff_seconds"],
                                                       cfg["max_backoff_seconds"])
                self.store.record_attempt(d.id, ok=False, error=str(exc)[:2000],
                                          retry_at=retry_at, give_up=give_up)
                log.warning("delivery %d to %s failed (attempt %d): %s", d.id, dest.name,
                            attempts, exc)
                continue
            self.store.record_attempt(d.id, ok=True)
            log.info("delivery %d to %s done (%d objects)", d.id, dest.name, len(files))

    # --- retention -----------------------------------------------------------
    def retention_sweep(self) -> None:
        cutoff = utcnow() - dt.timedelta(days=self.config.retention["days"])
        for series in self.store.expired_series(cutoff):
            for folder in (self.data_dir / "incoming" / series.study_instance_uid
                           / series.series_instance_uid,
                           self.data_dir / "results" / series.study_instance_uid
                           / series.series_instance_uid):
                shutil.rmtree(folder, ignore_errors=True)
            self.store.forget_series(series.id)
            log.info("series %s removed after %d days", series.series_instance_uid,
                     self.config.retention["days"])

