"""Ingest speed: images per second the node receives from DCMTK's storescu,
against DCMTK's own storescp in the same run, and memory with 8 senders.

    .venv/bin/python -m bench.bench_ingest [--slices 300] [--repeats 3]

Each receiver gets the same study ``--repeats`` times, taking turns with the
others (storescp, the node, the node with fsync); what a run wrote is deleted
at once, so that its write-back does not slow the next. The table shows the
median and every run.
Target (issue 5): at least 0.6 of storescp's rate, with the node's durability
(the file complete and renamed into place, and recorded in the job store,
before Success). ``fsync = true`` adds an fsync per instance (power-cut safe).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
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


def run_storescp(tmp: Path, files: list[Path]) -> float:
    out = tmp / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    scp = subprocess.Popen(["storescp", "-od", str(out), str(port)], env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        return storescu(port, files, "STORESCP")
    finally:
        scp.terminate()
        scp.wait()
        shutil.rmtree(out)  # before write-back: runs do not slow each other


def run_node(tmp: Path, files: list[Path], sync: bool) -> float:
    folder = tmp / ("node-sync" if sync else "node")
    shutil.rmtree(folder, ignore_errors=True)
    node = Receiver(JobStore(f"sqlite:///{folder / 'lungsys.db'}"), folder,
                    min_free_disk_mb=1, sync=sync)
    node.start("127.0.0.1", 0)
    try:
        return storescu(node.port, files, "LUNGSYS")
    finally:
        node.stop()
        shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:   # on the disk the node uses
        tmp = Path(tmp)
        # generated in another process, so that this one's peak memory is the receiver's
        lungsys = Path(sys.executable).with_name("lungsys")
        subprocess.run([str(lungsys), "phantom", "--out", str(tmp / "study"), "--label",
                        "covid", "--seed", "1", "--slices", str(args.slices)], check=True,
                       capture_output=True)
        files = sorted((tmp / "study").glob("CT*.dcm"))
        runs: dict[str, list[float]] = {"DCMTK storescp": [], "lungsys receiver": [],
                                        "lungsys receiver, fsync = true": []}
        for _ in range(args.repeats):
            for name in runs:
                if name == "DCMTK storescp":
                    runs[name].append(run_storescp(tmp, files))
                else:
                    runs[name].append(run_node(tmp, files, sync="fsync" in name))

        # 8 senders at once into one node, each its own association
        node8 = Receiver(JobStore(f"sqlite:///{tmp / 'node8' / 'lungsys.db'}"), tmp / "node8",
                         min_free_disk_mb=1)
        node8.start("127.0.0.1", 0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: storescu(node8.port, files, "LUNGSYS"), range(8)))
        eight = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        node8.stop()

    table = Table(title=f"ingest of a {len(files)}-slice 512x512 CT study over loopback "
                        f"({os.cpu_count()} CPUs, TCP_NODELAY=1 for DCMTK; median of "
                        f"{args.repeats})")
    for col in ("receiver", "seconds", "images/s", "runs (images/s)"):
        table.add_column(col, justify="left" if col == "receiver" else "right")
    rates = {}
    for name, secs in runs.items():
        sec = statistics.median(secs)
        rates[name] = len(files) / sec
        table.add_row(name, f"{sec:.2f}", f"{rates[name]:.0f}",
                      " ".join(f"{len(files) / s:.0f}" for s in secs))
    table.add_row("lungsys, 8 associations at once (duplicates after the first)",
                  f"{eight:.2f}", f"{8 * len(files) / eight:.0f}", "")
    console = Console()
    console.print(table)
    base = rates["DCMTK storescp"]
    console.print(f"ratio lungsys / storescp: {rates['lungsys receiver'] / base:.2f} "
                  f"(target >= 0.6); with fsync: "
                  f"{rates['lungsys receiver, fsync = true'] / base:.2f}")
    console.print(f"peak memory of the node process: {after / 1024:.0f} MiB "
                  f"(+{(after - before) / 1024:.0f} MiB during 8 concurrent associations)")


if __name__ == "__main__":
    main()
