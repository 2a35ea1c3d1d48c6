"""Ingest speed: images per second the node receives from DCMTK's storescu,
against DCMTK's own storescp in the same run, and memory with 8 senders.

    .venv/bin/python -m bench.bench_ingest [--slices 300]

Target (issue 5): at least 0.6 of storescp's rate with the node's durability
(write, fsync, rename, record in the job store before Success).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pacs_node.receiver import Receiver
from store.api import JobStore

ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storescu(port: int, files: list[Path], aec: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port),
                           *map(str, files)], env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"storescu to {aec} failed: {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def wait_listening(port: int) -> None:
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # generated in another process, so that this one's peak memory is the receiver's
        lungsys = Path(sys.executable).with_name("lungsys")
        subprocess.run([str(lungsys), "phantom", "--out",
                        str(tmp / "study"), "--label", "covid", "--seed", "1", "--slices",
                        str(args.slices)], check=True, capture_output=True)
        files = sorted((tmp / "study").glob("CT*.dcm"))

        port = free_port()
        scp = subprocess.Popen(["storescp", "-od", str(tmp / "storescp"), str(port)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (tmp / "storescp").mkdir()
        wait_listening(port)
        try:
            dcmtk = storescu(port, files, "STORESCP")
        finally:
            scp.terminate()
            scp.wait()
        rows.append(("DCMTK storescp", dcmtk, len(files) / dcmtk))

        store = JobStore(f"sqlite:///{tmp / 'node' / 'lungsys.db'}")
        node = Receiver(store, tmp / "node", min_free_disk_mb=1)
        node.start("127.0.0.1", 0)
        try:
            ours = storescu(node.port, files, "LUNGSYS")
            rows.append(("lungsys receiver (fsync + job store)", ours, len(files) / ours))
            # 8 senders at once, each its own copy of the study (new UIDs would be needed
            # for new instances; duplicates still exercise the full receive path)
            shutil.rmtree(tmp / "node" / "incoming")
            store2 = JobStore(f"sqlite:///{tmp / 'node8' / 'lungsys.db'}")
            node8 = Receiver(store2, tmp / "node8", min_free_disk_mb=1)
            node8.start("127.0.0.1", 0)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda _: storescu(node8.port, files, "LUNGSYS"), range(8)))
            eight = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            node8.stop()
            rows.append(("lungsys, 8 associations at once", eight, 8 * len(files) / eight))
        finally:
            node.stop()
    table = Table(title=f"ingest of a {len(files)}-slice 512x512 CT study over loopback "
                        f"({os.cpu_count()} CPUs, TCP_NODELAY=1 for DCMTK)")
    for col in ("receiver", "seconds", "images/s"):
        table.add_column(col, justify="left" if col == "receiver" else "right")
    for name, sec, rate in rows:
        table.add_row(name, f"{sec:.2f}", f"{rate:.0f}")
    console = Console()
    console.print(table)
    console.print(f"ratio lungsys / storescp: {rows[1][2] / rows[0][2]:.2f} (target >= 0.6)")
    console.print(f"peak memory of the node process: {after / 1024:.0f} MiB "
                  f"(+{(after - before) / 1024:.0f} MiB during 8 concurrent associations)")


if __name__ == "__main__":
    main()
