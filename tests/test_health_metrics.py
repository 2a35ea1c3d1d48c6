"""Health and metrics on the node's HTTP service: /healthz, /readyz (503 with the reason
when the worker is killed or the disk falls below the minimum), /metrics in Prometheus'
format, its counters matching the job store after a real storescu send."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from conftest import eventually, require_tool
from orthanc import free_port

EXE = str(Path(sys.executable).with_name("lungsys"))


def get(port: int, path: str, token: str = "") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={
        "Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def token(toml: Path, role: str) -> str:
    """A token made as an admin would: ``lungsys tokens create``."""
    proc = subprocess.run([EXE, "tokens", "create", f"prometheus-{role}", "--role", role,
                           "--config", str(toml)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def samples(port: int, token: str) -> dict[tuple[str, tuple], float]:
    status, body = get(port, "/metrics", token)
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def test_health_readiness_and_metrics_of_a_running_node(tmp_path, study_factory):
    from pacs_node.worker_process import NICENESS
    from store.api import JobStore

    study = study_factory("covid", 8, 24)
    port, http = free_port(), free_port()
    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\n'
                    f'data_dir = "{tmp_path / "var"}"\nmin_free_disk_mb = 1\n'
                    f'[http]\nport = {http}\n[store]\nurl = "sqlite:///{tmp_path / "db"}"\n'
                    f'[assembly]\nstable_seconds = 2\n[model]\ndevice = "cpu"\nmirror = false\n')
    prometheus, sender = token(toml, "viewer"), token(toml, "sender")
    node = subprocess.Popen([EXE, "serve", "--config", str(toml)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: get(http, "/readyz")[0] == 200 if _up(http) else False, timeout=120)
        assert get(http, "/healthz") == (200, b'{"status":"ok"}')
        assert json.loads(get(http, "/readyz")[1]) == {"ready": True}
        # /metrics needs a token of the viewer role or above: a sender's is not enough
        assert get(http, "/metrics")[0] == 401
        assert get(http, "/metrics", sender)[0] == 403
        assert get(http, "/metrics", "lsy_" + "x" * 43)[0] == 401

        proc = subprocess.run([require_tool("storescu"), "-aet", "CT1", "-aec", "LUNGSYS",
                               "127.0.0.1", str(port), *map(str, study.files)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "TCP_NODELAY": "1"})
        assert proc.returncode == 0, proc.stderr
        store = JobStore(f"sqlite:///{tmp_path / 'db'}")
        eventually(lambda: store.jobs("done"))

        metrics = samples(http, prometheus)
        counts = store.counts()
        assert metrics[("lungsys_instances_received_total",
                        (("protocol", "dimse"), ("status", "0x0000")))] == counts["instances"] == 24
        assert metrics[("lungsys_jobs", (("state", "done"),))] == len(store.jobs("done")) == 1
        assert metrics[("lungsys_series", (("state", "done"),))] == 1
        assert metrics[("lungsys_queue_depth", ())] == 0
        assert metrics[("lungsys_inference_seconds_count", ())] == 1
        assert metrics[("lungsys_inference_seconds_sum", ())] == \
            store.jobs("done")[0].timings["total"]
        assert metrics[("lungsys_disk_free_bytes", ())] > metrics[
            ("lungsys_disk_minimum_bytes", ())] == 1024 * 1024
        assert any(name == "lungsys_model_info" and dict(labels)["profile"] == "small"
                   for name, labels in metrics)
        assert metrics[("lungsys_associations_active", ())] == 0

        # the worker killed: not ready (the supervisor restarts it), then ready again
        children = [int(c) for task in Path(f"/proc/{node.pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
        [worker] = [c for c in children
                    if os.getpriority(os.PRIO_PROCESS, c) ==
                    os.getpriority(os.PRIO_PROCESS, 0) + NICENESS]
        os.kill(worker, signal.SIGKILL)
        status, body = eventually(lambda: (lambda r: r if r[0] == 503 else None)(
            get(http, "/readyz")), timeout=30)
        assert json.loads(body)["ready"] is False
        assert any("worker" in reason for reason in json.loads(body)["reasons"])
        eventually(lambda: get(http, "/readyz")[0] == 200, timeout=120)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)
    assert node.returncode == 0


def _up(port: int) -> bool:
    try:
        get(port, "/healthz")
        return True
    except OSError:
        return False


def test_readyz_says_when_the_disk_is_below_the_minimum(tmp_path):
    from config import load_config
    from inference.engine import Engine
    from pacs_node.node import Node

    from doubles import hotspot_model

    http = free_port()
    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\nhost = "127.0.0.1"\nport = {free_port()}\n'
                    f'data_dir = "{tmp_path / "var"}"\nmin_free_disk_mb = 1\n'
                    f'[http]\nport = {http}\n[store]\nurl = "sqlite:///{tmp_path / "db"}"\n')
    node = Node(load_config(toml, environ={}), Engine(hotspot_model(), device="cpu"))
    node.start()
    try:
        assert get(http, "/readyz")[0] == 200
        node.receiver.storage.min_free = 1 << 62          # a disk far below the minimum
        status, body = get(http, "/readyz")
        assert status == 503
        assert json.loads(body) == {"ready": False, "reasons": [
            "free disk below the minimum of 1 MB"]}
        assert get(http, "/healthz")[0] == 200               # the process still answers
        node.receiver.storage.min_free = 1 << 20
        assert get(http, "/readyz")[0] == 200
        status, body = get(http, "/nowhere")
        assert status == 404 and json.loads(body)["error"].startswith("no such resource")
        # a known path asked with a "/" more is redirected by its path alone, never to the
        # host a client names (Starlette's own redirect took it from the Host header)
        for path, location in (("/healthz/", "/healthz"), ("/readyz/?a=1", "/readyz?a=1"),
                               ("//healthz", None), ("/nowhere/", None)):
            answer = _raw_get(http, path, host="evil.example")
            assert answer.getheader("Location") == location, path
            assert answer.status == (307 if location else 404), path
    finally:
        node.stop()


def _raw_get(port: int, path: str, host: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.putrequest("GET", path, skip_host=True)
    connection.putheader("Host", host)
    connection.endheaders()
    answer = connection.getresponse()
    answer.read()
    connection.close()
    return answer
