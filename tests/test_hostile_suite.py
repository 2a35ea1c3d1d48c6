"""The hostile sender, all at once against a running `lungsys serve`: malformed and
oversized PDUs, trickling sockets, hostile UIDs over DIMSE and STOW-RS, cut-off data sets
and bodies. Afterwards the node is up, its memory grew little, nothing lies outside its
data folder, everything acknowledged is recorded, and a normal study still reaches PACS."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from store.api import JobStore
from store.models import DeliveryState

from conftest import require_tool
from hostile import raw, stow, trickle, with_uids
from orthanc import Orthanc, free_port

EXE = str(Path(sys.executable).with_name("lungsys"))
ENV = {**os.environ, "TCP_NODELAY": "1"}
HOSTILE_UIDS = [(".", ".", "1.2.3"), ("..", "..", "1.2.4"), ("/tmp", "/etc", "1.2.5"),
                ("1.2", "1.2/3", "1.2.6"), ("1.2", "1.2_3", "1.2.7"), ("1.02", "1.2.8", "1.2.9")]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def storescu(port: int, files) -> str:
    return subprocess.run([require_tool("storescu"), "-v", "-aet", "CT1", "-aec", "LUNGSYS",
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True,
                          text=True, env=ENV, timeout=120).stderr


@pytest.mark.slow
def test_a_node_under_hostile_senders_stays_up_bounded_and_faithful(tmp_path, study_factory):
    study = study_factory("covid", 1, 24)
    pacs = Orthanc(tmp_path / "orthanc").start()
    port, web = free_port(), free_port()
    toml = tmp_path / "node.toml"
    toml.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{tmp_path / "var"}"\n'
        f'min_free_disk_mb = 1\ntimeout_seconds = 5\n'
        f'[dicomweb]\nport = {web}\n[store]\nurl = "sqlite:///{tmp_path / "var" / "db"}"\n'
        f'[assembly]\nstable_seconds = 3\n[model]\ndevice = "cpu"\nmirror = false\n'
        f'[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "ORTHANC"\n'
        f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n')
    sender = subprocess.run([EXE, "tokens", "create", "hostile", "--config", str(toml)],
                            capture_output=True, text=True, check=True).stdout.strip()
    node = subprocess.Popen([EXE, "serve", "--config", str(toml)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "serve.log", "w"), start_new_session=True)
    outside_before = sorted(p.name for p in tmp_path.parent.iterdir())
    try:
        deadline = time.time() + 90
        while subprocess.run([EXE, "echo", "127.0.0.1", str(port), "--aet", "LUNGSYS"],
                             capture_output=True).returncode != 0:
            assert time.time() < deadline and node.poll() is None
            time.sleep(0.3)
        before = rss_kib(node.pid)
        rng = random.Random(12)

        stop = threading.Event()                   # slow sockets, for the whole attack
        tricklers = [threading.Thread(target=trickle, args=(port, lambda: not stop.is_set()))
                     for _ in range(6)]
        for t in tricklers:
            t.start()
        for _ in range(20):                        # malformed A-ASSOCIATE-RQs
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(68, 400)))
            raw(port, struct.pack(">BBL", 1, 0, len(body)) + body)
        for _ in range(20):                        # announced, never sent
            raw(port, struct.pack(">BBL", 1, 0, 16 << 20), linger=0.05)
        for _ in range(5):                         # other PDU types first, huge lengths
            raw(port, struct.pack(">BBL", rng.choice([2, 4, 5, 7, 9]), 0, rng.randrange(1 << 31)))

        sent = tmp_path / "hostile"
        sent.mkdir()
        files = [with_uids(study.files[i], sent, *uids)
                 for i, uids in enumerate(HOSTILE_UIDS)]
        too_long = with_uids(study.files[9], sent, "1.2", "1.2.10", "1." * 35 + "1")
        log = storescu(port, files + [too_long])
        assert log.count("Received Store Response (Success)") == len(files)
        web_files = [with_uids(study.files[10 + i], sent, "..", "1.3", f"1.3.{i}")
                     for i in range(4)]
        statuses = []
        threads = [threading.Thread(target=lambda f=f: statuses.append(
            stow(web, [f.read_bytes()], token=sender))) for f in web_files]
        threads += [threading.Thread(target=lambda: statuses.append(
            stow(web, [study.files[20].read_bytes(), b"\x00" * 200], close=False,
                 token=sender)))]
        threads += [threading.Thread(target=lambda: statuses.append(   # no token: 401
            stow(web, [study.files[21].read_bytes()])))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(statuses) == [200, 200, 200, 200, 202, 401]
        stop.set()
        for t in tricklers:
            t.join()

        assert node.poll() is None                 # the node is up ...
        grown = rss_kib(node.pid) - before         # ... its memory grew little ...
        assert grown < 64 * 1024, f"RSS grew by {grown} KiB"
        data = tmp_path / "var"
        for path in tmp_path.rglob("*"):           # ... nothing outside its folders ...
            if path.is_file() and path.suffix == ".dcm" and not path.is_relative_to(sent):
                assert path.is_relative_to(data / "incoming") or path.is_relative_to(
                    tmp_path / "orthanc") or path.is_relative_to(study.directory), path
        assert sorted(p.name for p in tmp_path.parent.iterdir()) == outside_before
        assert not list((data / "incoming" / ".partial").iterdir())
        store = JobStore(f"sqlite:///{data / 'db'}")   # ... everything acknowledged recorded
        recorded = {i.sop_instance_uid for i in store.incidents()}
        stored = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                  for s in store.series() for p in store.instance_paths(s.id)}
        acknowledged = {pydicom.dcmread(f).SOPInstanceUID for f in files + web_files}
        assert acknowledged | {pydicom.dcmread(study.files[20]).SOPInstanceUID} <= stored
        assert ("1." * 35 + "1")[:64] in recorded   # the refused one, as an incident

        assert "Success" in storescu(port, study.files)   # and a normal study goes through
        deadline = time.time() + 240
        while True:
            jobs = [j for j in store.jobs() if j.series.series_instance_uid
                    == pydicom.dcmread(study.files[0]).SeriesInstanceUID]
            if jobs and jobs[0].deliveries and all(
                    d.state == DeliveryState.done for d in jobs[0].deliveries):
                break
            assert time.time() < deadline, "the normal study was not delivered"
            time.sleep(1)
        assert len(pacs.get("/instances")) == len(jobs[0].results)
    finally:
        node.terminate()
        node.wait(timeout=60)
        pacs.stop()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
