"""The node's watch over its worker process: a dead worker is seen, its job counted, and
the worker started again.

A worker can die unasked: the kernel's out-of-memory killer takes a model
that outgrew memory, a native library crashes. The node must notice within
seconds and carry on, never wait on something the dead process held. So
the supervisor's thread waits only on the worker's process sentinel (a file
descriptor that becomes readable when the process ends) and on the pipe over
which the worker says which job it runs. When the worker dies:

- the death is logged, with the signal that ended it, and recorded as an
  incident;
- its job goes back to the queue with the attempt counted (the claim counted
  it); a job that has killed the worker ``[worker] max_attempts`` times fails, with
  that reason, instead of killing it for ever;
- a new worker is started after a backoff (1, 2, 4 ... 60 s; back to 1 s
  once a worker has lived ``STABLE_SECONDS``).

Every worker is started from the supervisor's thread, so that the kernel's
parent-death signal (:func:`pacs_node.worker_process._die_with`) ties each worker to
that thread, which ends only once the worker has.
"""

from __future__ import annotations

import logging
import threading
import time
from multiprocessing.connection import wait

from config import NodeConfig
from pacs_node import one_line
from pacs_node.worker import worker_name
from pacs_node.worker_process import LOAD_SECONDS, STOP_SECONDS, WorkerProcess
from store.api import JobStore
from store.models import IncidentKind, JobState

log = logging.getLogger(__name__)

#: A worker that lived this long resets the restart backoff.
STABLE_SECONDS = 600.0
MAX_BACKOFF_SECONDS = 60.0


class WorkerSupervisor:
    """Runs the worker process (see the module); ``state`` says how it is doing."""

    def __init__(self, config: NodeConfig, store: JobStore) -> None:
        self.config = config
        self.store = store
        self.worker: WorkerProcess | None = None
        self.state = "starting"          # starting, ready, restarting, stopped
        self.deaths = 0
        self.current_job: int | None = None
        self.model = None                # the ModelInfo of the worker's model
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle ------------------------------------------------------------
    def start(self, load_seconds: float = LOAD_SECONDS) -> None:
        """Start the first worker and wait for its model (its error is raised here)."""
        self._thread = threading.Thread(target=self._run, args=(load_seconds,),
                                        name="lungsys-supervisor", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join(timeout=STOP_SECONDS)
            raise self._start_error

    def wake(self) -> None:
        worker = self.worker
        if worker is not None:
            worker.wake()

    def stop(self, seconds: float = STOP_SECONDS) -> None:
        """Ask the worker to finish its job and end; wait at most about ``seconds``."""
        self._stopping.set()
        worker = self.worker
        if worker is not None:
            worker.ask_to_stop()
        thread = self._thread
        if thread is not None and thread.ident is not None:  # a signal can come mid-start
            thread.join(timeout=seconds + 15)

    def kill(self) -> None:
        """End the worker at once (a node forced to stop)."""
        self._stopping.set()
        worker = self.worker
        if worker is not None:
            worker.kill()

    # --- the thread ------------------------------------------------------------
    def _run(self, load_seconds: float) -> None:
        try:
            self.worker = WorkerProcess(self.config)
            self.worker.start(load_seconds)
        except BaseException as exc:      # a bad model: the node does not start
            self._start_error = exc
            self.state = "stopped"
            self._started.set()
            return
        self.model, self.state = self.worker.model, "ready"
        self._started.set()
        backoff, born = 1.0, time.monotonic()
        while True:
            self._watch(self.worker)
            if self._stopping.is_set():
                self.worker.stop()
                self.state = "stopped"
                return
            self._died(self.worker)
            if time.monotonic() - born > STABLE_SECONDS:
                backoff = 1.0
            while not self._stopping.wait(backoff):
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                try:
                    worker = WorkerProcess(self.config)
                    self.worker = worker
                    worker.start(load_seconds)
                except Exception as exc:
                    log.error("the worker could not be started again: %s", exc)
                    continue
                log.warning("worker restarted (process %d)", worker.pid)
                self.state, born = "ready", time.monotonic()
                worker.wake()
                break
            else:
                self.state = "stopped"
                return

    def _watch(self, worker: WorkerProcess) -> None:
        """Follow the worker's messages until it ends or the node stops."""
        while not self._stopping.is_set():
            try:
                ready = wait([worker.status, worker.sentinel], timeout=1.0)
            except OSError:
                return
            if worker.status in ready:
                self._read_status(worker)
            if worker.sentinel in ready or not worker.alive:
                self._read_status(worker)     # what it said last, before it died
                worker.kill()                 # reap it
                return

    def _read_status(self, worker: WorkerProcess) -> None:
        """Every message waiting: which job the worker runs (None between jobs)."""
        try:
            while worker.status.poll():
                kind, value = worker.status.recv()
                if kind == "job":
                    self.current_job = value
        except (EOFError, OSError):
            pass

    def _died(self, worker: WorkerProcess) -> None:
        self.state = "restarting"
        self.deaths += 1
        why = worker.describe_exit()
        job, self.current_job = self.current_job, None
        worker.close()
        outcome = ""
        try:
            if job is not None:
                most = self.config.worker.max_attempts
                state = self.store.abandon_job(job, f"the worker died ({why})", most,
                                               worker=worker_name(worker.pid))
                outcome = (f"; job {job} failed after {most} attempts"
                           if state == JobState.failed else f"; job {job} queued again")
            self.store.record_incident(IncidentKind.worker_died,
                                       f"the worker process {worker.pid} died ({why})"
                                       f"{outcome}", node=self.config.node_id, job_id=job)
        except Exception as exc:
            log.error("the worker's death could not be recorded: %s", one_line(exc))
        log.error("the worker process %s died (%s)%s; it is started again", worker.pid,
                  why, outcome)
