"""lungsys commands for the node and its admins: serve, worker, jobs, deliveries,
incidents, echo."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from config.rules import Priority
from inference.model_info import recorded_low_confidence
from inference.version import software_version
from lungsys.common import CLIError, err, out, print_fields, when
from store.models import IncidentKind, JobState


class _Interrupted(BaseException):
    """A signal came while the node was starting (no ``except Exception`` may take it)."""


def serve_command(
    config_file: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="TOML configuration (see config/default.toml); every key has "
        "a default and an environment variable LUNGSYS_<SECTION>_<KEY>.")] = None,
) -> None:
    """Run the node: receive CT over DICOM, analyse complete series, deliver results.

    Stops cleanly on Ctrl-C or SIGTERM (the job in progress may finish for up
    to 30 s); a second signal stops it at once. Nothing received is lost,
    and work left unfinished resumes at the next start.
    """
    import signal
    import threading

    from config import load_config
    from pacs_node.node import Node

    from pacs_node import configure_logging

    # the node's log: INFO unless -vv asked for DEBUG (received, analysed, delivered, stopped)
    configure_logging(min(logging.getLogger().level, logging.INFO))
    cfg = load_config(config_file)
    node = Node(cfg)
    logger = logging.getLogger("lungsys")
    stop = threading.Event()
    state = {"signals": 0, "running": False}

    def on_signal(signum, _frame) -> None:
        state["signals"] += 1
        name = signal.Signals(signum).name
        if state["signals"] > 1:
            logger.error("%s again: stopping now", name)
            node.kill_worker()
            _leave(1)
        logger.info("%s: stopping", name)
        stop.set()
        if not state["running"]:
            raise _Interrupted(name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = 0
    try:
        node.start()        # the worker process loads the model (fails here if it cannot)
        state["running"] = True
        web = "https" if cfg.http.tls_certificate else "http"
        model = node.model
        logger.info(
            "lungsys %s: %s listening on %s:%d%s (console and STOW-RS: %s), %s, "
            "%d destination(s)", software_version(), cfg.node.ae_title, cfg.node.host,
            node.port, " with DICOM TLS" if cfg.tls.enabled else "",
            f"{web}://{cfg.http.host}:{node.stow_port}/console/" if node.stow_port else "off",
            f"model {model.version} ({model.architecture}) on {model.device}"
            if model is not None
            else "no local worker (jobs run by `lungsys worker` processes)",
            len(cfg.destinations))
        if model is not None and model.advice:
            logger.warning("model: %s", model.advice)
        elif model is not None and model.intended_use:
            logger.info("model: %s", model.intended_use)
        if node.stow_port and not cfg.http.tls_certificate and not _loopback(cfg.http.host):
            logger.warning("the console and STOW-RS listen on %s in plain HTTP: passwords "
                           "and tokens cross the network in clear (set [http] "
                           "tls_certificate and tls_private_key)", cfg.http.host)
        if node.stow_port and not node.store.users():
            logger.info("no console user yet: add one with `lungsys users add NAME --role "
                        "admin`")
        stop.wait()
    except _Interrupted:
        code = 1
    except (ValueError, OSError, TimeoutError) as exc:
        err.print(f"lungsys: error: {exc}", markup=False, highlight=False)
        code = 1
    finally:
        node.stop()
        if state["running"]:
            logger.info("lungsys stopped")
    _leave(code)


def worker_command(
    config_file: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="The worker's configuration: the node's job store, the model, "
        "and [worker] instances: \"shared\" (the node's data folder at the same path) or "
        "\"wado\" (node_url, a token of the worker role, a data folder of its own).")] = None,
) -> None:
    """Run jobs of a node from another machine (a GPU server): claims queued jobs from the
    shared job store, reads their series from the shared data folder or over WADO-RS, and
    leaves the results for the node to deliver; Ctrl-C or SIGTERM stops it after the job
    in progress."""
    from config import load_config
    from pacs_node import configure_logging
    from pacs_node.remote import WorkerError, run_worker

    configure_logging(min(logging.getLogger().level, logging.INFO))
    try:
        run_worker(load_config(config_file))
    except (WorkerError, ValueError, OSError) as exc:
        raise CLIError(str(exc)) from None


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _leave(code: int) -> None:
    """Exit now: no thread left behind (a delivery in progress, say) may keep the
    process alive after the node has stopped."""
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def store_of(config_file: Optional[Path]):
    """The job store the configuration names."""
    from config import load_config
    from store.api import JobStore

    return JobStore(load_config(config_file).store.url)


ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c",
                                                      help="The node's configuration file.")]
jobs_app = typer.Typer(help="Inspect and retry the node's jobs (the job store named by the "
                       "configuration).", no_args_is_help=True)
deliveries_app = typer.Typer(help="Retry deliveries of results to PACS.", no_args_is_help=True)


def _job_dict(job) -> dict:
    return {"id": job.id, "state": job.state.value, "series_instance_uid":
            job.series.series_instance_uid, "study_instance_uid": job.series.study_instance_uid,
            "series_state": job.series.state.value, "series_reason": job.series.reason,
            "version": job.version, "attempts": job.attempts, "worker": job.worker,
            "priority": Priority.of_rank(job.priority).value,
            "created_at": when(job.created_at), "started_at": when(job.started_at),
            "finished_at": when(job.finished_at), "model_version": job.model_version,
            "diagnosis": job.diagnosis, "probabilities": job.probabilities,
            "low_confidence": recorded_low_confidence(job.probabilities),
            "caution": job.caution or None,
            "infected_fraction": job.infected_fraction, "timings": job.timings,
            "error": job.error,
            "results": [{"kind": r.kind, "sop_instance_uid": r.sop_instance_uid,
                         "path": r.path} for r in job.results],
            "deliveries": [{"id": d.id, "destination": d.destination, "kind": d.kind,
                            "state": d.state.value, "attempts": d.attempts,
                            "next_attempt_at": when(d.next_attempt_at),
                            "delivered_at": when(d.delivered_at),
                            "last_error": d.last_error,
                            "attempt_history": [{"started_at": when(a.started_at),
                                                 "finished_at": when(a.finished_at),
                                                 "ok": a.ok, "error": a.error}
                                                for a in d.attempt_log]}
                           for d in job.deliveries],
            "notifications": [{"id": n.id, "target": n.target, "event": n.event,
                               "state": n.state.value, "attempts": n.attempts,
                               "last_error": n.last_error,
                               "attempt_history": [{"at": when(a.at), "ok": a.ok,
                                                    "status": a.status, "error": a.error}
                                                   for a in n.attempt_log]}
                              for n in job.notifications]}


def _state(job) -> str:
    """A job's state as an admin reads it: "done, delivery failed" when the analysis is
    done but a delivery gave up."""
    failed = any(d.state.value == "failed" for d in job.deliveries)
    return f"{job.state.value}, delivery failed" if failed and job.state.value != "failed" \
        else job.state.value


@jobs_app.command("list")
def jobs_list(
    config_file: ConfigOption = None,
    state: Annotated[Optional[JobState], typer.Option(
        help="Only jobs in this state; failed also lists jobs a delivery of which failed.")]
    = None,
    json_: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """List jobs, newest first."""
    jobs = store_of(config_file).jobs(state)
    if json_:
        print(json.dumps([_job_dict(j) for j in jobs]))
        return
    table = Table()
    for col in ("job", "state", "series", "diagnosis", "deliveries (id, to, state, attempts)",
                "finished", "worker", "error"):
        table.add_column(col)
    for j in jobs:
        # delivery id, destination, state and attempts: "3 pacs failed (20)"
        deliveries = ", ".join(f"{d.id} {d.destination} {d.state.value} ({d.attempts})"
                               for d in j.deliveries) or "-"
        errors = [j.error] if j.error else [d.last_error for d in j.deliveries
                                            if d.state.value == "failed" and d.last_error]
        table.add_row(str(j.id), _state(j), j.series.series_instance_uid[-24:],
                      j.diagnosis or "-", deliveries, when(j.finished_at) or "-",
                      j.worker or "-", (errors[0] if errors else "")[:80])
    out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: Annotated[int, typer.Argument(help="Job number.")],
              config_file: ConfigOption = None,
              json_: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False
              ) -> None:
    """Everything about one job: series, timings, diagnosis, results, deliveries."""
    jobs = [j for j in store_of(config_file).jobs(limit=100000) if j.id == job_id]
    if not jobs:
        raise CLIError(f"no job {job_id}")
    job = _job_dict(jobs[0])
    if json_:
        print(json.dumps(job, indent=1))
        return
    print_fields(job)


@jobs_app.command("retry")
def jobs_retry(job_id: Annotated[int, typer.Argument(help="Job number.")],
               config_file: ConfigOption = None) -> None:
    """Queue a job again (a running node picks it up)."""
    try:
        store_of(config_file).retry_job(job_id)
    except LookupError as exc:
        raise CLIError(str(exc)) from None
    out.print(f"job {job_id} queued")


@deliveries_app.command("retry")
def deliveries_retry(delivery_id: Annotated[int, typer.Argument(help="Delivery number.")],
                     config_file: ConfigOption = None) -> None:
    """Send a delivery again now (a running node picks it up)."""
    try:
        store_of(config_file).retry_delivery(delivery_id)
    except LookupError as exc:
        raise CLIError(str(exc)) from None
    out.print(f"delivery {delivery_id} due now")


def incidents_command(
    config_file: ConfigOption = None,
    kind: Annotated[Optional[IncidentKind], typer.Option(help="Only incidents of this kind.")]
    = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 200,
    json_: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """What an admin should know that no job says: instances refused, lost or found
    unrecorded at start-up, workers that died."""
    rows = store_of(config_file).incidents(kind, limit)
    if json_:
        print(json.dumps([{"id": i.id, "at": when(i.at), "kind": i.kind.value, "node": i.node,
                           "origin": i.origin, "series_instance_uid": i.series_instance_uid,
                           "sop_instance_uid": i.sop_instance_uid, "job": i.job_id,
                           "detail": i.detail} for i in rows]))
        return
    table = Table()
    for col in ("id", "at", "kind", "origin", "SOP instance", "detail"):
        table.add_column(col)
    for i in rows:
        table.add_row(str(i.id), when(i.at), i.kind.value, i.origin or "-",
                      i.sop_instance_uid[-24:] or "-", i.detail[:100])
    out.print(table)


def echo_command(
    host: Annotated[str, typer.Argument(help="Peer address.")],
    port: Annotated[int, typer.Argument(help="Peer DICOM port.")],
    aet: Annotated[str, typer.Option("--aet", help="The peer's (called) AE title.")] = "ANY-SCP",
    calling: Annotated[str, typer.Option("--calling", help="Our (calling) AE title.")]
    = "LUNGSYS",
) -> None:
    """C-ECHO a peer, as DCMTK's echoscu does: exit 0 when it answers Success."""
    from pacs_node.probe import ProbeError, echo

    try:
        out.print(echo(host, port, aet, calling))
    except ProbeError as exc:
        raise CLIError(str(exc)) from None


COMMANDS = [("serve", serve_command), ("worker", worker_command),
            ("incidents", incidents_command),
            ("echo", echo_command)]
GROUPS = [("jobs", jobs_app), ("deliveries", deliveries_app)]
