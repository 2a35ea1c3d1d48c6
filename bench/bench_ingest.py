"""Ingest speed: images per second the node receives from DCMTK's storescu,
against DCMTK's own storescp in the same run, and memory with 8 senders
(8 studies, each its own association).

    .venv/bin/python -m bench.bench_ingest [--slices 300] [--repeats 3]

Each receiver gets the same study ``--repeats`` times, taking turns with the
others (storescp, the node, the node with fsync); what a run wrote is deleted
at once, and dirty pages are written back before each run, so that runs do not
slow each other. Then the node receives it again while the shipped model
analyses 60 of its slices over and over: in a process at the worker's lower
priority, as ``lungsys serve`` runs it, and, for comparison, in a thread of
the receiving process. The table shows the median and every run.
Target (issues 5, 12): at least 0.6 of storescp's rate, with the node's
durability (the file complete and renamed into place, and recorded in the job
store, before Success) and its front door (deadlines, gate, UID policy).
``fsync = true`` adds an fsync per instance (power-cut safe). The DICOM TLS
rows compare storescp ``+tls`` with the node's TLS (BCP 195 profile), both
requiring a client certificate made for the run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

import pydicom
from pydicom.uid import generate_uid
from rich.console import Console
from rich.table import Table

from pacs_node.receiver import Receiver
from pacs_node.worker_process import NICENESS
from store.api import JobStore

ENV = {**os.environ, "TCP_NODELAY": "1"}
STORESCP, NODE, NODE_FSYNC = ("DCMTK storescp", "lungsys receiver",
                              "lungsys receiver, fsync = true")
STORESCP_TLS, NODE_TLS = "DCMTK storescp, DICOM TLS", "lungsys receiver, DICOM TLS"
WHILE_MODEL = "lungsys receiver while the model analyses (worker process)"
WHILE_MODEL_THREAD = "... with the model in a thread of the node instead"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storescu(port: int, files: list[Path], aec: str, tls: list[str] = ()) -> float:
    os.sync()  # nobody's write-back lands in the timed run
    start = time.perf_counter()
    proc = subprocess.run(["storescu", *tls, "-aet", "BENCH", "-aec", aec, "127.0.0.1",
                           str(port), *map(str, files)], env=ENV, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"storescu to {aec} failed: {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def copy_as_new_study(files: list[Path], out: Path) -> list[Path]:
    """The study again under new Study, Series and SOP Instance UIDs."""
    out.mkdir()
    uids: dict[str, str] = {}
    copies = []
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            old = ds.data_element(keyword).value
            ds.data_element(keyword).value = uids.setdefault(old, generate_uid())
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        copies.append(out / path.name)
        ds.save_as(copies[-1])
    return copies


def wait_listening(port: int) -> None:
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def make_certificates(folder: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    folder.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=bench CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (folder / f"{name}.ext").write_text(ext + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext", "-out",
                f"{name}.pem")
    return folder


def client_tls(certs: Path | None) -> list[str]:
    return ([] if certs is None else
            ["+tls", str(certs / "client.key"), str(certs / "client.pem"), "+cf",
             str(certs / "ca.pem")])


def run_storescp(tmp: Path, files: list[Path], certs: Path | None = None) -> float:
    out = tmp / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    tls = ([] if certs is None else ["+tls", str(certs / "server.key"),
                                     str(certs / "server.pem"), "+cf", str(certs / "ca.pem")])
    scp = subprocess.Popen(["storescp", *tls, "-od", str(out), str(port)], env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        return storescu(port, files, "STORESCP", client_tls(certs))
    finally:
        scp.terminate()
        scp.wait()
        shutil.rmtree(out)  # before write-back: runs do not slow each other


def run_node(tmp: Path, files: list[Path], sync: bool, certs: Path | None = None) -> float:
    from config import TlsSection
    from pacs_node.security import server_context

    folder = tmp / ("node-sync" if sync else "node")
    shutil.rmtree(folder, ignore_errors=True)
    tls = None if certs is None else server_context(TlsSection(
        enabled=True, certificate=str(certs / "server.pem"),
        private_key=str(certs / "server.key"), ca_certificates=str(certs / "ca.pem")))
    node = Receiver(JobStore(f"sqlite:///{folder / 'lungsys.db'}"), folder,
                    min_free_disk_mb=1, sync=sync, tls=tls)
    node.start("127.0.0.1", 0)
    try:
        return storescu(node.port, files, "LUNGSYS", client_tls(certs))
    finally:
        node.stop()
        shutil.rmtree(folder)


def analyse_forever(study: list[Path], niceness: int, running, idle, stop) -> None:
    """The shipped model analysing ``study`` again and again while ``running``;
    ``idle`` while it waits (after a first analysis, which warms it up)."""
    from inference.checkpoint import default_model   # torch: not in the memory above
    from inference.engine import Engine
    from inference.series import load_series

    os.nice(niceness)
    engine, series = Engine(default_model()), load_series(study)
    engine.analyze(series)
    while not stop.is_set():
        if not running.is_set():
            idle.set()
            running.wait(0.5)
            continue
        engine.analyze(series)


class ModelLoad:
    """The model at work while the node receives, switched on and off between
    runs: in a process at the worker's lower priority, as ``lungsys serve``
    runs it, or in a thread of the receiving process (for comparison)."""

    def __init__(self, study: list[Path], in_process: bool) -> None:
        events = threading if in_process else multiprocessing.get_context("spawn")
        self.running, self.idle, self.stop = events.Event(), events.Event(), events.Event()
        args = (study, 0 if in_process else NICENESS, self.running, self.idle, self.stop)
        runner = threading.Thread if in_process else events.Process
        self.runner = runner(target=analyse_forever, args=args, daemon=True)

    def __enter__(self) -> "ModelLoad":
        self.runner.start()
        self.idle.wait()          # loaded and warmed up
        return self

    def __call__(self, run: Callable[[], float]) -> float:
        """``run()`` while the model analyses."""
        self.idle.clear()
        self.running.set()
        time.sleep(1.0)           # well into an analysis
        try:
            return run()
        finally:
            self.running.clear()
            self.idle.wait()      # the analysis in progress has finished

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.running.set()
        self.runner.join()


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

        # 8 senders at once into one node, each its own association and its own study
        studies = [files] + [copy_as_new_study(files, tmp / f"study{k}") for k in range(1, 8)]
        node8 = Receiver(JobStore(f"sqlite:///{tmp / 'node8' / 'lungsys.db'}"), tmp / "node8",
                         min_free_disk_mb=1)
        node8.start("127.0.0.1", 0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        os.sync()                 # the copies are on disk before the clock starts
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda study: storescu(node8.port, study, "LUNGSYS"), studies))
        eight = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        stored = node8.storage.store.counts()["instances"]
        node8.stop()
        if stored != 8 * len(files):
            raise SystemExit(f"8 senders: {stored} of {8 * len(files)} instances recorded")
        for folder in [tmp / "node8", *(tmp / f"study{k}" for k in range(1, 8))]:
            shutil.rmtree(folder)

        # one receiver after the other, each round; the model loads come after the
        # memory measurement above (a model in a thread would count there)
        runs: dict[str, list[float]] = {name: [] for name in (
            STORESCP, NODE, NODE_FSYNC, STORESCP_TLS, NODE_TLS, WHILE_MODEL,
            WHILE_MODEL_THREAD)}
        node = partial(run_node, tmp, files)
        certs = make_certificates(tmp / "certs")
        with ModelLoad(files[:60], in_process=False) as worker, \
                ModelLoad(files[:60], in_process=True) as thread:
            for _ in range(args.repeats):
                runs[STORESCP].append(run_storescp(tmp, files))
                runs[NODE].append(node(sync=False))
                runs[NODE_FSYNC].append(node(sync=True))
                runs[STORESCP_TLS].append(run_storescp(tmp, files, certs))
                runs[NODE_TLS].append(node(sync=False, certs=certs))
                runs[WHILE_MODEL].append(worker(partial(node, sync=False)))
                runs[WHILE_MODEL_THREAD].append(thread(partial(node, sync=False)))

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
    table.add_row("lungsys, 8 associations at once (8 studies)",
                  f"{eight:.2f}", f"{8 * len(files) / eight:.0f}", "")
    console = Console()
    console.print(table)
    base = rates[STORESCP]
    console.print(f"ratio lungsys / storescp: {rates[NODE] / base:.2f} (target >= 0.6); "
                  f"with fsync: {rates[NODE_FSYNC] / base:.2f}; DICOM TLS: "
                  f"{rates[NODE_TLS] / rates[STORESCP_TLS]:.2f} of storescp +tls; while the "
                  f"model analyses: "
                  f"{rates[WHILE_MODEL] / rates[NODE]:.2f} of the node's idle rate (model in "
                  f"a thread instead: {rates[WHILE_MODEL_THREAD] / rates[NODE]:.2f})")
    console.print(f"peak memory of the node process: {after / 1024:.0f} MiB "
                  f"(+{(after - before) / 1024:.0f} MiB during 8 concurrent associations)")


if __name__ == "__main__":
    main()
