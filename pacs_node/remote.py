"""``lungsys worker``: a job runner on another machine (a GPU server), beside the node.

It shares the node's job store (PostgreSQL), loads the model once, names
itself in the job store (host, process, device), and claims the node's queued
jobs with ``FOR UPDATE SKIP LOCKED`` under a lease its heartbeat renews
(:mod:`pacs_node.lease`). With ``[worker] instances = "shared"`` it reads the
node's data folder, mounted at the same path (the job store names files by
their paths), and writes its results there; with ``"wado"`` it has a data
folder of its own (locked, one worker each), retrieves each job's series from
the node over WADO-RS and hands the results back (:mod:`pacs_node.exchange`).
Either way the node delivers them, and notifies, by its own configuration
(the worker's file needs no destinations). Several workers, on one machine or many,
and ``lungsys serve``'s own (``[worker] local``) claim from the same queue;
none waits on another, and a job whose worker went away is taken back by the
next claimer. An idle worker on PostgreSQL hears of a queued job at once
(``LISTEN``/``NOTIFY``: :class:`pacs_node.lease.JobBell`); it looks every 5 s
besides.

SIGTERM or Ctrl-C lets the job in progress finish, then the worker leaves the
job store; a second signal ends it at once (its job is taken back when its
lease expires).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from config import NODE_ID_FILE, NodeConfig, WorkerInstances
from pacs_node.exchange import HandOverError, NodeClient, OverHttp
from pacs_node.layout import DataDirInUse, DataLayout
from pacs_node.lease import JobBell
from pacs_node.worker import JobRunner, load_engine, worker_name
from store.api import JobStore

log = logging.getLogger(__name__)


class WorkerError(ValueError):
    """A worker that cannot start: one line why."""


def run_worker(config: NodeConfig) -> None:
    """Run jobs until a signal asks to stop (see the module)."""
    over_http = config.worker.instances == WorkerInstances.wado
    layout = DataLayout(config.data_dir)
    if over_http:
        client = NodeClient(config.worker.node_url, config.worker.token,
                            config.worker.ca_certificates)
        try:
            node_id = client.node_id()
        except HandOverError as exc:
            raise WorkerError(f"the node does not answer as a worker's node: {exc}") from None
        try:
            layout.lock("lungsys worker")
        except DataDirInUse as exc:
            raise WorkerError(str(exc)) from None
    elif not (config.data_dir / NODE_ID_FILE).is_file():
        raise WorkerError(f"{config.data_dir} is not the data folder of a node that has "
                          f"started (no {NODE_ID_FILE} in it): mount the node's data folder "
                          f"at the same path, and give it as [node] data_dir, or use "
                          f"[worker] instances = \"wado\"")
    else:
        node_id = config.node_id
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
    name = worker_name(os.getpid())
    exchange = None
    if over_http:
        exchange = OverHttp(client, layout)
        exchange.clean()
    runner = JobRunner(config, store, engine, name=name, node_id=node_id, exchange=exchange,
                       remote=True)
    log.info("lungsys worker %s: model %s (%s) on %s, jobs of node %s (%s), lease %.0f s",
             runner.name, engine.model_info.version, engine.model_info.architecture,
             engine.model_info.device, runner.node_id,
             f"instances over WADO-RS from {config.worker.node_url}" if over_http
             else "shared data folder", config.worker.lease_seconds)
    if engine.model_info.advice:
        log.warning("model: %s", engine.model_info.advice)
    bell = JobBell(config.store.url, wake).start() if store.engine.dialect.name == \
        "postgresql" else None
    try:
        runner.loop(stop, wake)
    finally:
        if bell is not None:
            bell.stop()
        if over_http:
            layout.unlock()
    log.info("lungsys worker %s stopped", runner.name)
