"""The job runner: runs queued jobs with the model, loaded once.

A job is a complete series: it is loaded from its received instances,
analysed by the engine, written as the result objects under
``data_dir/results/STUDY/SERIES/vN/aK`` (version N of the series, its K-th
claim), recorded with its timings, and a delivery is queued for each
destination, in one transaction. Where the instances are read and the results
left is the runner's :mod:`pacs_node.exchange`: the node's data folder, or the
node over HTTP for a worker with a folder of its own.

:class:`JobRunner` is the loop of every worker: in ``lungsys serve``'s own
process (:mod:`pacs_node.worker_process`), in a thread for an engine handed in
(tests, embedding), or in ``lungsys worker`` on another machine
(:mod:`pacs_node.remote`). Each names itself in the job store and holds the
job it runs with a lease its heartbeat renews (:mod:`pacs_node.lease`): a
worker that goes away has its job taken back, and only the worker holding a
job records its outcome.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from pathlib import Path
from typing import Callable, Protocol

import pydicom

from config import NodeConfig, NotificationEvent, Priority
from pacs_node import notify, one_line
from inference.errors import SeriesError
from inference.series import load_series
from pacs_node.exchange import HandOverError, SharedFolder
from pacs_node.joblog import JobLog
from pacs_node.lease import Heartbeat
from pacs_node.layout import DataLayout
from store.api import JobStore
from store.jobs import LeaseLost
from store.models import Job, JobState, Series, utcnow

log = logging.getLogger(__name__)


class _Event(Protocol):
    def is_set(self) -> bool: ...
    def set(self) -> None: ...
    def clear(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class JobRunner:
    """Takes queued jobs from the store and runs them with ``engine``."""

    def __init__(self, config: NodeConfig, store: JobStore, engine,
                 on_job: Callable[[int | None], None] | None = None, name: str = "",
                 node_id: str = "", exchange=None, remote: bool = False) -> None:
        """``node_id``: whose jobs (default: the node of ``config``'s data folder);
        ``exchange``: where instances and results are (default: that data folder,
        :class:`~pacs_node.exchange.SharedFolder`); ``remote``: a worker beside the node
        (``lungsys worker``), whose outcomes the node routes by its own configuration
        (deliveries, notifications) rather than by this one's."""
        self.config = config
        self.store = store
        self.engine = engine
        self.layout = DataLayout(config.data_dir)
        # read once (config.node_id reads data_dir/node-id)
        self.node_id = node_id or config.node_id
        self.on_job = on_job or (lambda job_id: None)
        self.name = name or worker_name(os.getpid())
        self.exchange = exchange or SharedFolder(store, self.layout)
        self.remote = remote
        self._other = None      # (checkpoint, method) and the engine of the last re-run
        self._journal: JobLog | None = None    # the running job's log

    def loop(self, stop: _Event, wake: _Event) -> None:
        """Run jobs until ``stop``; sleep until ``wake`` (or 5 s) when none is queued.
        The worker names itself in the job store, and holds each job it runs with a
        lease its heartbeat renews (:mod:`pacs_node.lease`); jobs whose worker stopped
        renewing are taken back first."""
        lease = self.config.worker.lease_seconds
        info = getattr(self.engine, "model_info", None)
        try:
            self.store.register_worker(self.name, _device_label(getattr(info, "device", "")),
                                       self.node_id, getattr(info, "version", ""))
        except Exception as exc:         # the job store is away: the claims will say so
            log.error("the worker cannot register: %s", one_line(exc))
        heart = Heartbeat(self.store, self.name, lease).start()
        try:
            self._loop(stop, wake, heart)
        finally:
            heart.stop()
            try:
                self.store.forget_worker(self.name)
            except Exception:
                log.debug("the worker could not leave the job store")

    def _loop(self, stop: _Event, wake: _Event, heart: Heartbeat) -> None:
        while not stop.is_set():
            try:
                for job_id, state in self.store.reclaim_expired(
                        self.node_id, self.config.worker.max_attempts):
                    log.warning("job %d: its worker stopped answering; %s", job_id,
                                "queued again" if state == JobState.queued else "failed")
                    if state == JobState.failed:
                        self._failure_told(job_id)
                job = self.claim()
            except Exception as exc:     # the job store is away: try again later
                log.error("the worker cannot take a job: %s", one_line(exc))
                job = None
            if job is None:
                wake.wait(timeout=5)
                wake.clear()
                continue
            heart.running(job.id)
            self.on_job(job.id)
            journal = self._journal = JobLog()
            try:
                with journal:
                    try:
                        self.run_job(job)
                    except HandOverError as exc:    # the node away: the job runs again
                        self._give_back(job, exc)
                    except Exception as exc:  # a file gone, the job store away: the job
                        self._failed(job.id, exc, job.worker)   # fails, the worker goes on
                    finally:
                        self._clean(job)
            finally:
                heart.running(None)
                self.on_job(None)
                self._journal = None
                try:
                    self.store.set_job_log(job.id, journal.text(), job.worker)
                except Exception:        # the job store is away: the log line is enough
                    log.debug("job %d: its log could not be recorded", job.id)

    def claim(self) -> Job | None:
        """The next job for this worker: urgent before normal, offpeak only within
        ``[worker] offpeak_hours``, oldest first within a priority."""
        most = Priority.offpeak if self.config.worker.offpeak_now() else Priority.normal
        return self.store.claim_job(self.node_id, self.name, self.config.worker.lease_seconds,
                                    max_priority=most.rank)

    def _failed(self, job_id: int, exc: Exception, worker: str | None = None) -> None:
        """Fail a job. The message may quote a value of the source (a patient's name or
        birth date): the log above DEBUG and the job's error say only what and where."""
        where = traceback.extract_tb(exc.__traceback__)[-1]
        error = f"{type(exc).__name__} in {Path(where.filename).name}:{where.lineno} " \
                f"({where.name})"
        log.error("job %d failed: %s", job_id, error)
        log.debug("job %d: %s", job_id, exc, exc_info=True)
        try:
            self.store.fail_job(job_id, error, worker=worker, to_route=self.remote,
                                log=self._log())
        except LeaseLost as exc:
            log.warning("%s", exc)
            return
        except Exception as again:
            log.error("job %d could not be marked failed: %s", job_id, type(again).__name__)
            return
        if not self.remote:
            notify.queue(self.store, self.config, job_id, NotificationEvent.job_failed)

    def _failure_told(self, job_id: int) -> None:
        """A job failed without its worker (given up): its node notifies (see __init__)."""
        if not self.remote:
            notify.queue(self.store, self.config, job_id, NotificationEvent.job_failed)
            return
        try:
            self.store.route_later(job_id)
        except Exception as exc:         # the job store is away: the failure itself stands
            log.error("job %d: its failure is not told: %s", job_id, type(exc).__name__)

    def _give_back(self, job: Job, exc: HandOverError) -> None:
        """Instances or results could not cross to or from the node: what reached the node
        is removed, and the job is queued again (its attempt counted; failed after
        ``[worker] max_attempts``)."""
        log.error("job %d: %s", job.id, exc)
        self.exchange.discard(job)
        try:
            state = self.store.abandon_job(job.id, f"the worker {job.worker} could not reach "
                                                   f"the node: {exc}",
                                           self.config.worker.max_attempts, worker=job.worker)
        except Exception as again:
            log.error("job %d could not be given back: %s", job.id, type(again).__name__)
            return
        if state == JobState.failed:
            self._failure_told(job.id)

    def _log(self) -> str | None:
        """The running job's log so far, recorded with its outcome (the lines after it, such
        as "done", follow when the run ends)."""
        return self._journal.text() if self._journal is not None else None

    def _clean(self, job: Job) -> None:
        try:
            self.exchange.finished(job)
        except Exception as exc:           # (OSError; OutsideDataDir: a link out of it)
            log.warning("job %d: its work folder stays: %s", job.id, exc)

    def _skip(self, job: Job, exc: SeriesError) -> None:
        """A series the model cannot take (too few slices, no CT): skipped, with why."""
        try:
            self.store.fail_job(job.id, f"skipped: {exc}", worker=job.worker, log=self._log())
        except LeaseLost as lost:
            log.warning("%s", lost)
            return
        self.store.skip_series(job.series_id, str(exc))
        log.info("job %d: series skipped: %s", job.id, exc)

    def _engine_for(self, job: Job):
        """The node's engine, or one for the model and method a re-run asked for (the last
        such is kept: re-runs of several series with one choice load it once)."""
        if not job.checkpoint and not job.method:
            return self.engine
        key = (job.checkpoint, job.method)
        if self._other is None or self._other[0] != key:
            from inference.engine import Engine
            self._other = None          # the earlier one freed before the next is loaded
            self._other = (key, Engine(
                job.checkpoint or self.engine.model, device=self.config.model.device,
                batch_size=self.config.model.batch_size,
                method=job.method or self.engine.method, mirror=self.config.model.mirror))
        return self._other[1]

    def run_job(self, job: Job) -> None:
        from inference.export import write_results   # torch: only where the model runs
        from inference.profiles import CLASSES

        series: Series = job.series
        started = utcnow()
        log.info("job %d: series %s (version %d), %d instance(s) from %s", job.id,
                 series.series_instance_uid, job.version, series.instance_count,
                 series.calling_aet or "STOW-RS")
        try:
            # read as pydicom reads them, the files must be the series, study and SOP
            # instances they were received as (the receiver refuses data sets it would read
            # otherwise; this is the second lock on that door)
            data = load_series(self.exchange.instances(job), series.series_instance_uid)
            if data.study_instance_uid != series.study_instance_uid:
                raise SeriesError("its instances read as another study than the one they "
                                  "were received as")
            filed = self.store.instance_uids(series.id)
            if any(s.sop_instance_uid not in filed for s in data.slices):
                raise SeriesError("its instances read as SOP instances other than the ones "
                                  "they were received as")
        except SeriesError as exc:
            self._skip(job, exc)
            return
        try:
            if len(data) < self.config.assembly.min_slices:
                raise SeriesError(f"{len(data)} slices, fewer than the minimum of "
                                  f"{self.config.assembly.min_slices}")
            engine = self._engine_for(job)
            info = getattr(engine, "model_info", None)
            if info is not None and info.advice:  # each job says it (a re-run's model too)
                log.warning("job %d: model %s: %s", job.id, info.version, info.advice)
            log.info("job %d: %d slices loaded", job.id, len(data))
            result = engine.analyze(data)
            out = self.exchange.results_folder(job)
            files = write_results(result, data, out, heatmaps=self.config.model.heatmaps,
                                  objects=self.config.results.objects,
                                  seg_compression=self.config.results.seg_compression)
        except SeriesError as exc:
            self._skip(job, exc)
            return
        except Exception as exc:
            self._failed(job.id, exc, job.worker)
            return
        records = []
        for kind, path in files.kinds():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            records.append({"kind": str(kind),
                            "sop_instance_uid": str(ds.SOPInstanceUID),
                            "sop_class_uid": str(ds.SOPClassUID),
                            "series_instance_uid": str(ds.SeriesInstanceUID),
                            "path": str(path)})
        timings = dict(result.timings)
        try:
            records = self.exchange.publish(job, records)
            timings["total"] = (utcnow() - started).total_seconds()
            self.store.finish_job(
                job.id, diagnosis=result.diagnosis,
                probabilities={c: float(p) for c, p in zip(CLASSES, result.probabilities)},
                infected_fraction=float(result.infected_fraction), timings=timings,
                model_version=result.model.version, device_uid=result.model.device_uid,
                caution=result.model.caution,
                results=records, worker=job.worker,   # the claim this run holds
                deliveries=[] if self.remote else [(d.name, d.kind)
                                                   for d in self.config.destinations],
                to_route=self.remote, log=self._log())
        except LeaseLost as exc:            # another worker runs it now: ours are void
            log.warning("%s; its results here are removed", exc)
            self.exchange.discard(job)
            return
        if not self.remote:
            notify.queue(self.store, self.config, job.id, NotificationEvent.job_done)
        log.info("job %d done in %.1f s: %s (p=%.2f), %d lesion slice(s), %d result object(s); "
                 "model %s, method %s", job.id, timings["total"], result.diagnosis,
                 float(result.probabilities[result.diagnosis_index]),
                 len(result.lesion_slices), len(records), result.model.version,
                 getattr(result.method, "value", result.method))


def worker_name(pid: int) -> str:
    """A worker's name in the job store: its host and process."""
    return f"{socket.gethostname()[:100]}:{pid}"


def worker_gone(name: str) -> bool:
    """Whether the worker of that name is not running: its process, when on this host, has
    ended (a worker on another host is judged by its lease instead)."""
    host, _, pid = name.rpartition(":")
    if host != socket.gethostname()[:100] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:             # a process of another user: alive
        return False
    return False


def _device_label(device: str) -> str:
    """The device as the console shows a worker's: ``cuda:0 (NVIDIA H200)``, ``cpu``."""
    if not device.startswith("cuda"):
        return device
    import torch

    try:
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    except Exception:                   # a device the driver cannot name
        return device


def load_engine(config: NodeConfig):
    """The engine the configuration names (the shipped model when none is given), with
    this process's CPU threads set as ``[model] threads`` says (0: PyTorch's default, one
    per core; several workers on one machine each want their share, or they slow each
    other down: docs/scale.md)."""
    import torch

    from inference.checkpoint import default_model
    from inference.engine import Engine

    model = config.model
    if model.threads:
        torch.set_num_threads(model.threads)
    return Engine(model.checkpoint or default_model(), device=model.device,
                  batch_size=model.batch_size, method=model.method, mirror=model.mirror)
