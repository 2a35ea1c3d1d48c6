"""The job worker: runs queued jobs with the model, loaded once.

A job is a complete series: it is loaded from its received instances,
analysed by the engine, written as an SR and SC heatmaps under
``data_dir/results/STUDY/SERIES/vN``, recorded with its timings, and a
delivery is queued for each destination.

``lungsys serve`` runs the worker in a process of its own (:class:`WorkerProcess`)
at a lower CPU priority (nice +10): a model on the CPU would otherwise take
the cores, and the interpreter lock, from the receiver, which must go on
taking instances at full speed while a model runs. The process loads the
model once, takes jobs from the job store (all state is there, so nothing
else crosses between the processes), dies with the node (a SIGKILLed node
leaves no worker behind; its interrupted job runs again at the next start)
and is woken when a job is queued. :class:`JobRunner` is the same loop in a
thread, for an engine object handed in (tests, embedding).

The node supervises its worker (:mod:`pacs_node.supervisor`): nothing
between them can be wedged by a dead process. The node wakes the worker by
writing a byte to a non-blocking pipe (a write to a dead or busy worker is
dropped, never waited on) and stops it with SIGTERM (it finishes its job
first); the worker says which job it runs over a pipe of its own, and its
death is seen on its process sentinel.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import select
import signal
import threading
import traceback
from pathlib import Path
from typing import Callable, Protocol

import pydicom

from config import NodeConfig, NotificationEvent
from pacs_node import notify
from inference.errors import SeriesError
from inference.model_info import ModelInfo
from inference.series import load_series
from pacs_node import configure_logging
from pacs_node.joblog import JobLog
from pacs_node.layout import DataLayout
from store.api import JobStore
from store.models import Job, Series, utcnow

log = logging.getLogger(__name__)

#: How much lower the worker process's CPU priority is than the node's.
NICENESS = 10
#: How long a stopping node waits for the job in progress before ending it.
STOP_SECONDS = 30.0
#: How long the node waits for the worker process to load the model.
LOAD_SECONDS = 600.0


class _Event(Protocol):
    def is_set(self) -> bool: ...
    def set(self) -> None: ...
    def clear(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class JobRunner:
    """Takes queued jobs from the store and runs them with ``engine``."""

    def __init__(self, config: NodeConfig, store: JobStore, engine,
                 on_job: Callable[[int | None], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self.layout = DataLayout(config.data_dir)
        self.node_id = config.node_id       # read once (config.node_id reads data_dir/node-id)
        self.on_job = on_job or (lambda job_id: None)
        self._other = None      # (checkpoint, method) and the engine of the last re-run

    def loop(self, stop: _Event, wake: _Event) -> None:
        """Run jobs until ``stop``; sleep until ``wake`` (or 5 s) when none is queued."""
        while not stop.is_set():
            try:
                job = self.store.claim_job(self.node_id)
            except Exception as exc:     # the job store is away: try again later
                log.error("the worker cannot take a job: %s", str(exc).splitlines()[0][:300])
                job = None
            if job is None:
                wake.wait(timeout=5)
                wake.clear()
                continue
            self.on_job(job.id)
            journal = JobLog()
            try:
                with journal:
                    try:
                        self.run_job(job)
                    except Exception as exc:  # a file gone, the job store away: the job
                        self._failed(job.id, exc)   # fails, the worker goes on
            finally:
                self.on_job(None)
                try:
                    self.store.set_job_log(job.id, journal.text())
                except Exception:        # the job store is away: the log line is enough
                    log.debug("job %d: its log could not be recorded", job.id)

    def _failed(self, job_id: int, exc: Exception) -> None:
        """Fail a job. The message may quote a value of the source (a patient's name or
        birth date): the log above DEBUG and the job's error say only what and where."""
        where = traceback.extract_tb(exc.__traceback__)[-1]
        error = f"{type(exc).__name__} in {Path(where.filename).name}:{where.lineno} " \
                f"({where.name})"
        log.error("job %d failed: %s", job_id, error)
        log.debug("job %d: %s", job_id, exc, exc_info=True)
        try:
            self.store.fail_job(job_id, error)
        except Exception as again:
            log.error("job %d could not be marked failed: %s", job_id, type(again).__name__)
            return
        notify.queue(self.store, self.config, job_id, NotificationEvent.job_failed)

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
                method=job.method or self.engine.method))
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
            data = load_series(self.store.instance_paths(series.id))
        except SeriesError as exc:
            self.store.fail_job(job.id, f"skipped: {exc}")
            self.store.skip_series(series.id, str(exc))
            log.info("job %d: series skipped: %s", job.id, exc)
            return
        try:
            if len(data) < self.config.assembly.min_slices:
                raise SeriesError(f"{len(data)} slices, fewer than the minimum of "
                                  f"{self.config.assembly.min_slices}")
            engine = self._engine_for(job)
            log.info("job %d: %d slices loaded", job.id, len(data))
            result = engine.analyze(data)
            out = self.layout.inside(self.layout.results_folder(
                series.study_instance_uid, series.series_instance_uid, job.version))
            files = write_results(result, data, out, heatmaps=self.config.model.heatmaps,
                                  objects=self.config.results.objects,
                                  seg_compression=self.config.results.seg_compression)
        except SeriesError as exc:
            self.store.fail_job(job.id, f"skipped: {exc}")
            self.store.skip_series(series.id, str(exc))
            return
        except Exception as exc:
            self._failed(job.id, exc)
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
        timings["total"] = (utcnow() - started).total_seconds()
        self.store.finish_job(
            job.id, diagnosis=result.diagnosis,
            probabilities={c: float(p) for c, p in zip(CLASSES, result.probabilities)},
            infected_fraction=float(result.infected_fraction), timings=timings,
            model_version=result.model.version, device_uid=result.model.device_uid,
            results=records)
        self.store.create_deliveries(job.id, [(d.name, d.kind)
                                              for d in self.config.destinations])
        notify.queue(self.store, self.config, job.id, NotificationEvent.job_done)
        log.info("job %d done in %.1f s: %s (p=%.2f), %d lesion slice(s), %d result object(s); "
                 "model %s, method %s", job.id, timings["total"], result.diagnosis,
                 float(result.probabilities[result.diagnosis_index]),
                 len(result.lesion_slices), len(records), result.model.version,
                 getattr(result.method, "value", result.method))


