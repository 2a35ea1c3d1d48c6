"""``lungsys worker``: a job runner on another machine (a GPU server), beside the node.

It shares the node's job store (PostgreSQL) and data folder (mounted at the
same path: the job store names files by their paths), loads the model once,
names itself in the job store (host, process, device), and claims the node's
queued jobs with ``FOR UPDATE SKIP LOCKED`` under a lease its heartbeat renews
(:mod:`pacs_node.lease`). Its results are written into the shared folder and
delivered by the node. Several workers, on one machine or many, and ``lungsys
serve``'s own (``[worker] local``) claim from the same queue; none waits on
another, and a job whose worker went away is taken back by the next claimer.

SIGTERM or Ctrl-C lets the job in progress finish, then the worker leaves the
job store; a second signal ends it at once (its job is taken back when its
lease expires).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from config import NODE_ID_FILE, NodeConfig
from pacs_node.worker import JobRunner, load_engine
from store.api import JobStore

log = logging.getLogger(__name__)


class WorkerError(ValueError):
    """A worker that cannot start: one line why."""


def run_worker(config: NodeConfig) -> None:
    """Run jobs until a signal asks to stop (see the module)."""
    if not (config.data_dir / NODE_ID_FILE).is_file():
        raise WorkerError(f"{config.data_dir} is not the data folder of a node that has "
                          f"started (no {NODE_ID_FILE} in it): mount the node's data folder "
                          f"at the same path, and give it as [node] data_dir")
    store = JobStore(config.store.url)
    engine = load_engine(config)
    stop, wake = threading.Event(), threading.Event()
    signals = {"count": 0}

    def on_signal(signum, _frame) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            log.error("%s again: stopping now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: stopping once the job in progress is done", signal.Signals(signum).name)
        stop.set()
        wake.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    runner = JobRunner(config, store, engine)
    log.info("lungsys worker %s: model %s on %s, jobs of node %s, lease %.0f s", runner.name,
             engine.model_info.version, engine.model_info.device, runner.node_id,
             config.worker.lease_seconds)
    runner.loop(stop, wake)
    log.info("lungsys worker %s stopped", runner.name)
