"""Jobs per minute by number of workers, and WADO-RS to a worker: the fleet measured.

    .venv/bin/python -m bench.bench_fleet [--workers 1 2 3] [--studies 6] [--slices 64]
                                          [--wado-slices 300]

A real ``lungsys serve`` (no local worker) on a private PostgreSQL server
(``tests/postgres.py``, fsync on), and N ``lungsys worker`` processes, each
with a data folder of its own (``[worker] instances = "wado"``, a token of the
worker role). Phantom studies are sent with DCMTK's ``storescu``; jobs per
minute is the number of studies over the time from the first claim to the
last outcome, read from the job store. Then one study of ``--wado-slices``
slices through one worker gives the WADO-RS transfer rate (what the worker's
job log says it retrieved, in how long). On a machine with few cores, CPU
workers share them: the table says how many there are.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
EXE = str(Path(sys.executable).with_name("lungsys"))
RATE = re.compile(r"retrieved over WADO-RS in [\d.]+ s \((\d+) MB/s\)")


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise SystemExit(f"bench_fleet: {what} did not happen in {timeout:.0f} s")


def run(folder: Path, url: str, workers: int, studies: list[list[Path]]) -> list:
    """The node and ``workers`` workers on these studies; the jobs, once all are done."""
    from orthanc import free_port         # tests/orthanc.py
    from store.api import JobStore

    port, http = free_port(), free_port()
    node_toml = folder / "node.toml"
    common = f'min_free_disk_mb = 1\n[store]\nurl = "{url}"\n[model]\ndevice = "cpu"\n'
    node_toml.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{folder / "node"}"\n'
        f'{common}[http]\nport = {http}\n[assembly]\nstable_seconds = 1\n'
        f'[worker]\nlocal = false\n')
    logs = open(folder / "logs.txt", "w")
    processes = [subprocess.Popen([EXE, "serve", "--config", str(node_toml)],
                                  stdout=subprocess.DEVNULL, stderr=logs)]
    store = JobStore(url)
    try:
        for i in range(workers):
            token = subprocess.run([EXE, "tokens", "create", f"w{i}", "--role", "worker",
                                    "--config", str(node_toml)], capture_output=True,
                                   text=True, check=True).stdout.strip()
            toml = folder / f"worker{i}.toml"
            toml.write_text(f'[node]\ndata_dir = "{folder / f"worker{i}"}"\n{common}'
                            f'[worker]\ninstances = "wado"\n'
                            f'node_url = "http://127.0.0.1:{http}"\ntoken = "{token}"\n')
            processes.append(subprocess.Popen([EXE, "worker", "--config", str(toml)],
                                              stdout=subprocess.DEVNULL, stderr=logs))
        _wait(lambda: len(store.workers()) == workers, 300, "the workers' start")
        for files in studies:
            subprocess.run(["storescu", "-aet", "BENCH", "-aec", "LUNGSYS", "127.0.0.1",
                            str(port), *map(str, files)], check=True, capture_output=True,
                           env={**os.environ, "TCP_NODELAY": "1"})
        done = _wait(lambda: (jobs := store.jobs("done")) and len(jobs) == len(studies)
                     and all(j.log for j in jobs) and jobs, 1800, "every job's outcome")
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(60)
        logs.close()
    return done


def main() -> None:
    from postgres import Postgres         # tests/postgres.py
    from training.phantom import generate_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--wado-slices", type=int, default=300)
    args = parser.parse_args()
    table = Table(title=f"lungsys workers over WADO-RS ({os.cpu_count()} CPU cores, "
                        f"model on the CPU)")
    for col in ("workers", "studies", "slices", "jobs/min", "WADO-RS MB/s (median)"):
        table.add_column(col, justify="right")
    server = Postgres(fsync=True).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            print(f"writing {args.studies} phantom studies ...", file=sys.stderr, flush=True)
            studies = [generate_study(root / f"study{i}", ("covid", "cap", "h1n1",
                                                            "healthy")[i % 4], 100 + i,
                                      args.slices).files for i in range(args.studies)]
            runs = [(n, studies) for n in args.workers]
            if args.wado_slices:
                runs.append((1, [generate_study(root / "large", "covid", 99,
                                                args.wado_slices).files]))
            for i, (n, batch) in enumerate(runs):
                print(f"{n} worker(s), {len(batch)} studies ...", file=sys.stderr, flush=True)
                folder = root / f"run{i}"
                folder.mkdir()
                jobs = run(folder, server.new_database(), n, batch)
                span = (max(j.finished_at for j in jobs)
                        - min(j.started_at for j in jobs)).total_seconds()
                rates = sorted(int(m) for j in jobs for m in RATE.findall(j.log))
                table.add_row(str(n), str(len(batch)), str(len(batch[0])),
                              f"{len(jobs) / span * 60:.1f}",
                              f"{rates[len(rates) // 2]:.0f}" if rates else "-")
    finally:
        server.stop()
    Console().print(table)


if __name__ == "__main__":
    main()