def load_engine(config: NodeConfig):
    """The engine the configuration names (the shipped model when none is given)."""
    from inference.checkpoint import default_model
    from inference.engine import Engine

    model = config.model
    return Engine(model.checkpoint or default_model(), device=model.device,
                  batch_size=model.batch_size, method=model.method)


class WorkerProcess:
    """The job worker in its own process, at lower CPU priority (see the module).

    Start it from a thread that lives as long as the worker should (on Linux
    the worker is killed when the thread that started it ends).
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.model: ModelInfo | None = None    # what the worker loaded
        context = multiprocessing.get_context("spawn")   # no threads or locks inherited
        self.status, child_status = context.Pipe(duplex=False)
        wake_read, self._wake_write = context.Pipe(duplex=False)
        os.set_blocking(self._wake_write.fileno(), False)   # a full pipe drops the byte
        self._process = context.Process(
            target=_process_main, name="lungsys-worker", daemon=True,
            args=(config, wake_read, child_status, os.getpid(),
                  logging.getLogger().getEffectiveLevel()))
        self._child_ends = (wake_read, child_status)

    def start(self, load_seconds: float = LOAD_SECONDS) -> None:
        """Start the worker and wait until its model is loaded.

        Raises ValueError with the worker's reason when it cannot load the
        model (a bad checkpoint, no CUDA device), as the in-process engine
        would; TimeoutError when loading takes longer than ``load_seconds``.
        """
        self._process.start()
        for end in self._child_ends:    # the worker's now: they close if the worker dies
            end.close()
        if not self.status.poll(load_seconds):
            self.kill()
            raise TimeoutError(f"the worker did not load its model in {load_seconds:.0f} s")
        try:
            status, detail = self.status.recv()
        except EOFError:
            status, detail = "error", f"the worker ended ({self.describe_exit()})"
        if status != "ready":
            self._process.join(timeout=5)
            raise ValueError(detail)
        self.model = detail

    def wake(self) -> None:
        """A job was queued. Never blocks: a busy worker looks anyway, a dead one is restarted."""
        try:
            self._wake_write.send_bytes(b"w")
        except (BlockingIOError, BrokenPipeError, OSError):
            pass

    def ask_to_stop(self) -> None:
        """SIGTERM: the worker finishes its job, then ends."""
        if self._process.pid is not None and self._process.exitcode is None:
            try:
                os.kill(self._process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, seconds: float = STOP_SECONDS) -> None:
        """Let the job in progress finish for a while, then end the worker."""
        self.ask_to_stop()
        self._process.join(timeout=seconds)
        if self._process.is_alive():
            log.warning("the worker did not stop in %.0f s; its job runs again at the next "
                        "start", seconds)
            self.kill()
        self.close()

    def kill(self) -> None:
        if self._process.pid is not None and self._process.exitcode is None:
            self._process.kill()
            self._process.join(timeout=10)

    def close(self) -> None:
        for end in (self._wake_write, self.status):
            try:
                end.close()
            except OSError:
                pass

    @property
    def sentinel(self) -> int:
        return self._process.sentinel

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def describe_exit(self) -> str:
        code = self._process.exitcode
        if code is None:
            return "running"
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (the kernel's out-of-memory killer sends it)" if -code == signal.SIGKILL \
                else ""
            return f"killed by {name}{hint}"
        return f"exit code {code}"

    @property
    def pid(self) -> int | None:
        return self._process.pid


def _die_with(parent_pid: int) -> None:
    """SIGKILL this process when the node's process ends (Linux), however it ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)            # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("no parent-death signal on this system")
    if os.getppid() != parent_pid:               # the node ended before prctl took effect
        os._exit(1)


