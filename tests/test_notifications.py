"""Webhooks: a receiver the test starts gets ``job_done`` with the diagnosis and no patient
data (down at first: it gets it after a retry), another gets ``delivery_failed``; every
try is in the job store; bad targets are configuration errors."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import pytest

from config import ConfigError, load_config
from inference.engine import Engine
from pacs_node.node import Node
from store.models import DeliveryState

from conftest import eventually, require_tool
from doubles import hotspot_model
from orthanc import free_port, held_port

SECRET = "s3cret-for-the-test"


class Receiver:
    """A webhook receiver on loopback: what was POSTed, with its headers."""

    def __init__(self, port: int) -> None:
        self.posts: list[tuple[dict, bytes]] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()




def test_webhooks_get_job_done_after_a_retry_and_delivery_failed(tmp_path, study_factory):
    study = study_factory("covid", 6, 24)
    down, rising = held_port(), held_port()     # the PACS never up; the RIS up later
    nobody, hook = down.getsockname()[1], rising.getsockname()[1]
    pager = free_port()
    toml = tmp_path / "node.toml"
    toml.write_text(
        f'[node]\nae_title = "LUNGSYS"\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'data_dir = "{tmp_path / "var"}"\nmin_free_disk_mb = 1\n[dicomweb]\nport = 0\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "var" / "db"}"\n'
        f'[assembly]\nstable_seconds = 1\nmin_slices = 20\n'
        f'[delivery]\ninitial_backoff_seconds = 1\nmax_backoff_seconds = 1\nmax_attempts = 3\n'
        f'[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "PACS"\n'
        f'host = "127.0.0.1"\nport = {nobody}\n'
        f'[[notifications]]\nname = "ris"\nurl = "http://127.0.0.1:{hook}/lungsys"\n'
        f'events = ["job_done"]\nsecret = "{SECRET}"\n'
        f'console_url = "https://lungsys.example.org"\n'
        f'[[notifications]]\nname = "pager"\nurl = "http://127.0.0.1:{pager}/"\n'
        f'events = ["delivery_failed"]\ninclude_uids = true\n')
    config = load_config(toml, environ={})
    node = Node(config, Engine(hotspot_model(), device="cpu"))
    node.start()
    pager_receiver = Receiver(pager)
    ris = None
    try:
        proc = subprocess.run([require_tool("storescu"), "-aet", "CT1", "-aec", "LUNGSYS",
                               "127.0.0.1", str(node.port), *map(str, study.files)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "TCP_NODELAY": "1"})
        assert proc.returncode == 0, proc.stderr

        def notices():
            jobs = node.store.jobs()
            return jobs[0].notifications if jobs else []
        # the RIS is down: the first try fails and is recorded
        eventually(lambda: any(n.target == "ris" and n.attempts >= 1 for n in notices()))
        rising.close()
        ris = Receiver(hook)
        eventually(lambda: any(n.target == "ris" and n.state == DeliveryState.done
                              for n in notices()))
        eventually(lambda: pager_receiver.posts)
    finally:
        node.stop()
        pager_receiver.stop()
        down.close()
        rising.close()
        if ris is not None:
            ris.stop()

    [job] = node.store.jobs()
    ct = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    phi = [str(ct.PatientName), ct.PatientID, ct.PatientBirthDate]

    [(headers, body)] = ris.posts
    done = json.loads(body)
    assert done["event"] == "job_done" and done["job"] == job.id
    assert done["diagnosis"] == job.diagnosis and set(done["probabilities"]) == \
        {"Healthy", "COVID-19", "H1N1", "CAP"}
    assert done["link"] == f"https://lungsys.example.org/jobs/{job.id}"
    assert "study_instance_uid" not in done and ct.StudyInstanceUID not in body.decode()
    assert not any(value in body.decode() for value in phi)
    assert headers["x-lungsys-signature"] == hmac.new(SECRET.encode(), body,
                                                      hashlib.sha256).hexdigest()
    assert headers["content-type"] == "application/json"

    [(_, body)] = pager_receiver.posts     # only the event it asked for
    failed = json.loads(body)
    assert failed["event"] == "delivery_failed"
    assert failed["delivery"]["destination"] == "pacs" and failed["delivery"]["attempts"] == 3
    assert "connection refused" in failed["delivery"]["error"]
    assert failed["study_instance_uid"] == ct.StudyInstanceUID      # include_uids = true
    assert not any(value in body.decode() for value in phi)

    by_target = {n.target: n for n in job.notifications}
    assert set(by_target) == {"ris", "pager"}
    tries = by_target["ris"].attempt_log
    assert [a.ok for a in tries] == [False] * (len(tries) - 1) + [True] and len(tries) >= 2
    assert tries[0].error.endswith("failed: connection refused") and tries[-1].status == 204

    # lungsys jobs show lists them, every try included
    import sys
    from pathlib import Path
    exe = str(Path(sys.executable).with_name("lungsys"))
    shown = json.loads(subprocess.run([exe, "jobs", "show", str(job.id), "--config", str(toml),
                                       "--json"], capture_output=True, text=True,
                                      timeout=60).stdout)
    ris_shown = [n for n in shown["notifications"] if n["target"] == "ris"][0]
    assert ris_shown["state"] == "done" and len(ris_shown["attempt_history"]) == len(tries)


@pytest.mark.parametrize("table, message", [
    ('url = "ftp://127.0.0.1/x"', r"notifications\[0\]\.url: an http:// or https:// URL"),
    ('url = "http://127.0.0.1/x"\nevents = ["job_started"]',
     r"notifications\[0\]\.events: expected one of job_done, job_failed, delivery_failed"),
    ('url = "http://127.0.0.1/x"\nheaders = "x"', r"notifications\[0\]: unknown key"),
])
def test_a_bad_webhook_is_a_configuration_error(tmp_path, table, message):
    toml = tmp_path / "node.toml"
    toml.write_text(f"[[notifications]]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(toml, environ={})
