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
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
from typing import Protocol

import pydicom

from config import NodeConfig
from inference.errors import SeriesError
from inference.series import load_series
from pacs_node import LOG_FORMAT
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

    def __init__(self, config: NodeConfig, store: JobStore, engine) -> None:
        self.config = config
        self.store = store
        self.engine = engine

    def loop(self, stop: _Event, wake: _Event) -> None:
        """Run jobs until ``stop``; sleep until ``wake`` (or 5 s) when none is queued."""
        while not stop.is_set():
            job = self.store.claim_job()
            if job is None:
                wake.wait(timeout=5)
                wake.clear()
                continue
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        from inference.export import write_results   # torch: only where the model runs
        from inference.profiles import CLASSES

        series: Series = job.series
        started = utcnow()
        try:
            data = load_series(self.store.instance_paths(series.id))
        except SeriesError as exc:
            self.store.fail_job(job.id, f"skipped: {exc}")
            self.store.skip_series(series.id, str(exc))
            log.info("job %d: series skipped: %s", job.id, exc)
            return
        try:
            if len(data) < self.config.assembly["min_slices"]:
                raise SeriesError(f"{len(data)} slices, fewer than the minimum of "
                                  f"{self.config.assembly['min_slices']}")
            result = self.engine.analyze(data)
            out = (self.config.data_dir / "results" / series.study_instance_uid
                   / series.series_instance_uid / f"v{job.version}")
            files = write_results(result, data, out, heatmaps=self.config.model["heatmaps"])
        except SeriesError as exc:
            self.store.fail_job(job.id, f"skipped: {exc}")
            self.store.skip_series(series.id, str(exc))
            return
        except Exception as exc:
            log.exception("job %d failed", job.id)
            self.store.fail_job(job.id, f"{type(exc).__name__}: {exc}"[:2000])
            return
        records = []
        for path in files.all:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            records.append({"kind": "sr" if path == files.sr else "sc",
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
            model_version=result.model["version"], device_uid=result.model["device_uid"],
            results=records)
        self.store.create_deliveries(job.id, [(d.name, d.kind)
                                              for d in self.config.destinations])
        log.info("job %d done: %s, %d result objects", job.id, result.diagnosis, len(records))


def load_engine(config: NodeConfig):
    """The engine the configuration names (the shipped model when none is given)."""
    from inference.checkpoint import default_model
    from inference.engine import Engine

    model = config.model
    return Engine(model["checkpoint"] or default_model(), device=model["device"],
                  batch_size=model["batch_size"], method=model["method"])


def model_info(engine) -> dict:
    """What the node says of the model an engine runs: version, device, intended use."""
    return {"version": engine.model.version, "device": str(engine.device),
            "intended_use": engine.model.metadata.get("intended_use", "")}


class WorkerProcess:
    """The job worker in its own process, at lower CPU priority (see the module).

    Start it from a thread that lives as long as the node (``lungsys serve``
    starts it from the main thread): on Linux the worker is killed when the
    thread that started it ends.
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.model: dict = {}      # what the worker loaded: version, device, intended use
        context = multiprocessing.get_context("spawn")   # no threads or locks inherited
        self._stop, self._wake = context.Event(), context.Event()
        self._ready, self._child_end = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_process_main, name="lungsys-worker", daemon=True,
            args=(config, self._stop, self._wake, self._child_end, os.getpid(),
                  logging.getLogger().getEffectiveLevel()))

    def start(self) -> None:
        """Start the worker and wait until its model is loaded.

        Raises ValueError with the worker's reason when it cannot load the
        model (a bad checkpoint, no CUDA device), as the in-process engine
        would; TimeoutError when loading takes longer than ``LOAD_SECONDS``.
        """
        self._process.start()
        self._child_end.close()      # the worker's now: its end closes if the worker dies
        if not self._ready.poll(LOAD_SECONDS):
            self._process.kill()
            raise TimeoutError(f"the worker did not load its model in {LOAD_SECONDS:.0f} s")
        try:
            status, detail = self._ready.recv()
        except EOFError:
            status, detail = "error", f"the worker ended (exit code {self._process.exitcode})"
        if status != "ready":
            self._process.join(timeout=5)
            raise ValueError(detail)
        self.model = detail

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Let the job in progress finish for a while, then end the worker."""
        self._stop.set()
        self._wake.set()
        self._process.join(timeout=STOP_SECONDS)
        if self._process.is_alive():
            log.warning("the worker did not stop in %.0f s; its job runs again at the next "
                        "start", STOP_SECONDS)
            self._process.terminate()
            self._process.join(timeout=10)

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


def _process_main(config: NodeConfig, stop, wake, ready, parent_pid: int,
                  log_level: int) -> None:
    _die_with(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the node's to handle
    os.nice(NICENESS)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    try:
        engine = load_engine(config)
    except Exception as exc:
        ready.send(("error", str(exc) or type(exc).__name__))
        return
    ready.send(("ready", model_info(engine)))
    ready.close()
    JobRunner(config, JobStore(config.store["url"]), engine).loop(stop, wake)