class _PipeWake:
    """The worker's side of the wake-up pipe, and its own stop (SIGTERM)."""

    def __init__(self, node_end) -> None:
        self.node_end = node_end
        self.fd = node_end.fileno()
        self.stop = threading.Event()
        self._self_read, self._self_write = os.pipe()
        os.set_blocking(self._self_write, False)

    def stop_now(self, *_) -> None:              # the SIGTERM handler
        self.stop.set()
        try:
            os.write(self._self_write, b"s")
        except OSError:
            pass

    def wait(self, timeout: float | None = None) -> bool:
        ready, _, _ = select.select([self.fd, self._self_read], [], [], timeout)
        if self._self_read in ready:
            os.read(self._self_read, 4096)
        if self.fd in ready:
            try:
                while self.node_end.poll():
                    self.node_end.recv_bytes()
            except (EOFError, OSError):              # the node's end closed
                self.stop.set()
        return bool(ready)

    def clear(self) -> None:
        pass

    def is_set(self) -> bool:
        return self.stop.is_set()

    def set(self) -> None:
        self.stop_now()


def _process_main(config: NodeConfig, wake_end, status, parent_pid: int,
                  log_level: int) -> None:
    _die_with(parent_pid)
    wake = _PipeWake(wake_end)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the node's to handle
    signal.signal(signal.SIGTERM, wake.stop_now)  # finish the job in progress, then end
    os.nice(NICENESS)
    configure_logging(log_level)
    try:
        engine = load_engine(config)
    except Exception as exc:
        status.send(("error", str(exc) or type(exc).__name__))
        return
    status.send(("ready", engine.model_info))

    def on_job(job_id: int | None) -> None:
        try:
            status.send(("job", job_id))
        except OSError:
            pass

    JobRunner(config, JobStore(config.store.url), engine, on_job).loop(wake.stop, wake)
