"""The job runner in a process of its own: ``lungsys serve``'s worker.

``lungsys serve`` runs the worker in a process of its own (:class:`WorkerProcess`)
at a lower CPU priority (nice +10): a model on the CPU would otherwise take
the cores, and the interpreter lock, from the receiver, which must go on
taking instances at full speed while a model runs. The process loads the
model once, takes jobs from the job store (all state is there, so nothing
else crosses between the processes), dies with the node (a SIGKILLed node
leaves no worker behind; its interrupted job runs again at the next start)
and is woken when a job is queued.

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

from config import NodeConfig
from inference.model_info import ModelInfo
from pacs_node import configure_logging
from pacs_node.worker import JobRunner, load_engine
from store.api import JobStore

log = logging.getLogger(__name__)

#: How much lower the worker process's CPU priority is than the node's.
NICENESS = 10
#: How long a stopping node waits for the job in progress before ending it.
STOP_SECONDS = 30.0
#: How long the node waits for the worker process to load the model.
LOAD_SECONDS = 600.0


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
