"""Soak: a running `lungsys serve` under hostile senders for minutes, its resources sampled.

    .venv/bin/python -m bench.bench_hostile [--minutes 3] [--slices 24]

Wave after wave, on loopback only: malformed A-ASSOCIATE-RQs, PDU headers
announcing 16 MiB and never sending it, sockets trickling a byte at a time,
half-sent data sets, instances with hostile UIDs over DIMSE (storescu) and
STOW-RS, STOW-RS bodies cut short, and in every wave a normal instance that
must be acknowledged and recorded. The table shows, per minute, the node's
resident memory, threads and open file descriptors (they must stay flat), and
what was acknowledged against what the job store holds (they must agree). The
CI suite runs one short wave of the same (tests/test_hostile_suite.py).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
from pydicom import config as pydicom_config
from rich.console import Console
from rich.table import Table

from store.api import JobStore

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from hostile import raw, stow, trickle, with_uids  # noqa: E402 (the CI suite's tools)

ENV = {**os.environ, "TCP_NODELAY": "1"}
EXE = str(Path(sys.executable).with_name("lungsys"))
HOSTILE = [(".", "."), ("..", ".."), ("/tmp", "/etc"), ("1.2", "1.2/3"), ("1.02", "1.2_3")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def storescu(port: int, files: list[Path]) -> int:
    """How many of ``files`` were acknowledged with Success."""
    proc = subprocess.run(["storescu", "-v", "-aet", "SOAK", "-aec", "LUNGSYS", "127.0.0.1",
                           str(port), *map(str, files)], capture_output=True, text=True,
                          env=ENV, timeout=120)
    return proc.stderr.count("Received Store Response (Success)")


def wave(n: int, port: int, web: int, study: list[Path], folder: Path,
         rng: random.Random) -> set[str]:
    """One wave of hostile traffic; the SOP Instance UIDs acknowledged in it."""
    acknowledged: set[str] = set()
    until = time.monotonic() + 8.0
    slow = [threading.Thread(target=trickle, args=(port, lambda: time.monotonic() < until))
            for _ in range(4)]
    for t in slow:
        t.start()
    for _ in range(10):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(68, 400)))
        raw(port, struct.pack(">BBL", 1, 0, len(body)) + body)
        raw(port, struct.pack(">BBL", 1, 0, 16 << 20), linger=0.02)
    head = study[0].read_bytes()
    raw(port, head[:len(head) // 3])                  # not even a PDU
    files = [with_uids(study[i % len(study)], folder, study_uid, series_uid,
                       f"1.2.{n}.{i}") for i, (study_uid, series_uid) in enumerate(HOSTILE)]
    normal = with_uids(study[0], folder, "1.9", f"1.9.{n}", f"1.9.{n}.1")
    if storescu(port, files + [normal]) == len(files) + 1:
        acknowledged |= {f"1.2.{n}.{i}" for i in range(len(files))} | {f"1.9.{n}.1"}
    web_file = with_uids(study[1], folder, "..", f"1.8.{n}", f"1.8.{n}.1")
    if stow(web, [web_file.read_bytes()]) == 200:
        acknowledged.add(f"1.8.{n}.1")
    stow(web, [b"\x00" * 300], close=False)           # a broken body
    for t in slow:
        t.join()
    for f in folder.iterdir():
        f.unlink()
    return acknowledged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--slices", type=int, default=24)
    args = parser.parse_args()
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE  # hostile on purpose
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        tmp = Path(tmp)
        subprocess.run([EXE, "phantom", "--out", str(tmp / "study"), "--label", "covid",
                        "--seed", "1", "--slices", str(args.slices)], check=True,
                       capture_output=True)
        study = sorted((tmp / "study").glob("CT*.dcm"))
        port, web = free_port(), free_port()
        toml = tmp / "node.toml"
        toml.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\n'
                        f'data_dir = "{tmp / "var"}"\nmin_free_disk_mb = 1\n'
                        f'timeout_seconds = 5\n[dicomweb]\nport = {web}\n'
                        f'[store]\nurl = "sqlite:///{tmp / "var" / "db"}"\n'
                        f'[assembly]\nstable_seconds = 600\n[model]\ndevice = "cpu"\n')
        node = subprocess.Popen([EXE, "serve", "--config", str(toml)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while subprocess.run([EXE, "echo", "127.0.0.1", str(port), "--aet", "LUNGSYS"],
                                 capture_output=True).returncode != 0:
                time.sleep(0.5)
            store = JobStore(f"sqlite:///{tmp / 'var' / 'db'}")
            folder = tmp / "hostile"
            folder.mkdir()
            rng = random.Random(1)
            rows, acknowledged, waves = [], set(), 0
            start = time.monotonic()
            first = proc_status(node.pid)
            rows.append(("0.0", 0, first, 0, store.counts()["instances"]))
            next_row = 60.0
            while time.monotonic() - start < args.minutes * 60:
                waves += 1
                acknowledged |= wave(waves, port, web, study, folder, rng)
                if time.monotonic() - start >= next_row or \
                        time.monotonic() - start >= args.minutes * 60:
                    rows.append((f"{(time.monotonic() - start) / 60:.1f}", waves,
                                 proc_status(node.pid), len(acknowledged),
                                 store.counts()["instances"]))
                    next_row += 60.0
            stored = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                      for s in store.series() for p in store.instance_paths(s.id)}
            missing = acknowledged - stored
            strays = [p for p in (tmp / "var").rglob("*.dcm")
                      if not p.is_relative_to(tmp / "var" / "incoming")]
            up = node.poll() is None
        finally:
            node.terminate()
            node.wait(timeout=60)
    table = Table(title=f"lungsys serve under hostile senders ({args.minutes:g} min, "
                        f"{os.cpu_count()} CPUs)")
    for col in ("minute", "waves", "RSS MiB", "threads", "open fds", "acknowledged",
                "recorded"):
        table.add_column(col, justify="right")
    for minute, n, status, acked, count in rows:
        table.add_row(minute, str(n), f"{status['VmRSS'] / 1024:.0f}", str(status["Threads"]),
                      str(status["fds"]), str(acked), str(count))
    console = Console()
    console.print(table)
    console.print(f"node up at the end: {up}; acknowledged but not recorded: {len(missing)}; "
                  f".dcm files outside data_dir/incoming: {len(strays)}")
    if not up or missing or strays:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
