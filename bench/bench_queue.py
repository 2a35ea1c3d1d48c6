"""The job queue: claims per second with many concurrent claimers, on PostgreSQL and SQLite.

    .venv/bin/python -m bench.bench_queue [--jobs 2000] [--claimers 1,4,16]

Fills a job store with queued no-op jobs (a series each, as the assembly sweep
leaves them), then lets N worker processes claim them as ``lungsys worker`` does
(``claim_job``: FOR UPDATE SKIP LOCKED, a lease, one more attempt) and record
each done (``finish_job`` with the lease checked), until the queue is empty.
Prints claims per second (claim and finish, the whole cycle of a job but the
model) by store and number of claimers, and checks that every job was done once.
PostgreSQL is a private server on loopback (``tests/postgres.py``) with fsync on,
as a production server runs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def fill(url: str, jobs: int) -> None:
    from store.api import JobStore
    from store.models import Job, JobState, Series, SeriesState

    store = JobStore(url)
    with store.session() as s, s.begin():
        for i in range(jobs):
            series = Series(series_instance_uid=f"2.25.{i + 1}", study_instance_uid="2.25.0",
                            modality="CT", state=SeriesState.queued, instance_count=1)
            s.add(series)
            s.flush()
            s.add(Job(series_id=series.id, version=1, state=JobState.queued))
    store.engine.dispose()


def claimer(url: str, name: str, start, counts) -> None:
    from store.api import JobStore

    store = JobStore(url)
    start.wait()
    done = 0
    while (job := store.claim_job("", name, 60.0)) is not None:
        store.finish_job(job.id, diagnosis="Healthy", probabilities={}, infected_fraction=0.0,
                         timings={}, model_version="bench", device_uid="2.25.1", results=[],
                         worker=name)
        done += 1
    counts[name] = done


def run(url: str, jobs: int, claimers: int) -> float:
    from store.api import JobStore

    fill(url, jobs)
    context = multiprocessing.get_context("spawn")
    start, counts = context.Event(), context.Manager().dict()
    processes = [context.Process(target=claimer, args=(url, f"w{i}", start, counts))
                 for i in range(claimers)]
    for p in processes:
        p.start()
    time.sleep(3)                      # every claimer connected and waiting
    began = time.perf_counter()
    start.set()
    for p in processes:
        p.join()
    seconds = time.perf_counter() - began
    store = JobStore(url)
    done = store.jobs("done", limit=jobs + 1)
    if sum(counts.values()) != jobs or len(done) != jobs or any(j.attempts != 1 for j in done):
        raise SystemExit(f"bench_queue: {sum(counts.values())} claims, {len(done)} done of "
                         f"{jobs}: a job was lost or done twice")
    return jobs / seconds


def main() -> None:
    from postgres import Postgres         # tests/postgres.py

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--claimers", default="1,4,16")
    args = parser.parse_args()
    counts = [int(c) for c in args.claimers.split(",")]
    table = Table(title=f"Job queue: {args.jobs} no-op jobs claimed and finished")
    for column in ("store", "claimers", "claims/s"):
        table.add_column(column, justify="left" if column == "store" else "right")
    server = Postgres(fsync=True).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in counts:
                rate = run(server.new_database(), args.jobs, n)
                table.add_row("PostgreSQL (fsync on)", str(n), f"{rate:.0f}")
                print(f"PostgreSQL, {n} claimers: {rate:.0f} claims/s", file=sys.stderr)
            for n in counts:
                rate = run(f"sqlite:///{tmp}/queue-{n}.db", args.jobs, n)
                table.add_row("SQLite (WAL)", str(n), f"{rate:.0f}")
                print(f"SQLite, {n} claimers: {rate:.0f} claims/s", file=sys.stderr)
    finally:
        server.stop()
    Console().print(table)


if __name__ == "__main__":
    main()
