"""The admin commands, as an admin types them: jobs, deliveries, echo."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pacs_node.receiver import Receiver
from store.api import JobStore, ReceivedInstance
from store.models import utcnow


def lungsys(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lungsys")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def configured(tmp_path):
    db = tmp_path / "lungsys.db"
    toml = tmp_path / "node.toml"
    toml.write_text(f'[store]\nurl = "sqlite:///{db}"\n')
    store = JobStore(f"sqlite:///{db}")
    store.record_instance(ReceivedInstance("1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3",
                                           "1.2", "CT", "/x.dcm", 1, "1.2.840.10008.1.2.1"))
    [series] = store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1))
    job = store.queue_job(series.id)
    store.claim_job()
    store.fail_job(job.id, "model out of memory")
    store.create_deliveries(job.id, [("pacs", "dimse")])
    store.record_attempt(store.due_deliveries()[0].id, ok=False, error="refused",
                         give_up=True)
    return toml, store, job


def test_jobs_list_show_retry(configured):
    toml, store, job = configured
    listed = lungsys("jobs", "list", "--config", str(toml), "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["state"] == "failed" and row["error"] == "model out of memory"
    assert row["deliveries"][0]["state"] == "failed"
    table = lungsys("jobs", "list", "--config", str(toml), "--state", "failed")
    assert "model out of memory" in table.stdout
    shown = json.loads(lungsys("jobs", "show", str(job.id), "--config", str(toml),
                               "--json").stdout)
    assert shown["series_instance_uid"] == "1.2.3"
    assert lungsys("jobs", "retry", str(job.id), "--config", str(toml)).returncode == 0
    assert store.jobs("queued")[0].id == job.id
    missing = lungsys("jobs", "retry", "999", "--config", str(toml))
    assert missing.returncode == 1 and "no job 999" in missing.stderr
    d = row["deliveries"][0]["id"]
    assert lungsys("deliveries", "retry", str(d), "--config", str(toml)).returncode == 0
    assert store.due_deliveries()[0].id == d


def test_echo(tmp_path):
    receiver = Receiver(JobStore(f"sqlite:///{tmp_path}/db"), tmp_path, min_free_disk_mb=1)
    receiver.start("127.0.0.1", 0)
    try:
        ok = lungsys("echo", "127.0.0.1", str(receiver.port), "--aet", "LUNGSYS")
        assert ok.returncode == 0 and "Success" in ok.stdout
    finally:
        receiver.stop()
    down = lungsys("echo", "127.0.0.1", str(receiver.port), "--aet", "LUNGSYS")
    assert down.returncode == 1 and "no association" in down.stderr


def test_incidents_list_what_was_refused(configured):
    from store.models import IncidentKind

    toml, store, _ = configured
    store.record_incident(IncidentKind.refused, "SOP Instance UID is 70 characters long",
                          origin="CT9", sop_instance_uid="1." * 40)
    store.record_incident(IncidentKind.worker_died, "the worker process 7 died (killed by "
                          "SIGKILL)", job_id=1)
    rows = json.loads(lungsys("incidents", "--config", str(toml), "--json").stdout)
    assert [r["kind"] for r in rows] == ["worker died", "refused"]
    assert rows[1]["origin"] == "CT9" and len(rows[1]["sop_instance_uid"]) == 64
    table = lungsys("incidents", "--config", str(toml), "--kind", "refused")
    assert table.returncode == 0 and "70 characters long" in table.stdout
    assert "worker" not in table.stdout
    bad = lungsys("incidents", "--config", str(toml), "--kind", "nonsense")
    assert bad.returncode == 2 and "'quarantined', 'worker died'" in bad.stderr  # usage


def test_the_command_line_teaches(configured, tmp_path):
    """A bad choice is a usage error listing the valid values; help shows whole option
    names and flags as flags at 80 columns; `jobs show` reads as lines, times carry
    their zone; `echo` to nobody says why in one line."""
    toml, store, job = configured
    bad = lungsys("jobs", "list", "--config", str(toml), "--state", "bogus")
    assert bad.returncode == 2 and "'queued', 'running', 'done', 'failed'" in bad.stderr
    exe = Path(sys.executable).with_name("lungsys")
    helped = subprocess.run([str(exe), "model", "init", "--help"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})
    assert "--backbone-weights <path>" in helped.stdout and "…" not in helped.stdout
    assert all(len(line) <= 80 for line in helped.stdout.splitlines())
    assert "<bool>" not in lungsys("evaluate", "--help").stdout
    shown = lungsys("jobs", "show", str(job.id), "--config", str(toml))
    assert "error: model out of memory" in shown.stdout
    assert "deliveries[0].state: failed" in shown.stdout
    assert "created_at: 20" in shown.stdout and shown.stdout.count("Z\n") >= 2
    with socket.socket() as s:                               # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = lungsys("echo", "127.0.0.1", str(port), "--aet", "PACS")
    assert down.returncode == 1
    assert down.stderr.strip() == f"lungsys: error: no association with PACS@127.0.0.1:{port} " \
                                  f"(connection refused)"
