"""STOW-RS ingest: images/s for a 300-slice study in one request and in 300 requests.

    .venv/bin/python -m bench.bench_stow [--slices 300] [--repeats 3]

Stores one phantom study into an in-process STOW-RS receiver
(:class:`pacs_node.stow.StowServer`: the same route, service, HTTP front door and
token check the node serves: every request carries a sender's token) over loopback,
from a client in another process (so that the client's work does not share the
receiver's interpreter): once as a single multipart request of every slice, once as
one request per slice on a kept-alive connection with TCP_NODELAY set (as urllib3
and so DICOMweb clients do). Each run starts from an empty job store and data folder,
after the earlier runs' dirty pages are written back (``sync``). Prints one table: the
median images/s and seconds of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pacs_node.storage import InstanceStorage
from pacs_node.stow import StowServer
from pacs_node.web.auth import Doorkeeper
from store.accounts import Role
from store.api import JobStore
from training.phantom import build_phantom, write_study

CLIENT = r'''
import http.client, sys, uuid
from pathlib import Path
port, mode, token = int(sys.argv[1]), sys.argv[2], sys.argv[4]
files = sorted(Path(sys.argv[3]).glob("CT*.dcm"))
def body(paths):
    b = uuid.uuid4().hex.encode()
    parts = [b"--" + b + b"\r\nContent-Type: application/dicom\r\n\r\n" + p.read_bytes() + b"\r\n"
             for p in paths]
    return b"".join(parts) + b"--" + b + b"--\r\n", b.decode()
bodies = [body(files)] if mode == "one" else [body([f]) for f in files]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
conn.connect()
import socket, time
conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as urllib3 does
t = time.perf_counter()
for data, b in bodies:
    conn.request("POST", "/dicom-web/studies", body=data, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={b}',
        "Authorization": f"Bearer {token}"})
    r = conn.getresponse(); r.read()
    assert r.status == 200, r.status
print(time.perf_counter() - t)
'''


def _run(study: Path, mode: str, work: Path) -> float:
    store = JobStore(f"sqlite:///{work}/lungsys.db")
    token = store.create_token("bench", Role.sender)
    door = Doorkeeper(store)
    server = StowServer(InstanceStorage(store, work / "data", min_free_disk_mb=1),
                        authorize=lambda request: door.api(request, Role.sender))
    server.start("127.0.0.1", 0)
    try:
        proc = subprocess.run([sys.executable, "-c", CLIENT, str(server.port), mode,
                               str(study), token], capture_output=True, text=True,
                              timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1])
        return float(proc.stdout.strip())
    finally:
        server.stop()
        store.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table = Table(title=f"STOW-RS ingest, {args.slices}-slice study, median of {args.repeats}")
    for column in ("requests", "images/s", "seconds"):
        table.add_column(column, justify="left" if column == "requests" else "right")
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study"
        phantom = build_phantom("covid", 3, args.slices)
        write_study(phantom, study, *phantom.render())
        for mode, label in (("one", "1 (all slices)"), ("each", f"{args.slices} (one each)")):
            times = []
            for _ in range(args.repeats):
                work = Path(tmp) / uuid.uuid4().hex
                work.mkdir()
                os.sync()                        # no earlier run's dirty pages in this one
                time.sleep(0.5)
                times.append(_run(study, mode, work))
                shutil.rmtree(work, ignore_errors=True)
            median = statistics.median(times)
            table.add_row(label, f"{args.slices / median:.0f}", f"{median:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
